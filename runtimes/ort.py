"""Run a lowered model in onnxruntime on CPU: logits, perplexity and latency.

This is the runtime that works everywhere, so it is what a report's "after" numbers come from on a machine
without a GPU. Perplexity uses the same ``metrics.next_token_nll`` as the PyTorch side, so the two agree to
float rounding.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from nexus_export import metrics
from nexus_export.errors import UserError

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

log = logging.getLogger(__name__)

PROVIDER = "CPUExecutionProvider"


def available() -> tuple[bool, str]:
    """Whether onnxruntime with its CPU provider can be used here, and why (version, or what is missing)."""
    try:
        import onnxruntime
    except ImportError as error:
        return False, f"onnxruntime is not installed ({error}): pip install onnxruntime"
    if PROVIDER not in onnxruntime.get_available_providers():
        return False, f"onnxruntime {onnxruntime.__version__} has no {PROVIDER}"
    return True, f"onnxruntime {onnxruntime.__version__} ({PROVIDER})"


GPU_PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider"}


def provider_chain(device: str = "cpu", cache_dir: str | Path | None = None, fp16: bool = True) -> list:
    """Execution providers for ``device`` (cpu, cuda, tensorrt), each with its options, ending with the CPU.

    TensorRT gets 2:4 sparse weights (trt_sparsity_enable), fp16 and an engine cache; a provider this onnxruntime
    build lacks is dropped with the reason logged, so the session falls back to the CPU.
    """
    import onnxruntime

    if device not in ("cpu", *GPU_PROVIDERS):
        raise UserError(f"unknown device {device!r}; use cpu, cuda or tensorrt")
    chain: list = []
    have = set(onnxruntime.get_available_providers())
    if device == "tensorrt":
        options = {"trt_fp16_enable": fp16, "trt_sparsity_enable": True, "trt_engine_cache_enable": cache_dir is not None,
                   "trt_timing_cache_enable": cache_dir is not None}
        if cache_dir is not None:
            options.update(trt_engine_cache_path=str(cache_dir), trt_timing_cache_path=str(cache_dir))
        chain.append((GPU_PROVIDERS["tensorrt"], options))
    if device in ("tensorrt", "cuda"):
        chain.append((GPU_PROVIDERS["cuda"], {}))
    kept = [entry for entry in chain if entry[0] in have]
    for name, _ in chain:
        if name not in have:
            log.warning("%s is not available in onnxruntime %s (it has %s); falling back", name,
                        onnxruntime.__version__, ", ".join(sorted(have)))
    return [*kept, PROVIDER]


def session(path: str | Path, threads: int | None = None, device: str = "cpu",
            cache_dir: str | Path | None = None) -> InferenceSession:
    """An ``onnxruntime.InferenceSession`` with all graph optimizations; ``threads`` None = ORT's default.

    ``device`` cpu, cuda or tensorrt (see provider_chain; missing providers fall back to the CPU with a logged reason).
    """
    import onnxruntime

    from .onnx_check import open_onnx

    path = Path(path)
    open_onnx(path)  # a missing or truncated file is named before onnxruntime reads it
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    if device == "cpu":
        # The memory pattern plans one block per input shape for all intermediates and keeps it: on the demo's model,
        # 8 windows of 512 tokens, the peak was 1,171 MiB with it and 1,101 without (medians of 5 and 4 runs), the
        # latency the same.
        options.enable_mem_pattern = False
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    start = time.perf_counter()
    try:
        sess = onnxruntime.InferenceSession(str(path), sess_options=options,
                                           providers=provider_chain(device, cache_dir))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types for models it cannot load
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserError(f"onnxruntime cannot load {path}: {first}") from None
    log.info("onnxruntime session for %s in %.1f s (%s)", path.name, time.perf_counter() - start,
             ", ".join(sess.get_providers()))
    return sess


def logits(sess: InferenceSession, input_ids, attention_mask=None) -> np.ndarray:
    """Logits [batch, seq, vocab] for ``input_ids`` (torch or numpy); the mask defaults to all ones. A key/value-cache
    model gets an empty past and positions 0 .. seq - 1, which makes it the full-sequence model."""
    ids = _int64(input_ids)
    if ids.ndim != 2:
        raise UserError(f"input_ids must be [batch, sequence], got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else _int64(attention_mask)
    feeds = {"input_ids": ids, "attention_mask": mask, **empty_cache(sess, len(ids))}
    names = {value.name for value in sess.get_inputs()}
    if "position_ids" in names:
        feeds["position_ids"] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
    return sess.run(["logits"], {name: value for name, value in feeds.items() if name in names})[0]


def cache_inputs(sess: InferenceSession) -> list:
    """The past key/value inputs of a key/value-cache model's session (empty for a full-sequence model)."""
    return [value for value in sess.get_inputs() if value.name.startswith("past_key_values.")]


def empty_cache(sess: InferenceSession, batch: int, dims: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """An empty past for every cache input of ``sess``: [batch, heads, 0, head_dim] float32 arrays by name (``dims``:
    heads and head_dim, for a model whose inputs leave them symbolic)."""
    out = {}
    for value in cache_inputs(sess):
        heads, head_dim = dims or (value.shape[1], value.shape[3])
        if not isinstance(heads, int) or not isinstance(head_dim, int):
            raise UserError(f"{value.name} has symbolic heads or head size {value.shape}; give them (dims=)")
        out[value.name] = np.zeros((batch, heads, 0, head_dim), dtype=np.float32)
    return out


def _int64(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.ascontiguousarray(values, dtype=np.int64)


def perplexity(
    sess: InferenceSession,
    windows: torch.LongTensor,
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[float, int]:
    """Perplexity over token ``windows`` [count, seq] (each scored on its own, mask of ones) and tokens predicted.

    ``progress(done, total)`` is called after each batch of windows.
    """
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise UserError(f"windows must be [count, sequence] with sequence >= 2, got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    total_nll, tokens = 0.0, 0
    count = windows.shape[0]
    for start in range(0, count, batch_size):
        batch = windows[start : start + batch_size]
        nll, predicted = metrics.next_token_nll(logits(sess, batch), batch)
        total_nll += nll
        tokens += predicted
        if progress is not None:
            progress(min(start + batch_size, count), count)
    if tokens == 0:
        raise UserError("no windows to evaluate: pass at least one window")
    return metrics.perplexity(total_nll, tokens), tokens


def latency_ms(
    sess: InferenceSession, batch: int, seq: int, warmup: int = 2, repeats: int = 10, seed: int = 0
) -> dict:
    """Wall time of one forward pass at [batch, seq] on random token ids: median and p90 over ``repeats`` runs."""
    if batch < 1 or seq < 1 or repeats < 1:
        raise UserError(f"latency needs batch, seq, repeats >= 1, got {batch}, {seq}, {repeats}")
    vocab = vocab_size(sess)
    ids = np.random.default_rng(seed).integers(0, vocab, size=(batch, seq), dtype=np.int64)
    for _ in range(warmup):
        logits(sess, ids)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        logits(sess, ids)
        times.append((time.perf_counter() - start) * 1000.0)
    return {
        "median_ms": float(np.median(times)),
        "p90_ms": float(np.percentile(times, 90)),
        "runs": repeats,
        "batch": batch,
        "seq": seq,
    }


def vocab_size(sess: InferenceSession) -> int:
    """The logits' last dim, which the exporter keeps static."""
    vocab = sess.get_outputs()[0].shape[-1]
    if not isinstance(vocab, int) or vocab < 1:
        raise UserError(f"the model's logits have no fixed vocabulary dim ({vocab!r}); re-lower it with this tool")
    return vocab
