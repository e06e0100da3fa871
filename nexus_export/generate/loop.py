"""Generating text one token at a time: the decoding loop, sampling, and the PyTorch decoders.

A *decoder* is anything with ``prefill(ids) -> logits`` (the prompt's last position) and ``step(token) -> logits``
(the next position). ``generate`` drives any of them the same way (greedy by default), streams each token to a
callback, and times the prompt (prefill) and the new tokens (decode) apart. The onnxruntime and onnxruntime-genai
decoders live with their runtimes (runtimes/decode.py, runtimes/genai.py); the two here run in PyTorch and are the
references the ONNX cache model is checked against: ``ProgramDecoder`` recomputes the whole sequence through the
program at every step (block by block, no cache: slow, but the program's own function, for any pass, a sliced model
too); ``HFDecoder`` runs a transformers model with its own key/value cache, as ``model.generate`` does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from nexus_export.errors import UserError
from nexus_export.graph.program import Program


class Decoder(Protocol):
    def prefill(self, ids: Sequence[int]) -> np.ndarray: ...

    def step(self, token: int) -> np.ndarray: ...


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (``temperature`` 0, the default) or sampled at ``temperature`` from the
    smallest set of tokens whose probability reaches ``top_p`` (nucleus), with a seeded generator."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.temperature <= 100:
            raise UserError(f"--temperature must be between 0 (greedy) and 100, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def chooser(self) -> Callable[[np.ndarray], int]:
        """A function from one position's logits to the chosen token id (its own seeded generator)."""
        if self.greedy:
            return lambda logits: int(np.argmax(logits))
        rng = np.random.default_rng(self.seed)

        def choose(logits: np.ndarray) -> int:
            z = logits.astype(np.float64) / self.temperature
            p = np.exp(z - z.max())
            p /= p.sum()
            order = np.argsort(-p, kind="stable")
            cumulative = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cumulative, self.top_p)) + 1]
            return int(rng.choice(keep, p=p[keep] / p[keep].sum()))

        return choose


@dataclass
class Generated:
    """What one generation produced and how long it took."""

    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stopped: str = "length"  # "length" (max_new_tokens reached) or "eos"

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens after the first (which prefill produced) per second of decode steps."""
        steps = max(len(self.tokens) - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else float("nan")


def generate(decoder: Decoder, prompt: Sequence[int], max_new_tokens: int, sampling: Sampling = Sampling(),
             stop_ids: Sequence[int] = (), on_token: Callable[[int], None] | None = None) -> Generated:
    """Generate up to ``max_new_tokens`` after ``prompt`` (token ids), stopping early at a token in ``stop_ids``
    (kept in the output); ``on_token`` sees each token as it is chosen."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if len(prompt) < 1:
        raise UserError("the prompt is empty: give at least one token of text")
    choose = sampling.chooser()
    out = Generated(prompt_tokens=len(prompt))
    start = time.perf_counter()
    logits = decoder.prefill(list(prompt))
    out.prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    stop = set(stop_ids)
    while True:
        token = choose(logits)
        out.tokens.append(token)
        if on_token is not None:
            on_token(token)
        if token in stop:
            out.stopped = "eos"
            break
        if len(out.tokens) >= max_new_tokens:
            break
        logits = decoder.step(token)
    out.decode_s = time.perf_counter() - start
    return out




class ProgramDecoder:
    """A program's next-token logits for a growing sequence, recomputed in full each step."""

    def __init__(self, program: Program):
        self.program = program
        self.ids: list[int] = []

    def _last(self) -> np.ndarray:
        ids = torch.tensor([self.ids], dtype=torch.long)
        return self.program.logits(ids)[0, -1].numpy()

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        self.ids = list(ids)
        return self._last()

    def step(self, token: int) -> np.ndarray:
        self.ids.append(int(token))
        return self._last()


class HFDecoder:
    """A transformers causal LM with its own key/value cache (float32 logits of the last position)."""

    def __init__(self, model: Any):
        self.model = model.eval()
        self.cache = None

    @torch.no_grad()
    def _run(self, ids: list[int], cache) -> np.ndarray:
        out = self.model(input_ids=torch.tensor([ids], dtype=torch.long), cache=cache, use_cache=True)
        self.cache = out.cache
        return out.logits[0, -1].float().numpy()

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        return self._run(list(ids), None)

    def step(self, token: int) -> np.ndarray:
        return self._run([int(token)], self.cache)
