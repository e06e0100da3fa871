"""Numbers shared by every runtime: next-token negative log-likelihood and perplexity."""

from __future__ import annotations

import math

import numpy as np
import torch


def next_token_nll(logits: torch.Tensor | np.ndarray, input_ids: torch.Tensor | np.ndarray) -> tuple[float, int]:
    """Sum of next-token NLL over a [batch, seq, vocab] logits tensor, and the number of predicted tokens.

    Per-token losses come from a float32 log-softmax (exact to ~1e-6 relative); their sum is taken in float64.
    Promoting the whole logits tensor to float64 would double a multi-hundred-MB allocation per batch.
    """
    logits_t = torch.as_tensor(logits)
    ids = torch.as_tensor(input_ids)
    shift_logits = logits_t[:, :-1, :].reshape(-1, logits_t.shape[-1]).float()
    shift_labels = ids[:, 1:].reshape(-1)
    nll = torch.nn.functional.cross_entropy(shift_logits, shift_labels, reduction="none")
    return float(nll.double().sum()), int(shift_labels.numel())


def perplexity(total_nll: float, tokens: int) -> float:
    """exp(mean NLL)."""
    return math.exp(total_nll / tokens)
