"""A key/value-cache ONNX model in onnxruntime, one token at a time, and how fast it decodes.

``CacheDecoder`` feeds each step's present back as the next past, so a step costs one token's work (the decoding loop
itself is nexus_export/generate/loop.py's ``generate``). ``decode_speed`` is the report's measure: prefill and decode
tokens per second at batch 1, medians of several runs after a warm-up.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from nexus_export.errors import UserError
from nexus_export.generate.loop import generate

from . import ort


class CacheDecoder:
    """One sequence through a key/value-cache ONNX model in onnxruntime: the prompt with an empty past, then each new
    token with the presents of the step before as its past."""

    def __init__(self, sess, dims: tuple[int, int] | None = None):
        self.sess = sess
        self.dims = dims  # heads and head size, for a model whose past inputs leave them symbolic
        self.names = [value.name for value in sess.get_outputs()]
        inputs = {value.name for value in sess.get_inputs()}
        if not ort.cache_inputs(sess):
            raise UserError("this ONNX model has no key/value cache inputs (past_key_values.*): it is a full-sequence "
                            "model; generate from its model.kv.onnx twin (re-lower with --lower both or generate)")
        self.positions = "position_ids" in inputs
        self.past: dict[str, np.ndarray] = {}
        self.length = 0

    def _run(self, ids: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, self.length + ids.shape[1]), dtype=np.int64),
                 **self.past}
        if self.positions:
            feeds["position_ids"] = np.arange(self.length, self.length + ids.shape[1], dtype=np.int64)[None]
        results = dict(zip(self.names, self.sess.run(None, feeds)))
        self.length += ids.shape[1]
        self.past = {name.replace("present.", "past_key_values."): value for name, value in results.items()
                     if name.startswith("present.")}
        return results["logits"][0, -1]

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        self.past, self.length = ort.empty_cache(self.sess, 1, self.dims), 0
        return self._run(np.asarray([ids], dtype=np.int64))

    def step(self, token: int) -> np.ndarray:
        return self._run(np.asarray([[token]], dtype=np.int64))


def kv_bytes_per_token(sess) -> int:
    """Bytes the key/value cache grows by per token (batch 1): heads x head_dim x 4 bytes for every past input."""
    return sum(int(value.shape[1]) * int(value.shape[3]) * 4 for value in ort.cache_inputs(sess))


def decode_speed(sess, prompt_tokens: int = 128, new_tokens: int = 128, runs: int = 3, warmup: int = 1,
                 seed: int = 0) -> dict:
    """Prefill and decode tokens per second of a cache model at batch 1: a seeded random prompt of
    ``prompt_tokens``, then ``new_tokens`` greedy tokens (no early stop), medians over ``runs`` after ``warmup``
    shorter runs."""
    if prompt_tokens < 1 or new_tokens < 2 or runs < 1:
        raise UserError(f"decode speed needs a prompt, at least 2 new tokens and 1 run, got {prompt_tokens}, "
                        f"{new_tokens}, {runs}")
    vocab = ort.vocab_size(sess)
    prompt = np.random.default_rng(seed).integers(0, vocab, prompt_tokens).tolist()
    decoder = CacheDecoder(sess)
    for _ in range(warmup):
        generate(decoder, prompt, min(new_tokens, 8))
    results = [generate(decoder, prompt, new_tokens) for _ in range(runs)]
    return {
        "prefill_tokens_per_s": float(np.median([r.prefill_tokens_per_s for r in results])),
        "decode_tokens_per_s": float(np.median([r.decode_tokens_per_s for r in results])),
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "runs": runs, "batch": 1,
        "kv_bytes_per_token": kv_bytes_per_token(sess),
    }
