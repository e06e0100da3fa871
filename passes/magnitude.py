"""Magnitude pruning: zero the smallest |w| of each targeted matrix, unstructured or N:M.

Before -> after: same graph and shapes; targeted weights get exact zeros (per-matrix or per-row quantile, or N of every M
consecutive inputs of each output row). Invariant: sparsity 0 (or an all-zero schedule) leaves every weight untouched.
With ``uniform: false`` (unstructured only) one global threshold over all targeted matrices is used instead of one per
matrix, so layers end up with different sparsities whose weighted mean is the target.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from nexus_export.errors import UserError
from nexus_export.passbase import PassContext
from nexus_export.program import Program

from .masking import MaskConfig, MaskingPass, apply_mask, masking_changes
from .sparsity import nm_mask, unstructured_mask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MagnitudeConfig(MaskConfig):
    per_row: bool = False  # unstructured: prune the same fraction of every output row
    uniform: bool = True  # unstructured: False = one global magnitude threshold across targeted matrices

    def validate(self) -> None:
        super().validate()
        if self.pattern_obj() is not None and not self.uniform:
            raise UserError("uniform: false applies to unstructured sparsity only; N:M is uniform by construction")


class MagnitudePass(MaskingPass):
    name = "magnitude"
    config_class = MagnitudeConfig

    def apply(self, program: Program, ctx: PassContext) -> tuple[Program, dict]:
        cfg: MagnitudeConfig = self.config
        pattern = cfg.pattern_obj()
        targets = cfg.targets(program)
        threshold = None
        if not cfg.uniform and targets:
            threshold = _global_threshold(program, targets)
        with torch.no_grad():
            for i, target in enumerate(targets):
                weight = program.weight(target.name)
                scores = weight.detach().abs().float()
                if pattern is not None:
                    keep = nm_mask(scores, pattern, target.name)
                elif threshold is not None:
                    keep = scores > threshold
                else:
                    keep = unstructured_mask(scores, target.sparsity, per_row=cfg.per_row)
                apply_mask(weight, keep)
                log.debug("magnitude: %d/%d %s", i + 1, len(targets), target.name)
        return program, masking_changes(program, targets, pattern)


def _global_threshold(program: Program, targets) -> float:
    """The |w| below which the requested share of all targeted weights falls (weights weighted equally)."""
    total = sum(program.weight(t.name).numel() for t in targets)
    wanted = int(sum(program.weight(t.name).numel() * t.sparsity for t in targets))
    if wanted == 0:
        return -1.0
    values = torch.cat([program.weight(t.name).detach().abs().float().reshape(-1) for t in targets])
    assert values.numel() == total
    return float(torch.kthvalue(values, wanted).values)
