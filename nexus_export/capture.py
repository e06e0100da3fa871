"""Capture: a causal LM (transformers model or plain nn.Module) -> torch.export.ExportedProgram without weights.

The model is wrapped so the captured function is ``(input_ids, attention_mask) -> logits``, with the batch and sequence
dimensions dynamic. The wrapper's single attribute is ``lm`` (see naming.py), so parameter names are the model's own
names behind a fixed prefix.

Capture never touches weights: a model built on the meta device is captured as it is, and a model with real weights
has its parameters (and persistent buffers) swapped for float32 meta tensors while it is traced and put back after.
So the graph computes in float32 whatever the checkpoint's dtype, its state_dict holds shapes only, and the weights
stay where they are (a checkpoint on disk, or the caller's model) for the weight store to hand out.
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import contextmanager
from typing import Iterator

import torch

from .errors import UserError
from .graph_edit import rebuild
from .memory import forget_last_trace

log = logging.getLogger(__name__)

MAX_BATCH = 1024
MAX_SEQUENCE = 8192


class CausalLM(torch.nn.Module):
    """``(input_ids, attention_mask) -> logits`` around a Hugging Face causal LM or a module with that signature."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if _is_hf_model(self.lm):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        out = self.lm(input_ids, attention_mask)
        return out.logits if hasattr(out, "logits") else out


def _is_hf_model(module: torch.nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, PreTrainedModel)


def example_inputs(vocab_size: int, batch: int = 2, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and an all-ones mask used as the tracing example (values do not matter, shapes are dynamic)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(vocab_size, 2), (batch, seq), generator=gen)
    return ids, torch.ones_like(ids)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Models built inside get every parameter on the meta device (no memory, no initialization); buffers computed
    from the config (rotary tables) stay real."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


@contextmanager
def meta_weights(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, every parameter and persistent floating buffer of ``model`` is a float32 meta tensor (tied
    parameters stay tied); the real ones are put back on exit, whatever happens."""
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    metas: dict[int, torch.Tensor] = {}

    def meta_of(t: torch.Tensor, parameter: bool) -> torch.Tensor:
        if id(t) not in metas:
            m = torch.empty(t.shape, dtype=torch.float32 if t.is_floating_point() else t.dtype, device="meta")
            metas[id(t)] = torch.nn.Parameter(m, requires_grad=False) if parameter else m
        return metas[id(t)]

    try:
        for module in model.modules():
            for key, p in list(module._parameters.items()):
                if p is not None and p.device.type != "meta":
                    swapped.append((module._parameters, key, p))
                    module._parameters[key] = meta_of(p, True)
            persistent = [k for k in module._buffers if k not in module._non_persistent_buffers_set]
            for key in persistent:
                b = module._buffers[key]
                if b is not None and b.is_floating_point() and b.device.type != "meta":
                    swapped.append((module._buffers, key, b))
                    module._buffers[key] = meta_of(b, False)
        yield
    finally:
        for table, key, original in reversed(swapped):
            table[key] = original


def capture(model: torch.nn.Module, vocab_size: int | None = None) -> torch.export.ExportedProgram:
    """Export ``model`` with dynamic batch and sequence length and meta weights (see the module docstring); a failure
    names the construct torch.export rejected."""
    if vocab_size is None:
        vocab_size = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
        if not vocab_size:
            emb = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
            vocab_size = emb.num_embeddings if emb is not None else 2
    was_training = model.training
    model.eval()
    ids, mask = example_inputs(vocab_size)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    seq = torch.export.Dim("sequence", min=2, max=MAX_SEQUENCE)
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    start = time.perf_counter()
    try:
        with torch.no_grad(), meta_weights(model):
            exported = torch.export.export(CausalLM(model), (ids, mask), dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # torch.export raises many types; all become one clear message
        raise UserError(f"torch.export could not capture {type(model).__name__}: {describe_export_failure(exc)}") from exc
    finally:
        model.train(was_training)
        forget_last_trace()
    log.info("captured %s with torch.export in %.1f s", type(model).__name__, time.perf_counter() - start)
    _check_constants(exported, type(model).__name__)
    return rebuild(exported, None)  # one input per tensor: a tied weight's unused second placeholder goes


def _check_constants(exported: torch.export.ExportedProgram, what: str) -> None:
    """Refuse a capture whose graph kept tensors made while tracing (lifted constants) that have no values: they were
    computed from the meta weights, so the program could never run. A transformers model called with its KV cache on
    inside a wrapper's forward builds such tensors."""
    empty = sorted(name for name, value in exported.constants.items()
                   if isinstance(value, torch.Tensor) and value.device.type == "meta")
    if empty:
        raise UserError(f"capturing {what} kept {len(empty)} tensor(s) computed while tracing ({', '.join(empty[:3])}"
                        f"{', ...' if len(empty) > 3 else ''}) that have no values; if its forward calls a "
                        "transformers model, call it with use_cache=False")


def describe_export_failure(exc: Exception) -> str:
    """One line naming the failing construct and, where torch says it, the user source line."""
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    headline = lines[0] if lines else type(exc).__name__
    headline = re.sub(r"\s+", " ", headline)[:300]
    where = None
    for ln in lines:
        m = re.search(r'File "([^"]+)", line (\d+)', ln) or re.search(r"\(([^()\s]+\.py):(\d+)", ln)
        if m and "site-packages/torch" not in m.group(1) and "/torch/" not in m.group(1):
            where = f"{m.group(1)}:{m.group(2)}"
    for ln in lines:
        if ln.startswith(("Caused by:", "User code:")) or "data-dependent" in ln:
            headline = headline if "data-dependent" in headline else f"{headline} ({ln[:160]})"
            break
    hint = "rewrite that construct without data-dependent Python control flow, or pass a supported model"
    return f"{type(exc).__name__}: {headline}" + (f" at {where}" if where else "") + f"; {hint}"
