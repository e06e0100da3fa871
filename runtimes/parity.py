"""Parity between a captured program and its lowered ONNX: the largest absolute logit difference.

The program's logits are computed once, before the onnxruntime session opens (``Program.logits``), so the run never
holds the torch side and the onnxruntime session at the same time."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from runtimes import ort

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

log = logging.getLogger(__name__)


def max_abs_diff(expected: torch.Tensor, sess: InferenceSession, input_ids, attention_mask) -> float:
    """max |logits expected (from the program) - logits(onnxruntime)| on the same inputs (float64 difference)."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    mask = torch.as_tensor(attention_mask, dtype=torch.long)
    actual = ort.logits(sess, ids, mask)
    if tuple(expected.shape) != actual.shape:
        raise ValueError(f"logit shapes differ: program {tuple(expected.shape)}, onnxruntime {actual.shape}")
    diff = float(np.max(np.abs(expected.double().numpy() - actual.astype(np.float64))))
    log.info("parity on %s: max abs diff %.3g", tuple(ids.shape), diff)
    return diff
