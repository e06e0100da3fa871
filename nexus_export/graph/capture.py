"""Capture: a causal LM (transformers model or plain nn.Module) -> torch.export.ExportedProgram without weights.

The model is wrapped so the captured function is ``(input_ids, attention_mask) -> logits``, with the batch and sequence
dimensions dynamic. The wrapper's single attribute is ``lm`` (see naming.py), so parameter names are the model's own
names behind a fixed prefix. A Hugging Face model is captured with its key/value cache marked in the graph (the mask
may be longer than the ids: the difference is the past; see kv_cache.py), which is how one program lowers to both
the full-sequence model and the key/value-cache model that generates.

Capture never touches weights: a model built on the meta device is captured as it is, and a model with real weights
has its parameters (and persistent buffers) swapped for float32 meta tensors while it is traced and put back after.
So the graph computes in float32 whatever the checkpoint's dtype, its state_dict holds shapes only, and the weights
stay where they are (a checkpoint on disk, or the caller's model) for the weight store to hand out.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.fx.traceback as fx_traceback

from nexus_export.errors import UserError
from nexus_export.graph.graph_edit import copy_program, rebuild
from nexus_export.graph.kv_cache import past_cache, positions
from nexus_export.graph.trace_settings import tracing
from nexus_export.memory import forget_last_trace

log = logging.getLogger(__name__)

# Captures of Hugging Face models in this process, by _capture_key: a sweep's next point, the API pruning one model
# twice and the test suite capture the same graph again (seconds each; tens for a 135M model). Weights are meta, so an
# entry is a graph only; a run captures one or two models, the test suite's workers dozens of tiny ones (in
# test_architectures.py and test_generation.py in one process: 42 captures took 39 traces with room for two entries,
# 18 with room for all).
_CAPTURES: OrderedDict[str, torch.export.ExportedProgram] = OrderedDict()
KEEP_CAPTURES = 16

COMPUTE_DTYPE = torch.float32  # the dtype every captured graph computes in (float64 where the math needs it)
MAX_BATCH = 1024
MAX_SEQUENCE = 8192


class CausalLM(torch.nn.Module):
    """``(input_ids, attention_mask) -> logits`` around a Hugging Face causal LM or a module with that signature.

    A Hugging Face model runs with a tagged cache over a past of ``attention_mask.shape[1] - input_ids.shape[1]``
    tokens (empty whenever the mask is as long as the ids) and the matching positions."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if _is_hf_model(self.lm):
            past = attention_mask.shape[1] - input_ids.shape[1]
            device = self.lm.get_input_embeddings().weight.device
            layers = self.lm.config.get_text_config(decoder=True).num_hidden_layers
            return self.lm(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=positions(input_ids, past, device), cache=past_cache(past, layers),
                           use_cache=True).logits
        out = self.lm(input_ids, attention_mask)
        return out.logits if hasattr(out, "logits") else out


def _is_hf_model(module: torch.nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, PreTrainedModel)


TRACE_PAST = 3  # the past a Hugging Face model is traced with (nonzero, so its length stays symbolic)


def example_inputs(vocab_size: int, batch: int = 2, seq: int = 16, past: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and an all-ones mask (``past`` longer than the ids) used as the tracing example (values do not
    matter, shapes are dynamic)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(vocab_size, 2), (batch, seq), generator=gen)
    return ids, torch.ones(batch, seq + past, dtype=ids.dtype)


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
    cached = _is_hf_model(model)
    key = _capture_key(model, vocab_size) if cached else None
    if key in _CAPTURES:
        _CAPTURES.move_to_end(key)
        log.info("captured %s: the graph of an earlier capture of this model in this process, reused",
                 type(model).__name__)
        return copy_program(_CAPTURES[key])  # passes edit graphs in place; weights are meta
    was_training = model.training
    model.eval()
    ids, mask = example_inputs(vocab_size, past=TRACE_PAST if cached else 0)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    seq = torch.export.Dim("sequence", min=2, max=MAX_SEQUENCE)
    total = torch.export.Dim("total_sequence", min=2, max=2 * MAX_SEQUENCE) if cached else seq
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total}}
    start = time.perf_counter()
    try:
        # preserve_node_meta: the cache's tags (node.meta["custom"]) reach the captured graph
        with torch.no_grad(), meta_weights(model), fx_traceback.preserve_node_meta(), tracing():
            exported = torch.export.export(CausalLM(model), (ids, mask), dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # torch.export raises many types; all become one clear message
        raise UserError(f"torch.export could not capture {type(model).__name__}: {describe_export_failure(exc)}") from exc
    finally:
        model.train(was_training)
        forget_last_trace()
    log.info("captured %s with torch.export in %.1f s", type(model).__name__, time.perf_counter() - start)
    _check_constants(exported, type(model).__name__)
    exported = rebuild(exported, None)  # one input per tensor: a tied weight's unused second placeholder goes
    if key is not None:
        _CAPTURES[key] = copy_program(exported)
        while len(_CAPTURES) > KEEP_CAPTURES:
            _CAPTURES.popitem(last=False)
    return exported


def _capture_key(model: torch.nn.Module, vocab_size: int) -> str:
    """What a Hugging Face model's captured graph depends on: its class, config, module tree, parameter names,
    shapes, dtypes and ties, its buffers (and the values of those the graph keeps as constants, such as rotary
    frequencies), and the versions of torch and transformers. Weight values are not in the graph."""
    import transformers

    digest = hashlib.sha256()
    config = model.config
    for part in (type(model).__module__, type(model).__qualname__, config.to_json_string(use_diff=False),
                 str(getattr(config, "_attn_implementation", None)), repr(model), str(vocab_size),
                 torch.__version__, transformers.__version__):
        digest.update(part.encode())
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied = first.setdefault(id(p), name)
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{tied}".encode())
    for prefix, module in model.named_modules(remove_duplicate=False):
        for key, b in module._buffers.items():
            if b is None:
                continue
            digest.update(f"{prefix}.{key}:{tuple(b.shape)}:{b.dtype}".encode())
            swapped = key not in module._non_persistent_buffers_set and b.is_floating_point()  # see meta_weights
            if not swapped and b.device.type != "meta":  # in the graph as a constant: its values matter
                digest.update(b.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
