"""Parity between a captured program and its lowered ONNX: the largest absolute logit difference.

The program's logits are computed once, before the onnxruntime session opens (``Program.logits``), so the run never
holds the torch side and the onnxruntime session at the same time."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from nexus_export import metrics
from runtimes import ort

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

log = logging.getLogger(__name__)


def max_abs_diff(expected: torch.Tensor, sess: InferenceSession, input_ids, attention_mask) -> float:
    """max |logits expected (from the program) - logits(onnxruntime)| on the same inputs (float64 difference)."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    mask = torch.as_tensor(attention_mask, dtype=torch.long)
    diff = metrics.max_abs_diff(expected, ort.logits(sess, ids, mask))
    log.info("parity on %s: max abs diff %.3g", tuple(ids.shape), diff)
    return diff
