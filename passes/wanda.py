"""Wanda: prune by |W_ij| * ||X_j||_2, comparing weights within each output row; no weight update.

Before -> after: same graph and shapes; targeted weights get exact zeros. Activation norms come from the calibration
engine, block by block, so each block is scored on inputs produced by the already-pruned blocks before it.
Unstructured: the int(cols * s) lowest scores of every row. N:M: the N lowest scores of every M consecutive inputs.
Invariant: with all-equal activation norms the mask equals per-row magnitude pruning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nexus_export.engine.pass_base import PassContext
from nexus_export.graph.program import Program
from passes.shared.calibrated import CalibratedConfig, run_calibrated
from passes.shared.masking import MaskingPass, apply_mask
from passes.shared.sparsity import NMPattern, Target, nm_mask, unstructured_mask


@dataclass(frozen=True)
class WandaConfig(CalibratedConfig):
    pass


MASK_ROWS = 1024  # rows scored at a time: each row's choice is its own, and float64 scores of a whole MLP weight,
# with topk's values and indices beside them (about 3x the weight in float64), were the pass's peak on the 11-block
# 1.1B-wide checkpoint (deeper ones peak in the statistics forward beside a full budget)


def wanda_mask(weight: torch.Tensor, column_norms: torch.Tensor, sparsity: float,
               pattern: NMPattern | None, layer: str = "") -> torch.Tensor:
    """Keep mask from Wanda scores |W| * ||X_j|| (per row, or N:M), scored in float64 MASK_ROWS rows at a time."""
    norms = column_norms.reshape(1, -1).double()
    keep = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
    for start in range(0, weight.shape[0], MASK_ROWS):
        scores = weight[start:start + MASK_ROWS].detach().abs().double() * norms
        keep[start:start + MASK_ROWS] = nm_mask(scores, pattern, layer) if pattern is not None else \
            unstructured_mask(scores, sparsity, per_row=True)
    return keep


class WandaPass(MaskingPass):
    name = "wanda"
    config_class = WandaConfig
    needs_calibration = True
    keeps_blocks = True

    def apply(self, program: Program, ctx: PassContext) -> tuple[Program, dict]:
        cfg: WandaConfig = self.config
        pattern = cfg.pattern_obj()

        def prune(target: Target, stats) -> dict:
            norms = stats.column_norms()
            weight = program.weight(target.name, device=norms.device)
            apply_mask(program, target.name, wanda_mask(weight, norms, target.sparsity, pattern, target.name))
            return {}

        return program, run_calibrated(program, ctx, cfg, prune, hessian=False, what="wanda")
