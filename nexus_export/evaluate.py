"""Evaluation in PyTorch: perplexity of a Program on token windows (the onnxruntime twin lives in runtimes/)."""

from __future__ import annotations

import torch

from .metrics import next_token_nll, perplexity
from .program import Program
from .progress import Progress


@torch.no_grad()
def program_perplexity(program: Program, windows: torch.Tensor, batch_size: int = 4,
                       what: str = "perplexity") -> tuple[float, int]:
    """exp(mean next-token NLL) over ``windows`` [n, seq_len], and the number of predicted tokens."""
    module = program.module()
    progress = Progress(what, len(windows), "windows")
    total_nll, tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start:start + batch_size]
        nll, count = next_token_nll(module(ids, torch.ones_like(ids)), ids)
        total_nll, tokens = total_nll + nll, tokens + count
        progress.update(min(start + batch_size, len(windows)))
    return perplexity(total_nll, tokens), tokens
