"""OWL, outlier-weighted layer-wise sparsity (Yin et al., 2023): blocks with more outliers are pruned less.

A block's outlier share D_l is the fraction of its targeted weights whose Wanda score |W_ij| * ||X_j|| exceeds ``m``
times the mean score of the block (scores of the dense model, every targeted linear of the block together). The shares
are mapped linearly onto [0, 2 lambda], centred, and subtracted from the target: s_l = s + mean(r) - r_l with
r_l = 2 lambda (D_l - min D) / (max D - min D). Every block has the same targeted linears, so the overall sparsity is
the target's; the spread is 2 lambda at most.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from nexus_export.errors import UserError
from nexus_export.graph.program import Program
from passes.shared.sparsity import Target

log = logging.getLogger(__name__)


def outlier_share(program: Program, names: list[str], norms: dict[str, torch.Tensor], m: float) -> float:
    """The share of the Wanda scores of linears ``names`` (one block's) above ``m`` times their common mean."""
    total = count = 0.0
    for name in names:
        scores = program.weight(name, torch.float32).abs() * norms[name].float().reshape(1, -1)
        total, count = total + float(scores.sum(dtype=torch.float64)), count + scores.numel()
    threshold = m * total / count
    above = sum(int((program.weight(n, torch.float32).abs() * norms[n].float().reshape(1, -1) > threshold).sum())
                for n in names)
    return above / count


def block_sparsities(shares: dict[int, float], sparsity: float, lam: float) -> dict[int, float]:
    """OWL's per-block sparsities from the blocks' outlier shares (equal shares: the target everywhere)."""
    low, high = min(shares.values()), max(shares.values())
    if high - low <= 0:
        return {k: sparsity for k in shares}
    r = {k: 2 * lam * (d - low) / (high - low) for k, d in shares.items()}
    mean = sum(r.values()) / len(r)
    out = {k: sparsity + mean - v for k, v in r.items()}
    if min(out.values()) < 0 or max(out.values()) >= 1:
        raise UserError(f"OWL's per-block sparsities reach {min(out.values()):.3f}-{max(out.values()):.3f}, outside "
                        f"[0, 1); lower --owl-lambda (now {lam}) or move the sparsity (now {sparsity}) away from 0 "
                        "and 1")
    return out


def owl_targets(program: Program, targets: list[Target], norms: dict[str, torch.Tensor], m: float, lam: float
                ) -> tuple[list[Target], dict]:
    """The targets with OWL's per-block sparsity in place of the uniform one, and the report's facts."""
    by_block: dict[int, list[str]] = {}
    for t in targets:
        by_block.setdefault(program.linear(t.name).block, []).append(t.name)
    shares = {k: outlier_share(program, names, norms, m) for k, names in sorted(by_block.items())}
    sparsity = targets[0].sparsity
    chosen = block_sparsities(shares, sparsity, lam)
    log.info("owl: per-block sparsity %s", ", ".join(f"{k}:{v:.3f}" for k, v in chosen.items()))
    facts = {"method": "owl", "m": m, "lambda": lam,
             "outlier_share": {str(k): round(v, 6) for k, v in shares.items()},
             "block_sparsity": {str(k): round(v, 6) for k, v in chosen.items()}}
    return [replace(t, sparsity=chosen[program.linear(t.name).block]) for t in targets], facts
