"""Numbers shared by every runtime: next-token negative log-likelihood and perplexity."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

CHUNK = 128  # positions scored at a time: a log-softmax over the vocabulary for this many tokens is held at once
DIFF_VALUES = 2**20  # logits compared in float64 at a time (8 MiB)


def next_token_nll(logits: torch.Tensor | np.ndarray, input_ids: torch.Tensor | np.ndarray) -> tuple[float, int]:
    """Sum of next-token NLL over a [batch, seq, vocab] logits tensor, and the number of predicted tokens.

    Scored ``CHUNK`` positions of one sequence at a time (``token_nll``), so no copy of the whole logits tensor is
    made: at a 50k vocabulary one 512-token window's logits are already 100 MB.
    """
    logits_t = torch.as_tensor(logits)
    ids = torch.as_tensor(input_ids).to(logits_t.device)
    batch, seq = ids.shape
    total = 0.0
    for r in range(batch):
        for t0, t1 in prediction_chunks(seq):
            total += token_nll(logits_t[r, t0:t1], ids[r, t0 + 1:t1 + 1])
    return total, batch * max(seq - 1, 0)


def prediction_chunks(seq: int) -> Iterator[tuple[int, int]]:
    """``(t0, t1)`` spans of at most ``CHUNK`` positions of a ``seq``-token window: positions t0..t1-1 predict tokens
    t0+1..t1."""
    for t0 in range(0, seq - 1, CHUNK):
        yield t0, min(t0 + CHUNK, seq - 1)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed NLL of ``targets`` [n] under ``logits`` [n, vocab]: a float32 log-softmax (exact to ~1e-6 relative),
    summed in float64."""
    losses = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    return float(losses.double().sum())


def max_abs_diff(expected: torch.Tensor | np.ndarray, actual: torch.Tensor | np.ndarray) -> float:
    """max |expected - actual| of two [..., vocab] logits tensors, in float64 ``DIFF_VALUES`` at a time: the whole
    difference in float64 would hold four copies of the logits (two upcasts, the difference, its absolute value), 0.4
    GB for two 128-token windows at a 50k vocabulary, beside an onnxruntime session."""
    expected_t, actual_t = torch.as_tensor(expected), torch.as_tensor(actual)
    if expected_t.shape != actual_t.shape:
        raise ValueError(f"logit shapes differ: {tuple(expected_t.shape)} and {tuple(actual_t.shape)}")
    rows_e, rows_a = expected_t.reshape(-1, expected_t.shape[-1]), actual_t.reshape(-1, actual_t.shape[-1])
    step = max(1, DIFF_VALUES // max(1, rows_e.shape[1]))
    diff = 0.0
    for start in range(0, rows_e.shape[0], step):
        part = rows_e[start:start + step].double() - rows_a[start:start + step].to(rows_e.device).double()
        diff = max(diff, float(part.abs_().max()))
    return diff


def perplexity(total_nll: float, tokens: int) -> float:
    """exp(mean NLL)."""
    return math.exp(total_nll / tokens)
