"""Magnitude pruning: zero the smallest |w| of each targeted matrix, unstructured or N:M.

Before -> after: same graph and shapes; targeted weights get exact zeros (per-matrix or per-row quantile, or N of every M
consecutive inputs of each output row). Invariant: sparsity 0 (or an all-zero schedule) leaves every weight untouched.
With ``uniform: false`` (unstructured only) one global threshold over all targeted matrices is used instead of one per
matrix, so layers end up with different sparsities whose weighted mean is the target.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from nexus_export.engine.pass_base import PassContext, option
from nexus_export.errors import UserError
from nexus_export.graph.program import Program
from nexus_export.memory import trim
from passes.shared.mask_plan import plan_targets
from passes.shared.masking import MaskConfig, MaskingPass, apply_mask, masking_changes
from passes.shared.sparsity import check_sparsity, nm_mask, parse_pattern, unstructured_mask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MagnitudeConfig(MaskConfig):
    per_row: bool = option(False, "magnitude, unstructured: the same sparsity in every row")
    uniform: bool = option(True, "unstructured: False = one global magnitude threshold across targeted matrices",
                           flag=False)

    def validate(self) -> None:
        super().validate()
        if self.pattern_obj() is not None and not self.uniform:
            raise UserError("uniform: false applies to unstructured sparsity only; N:M is uniform by construction")
        if self.layerwise == "owl" and not self.uniform:
            raise UserError("uniform: false (one global threshold) and layerwise owl (a sparsity per block) are two "
                            "ways to vary the sparsity; choose one")


class MagnitudePass(MaskingPass):
    name = "magnitude"
    config_class = MagnitudeConfig

    @staticmethod
    def keep_mask(weight: torch.Tensor, sparsity: float, pattern: str | None = None, layer: str = "") -> torch.Tensor:
        """The bool mask [out, in] keeping the largest |weight|: ``pattern`` N:M (along the input) or ``sparsity``
        of the whole matrix."""
        check_sparsity(sparsity)
        nm = parse_pattern(pattern)
        scores = weight.detach().abs().float()
        return nm_mask(scores, nm, layer) if nm else unstructured_mask(scores, sparsity)

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.config.layerwise == "owl"  # OWL measures outliers with activations

    def apply(self, program: Program, ctx: PassContext) -> tuple[Program, dict]:
        cfg: MagnitudeConfig = self.config
        pattern = cfg.pattern_obj()
        targets, plan_facts = plan_targets(program, ctx, cfg, calibrated=False)
        threshold = None
        if not cfg.uniform and targets:
            threshold = _global_threshold(program, targets)
        with torch.no_grad():
            for i, target in enumerate(targets):
                scores = program.weight(target.name, torch.float32).abs()
                if pattern is not None:
                    keep = nm_mask(scores, pattern, target.name)
                elif threshold is not None:
                    keep = scores > threshold
                else:
                    keep = unstructured_mask(scores, target.sparsity, per_row=cfg.per_row)
                apply_mask(program, target.name, keep)
                del scores, keep
                trim()  # one matrix's temporaries at a time, not a heap that grows with depth
                log.debug("magnitude: %d/%d %s", i + 1, len(targets), target.name)
        return program, {**masking_changes(program, targets, pattern), **plan_facts}


def _global_threshold(program: Program, targets) -> float:
    """The |w| below which the requested share of all targeted weights falls (weights weighted equally).

    Exact, one matrix in memory at a time: |w| as float32 bit patterns orders like the values, so the k-th smallest is
    found by a histogram of the high 16 bits over every matrix, then of the low 16 bits inside the chosen bucket.
    """
    wanted = int(sum(math.prod(program.store.shape(program.linear(t.name).weight)) * t.sparsity for t in targets))
    if wanted == 0:
        return -1.0

    def bits(name: str) -> torch.Tensor:
        return program.weight(name, torch.float32).abs().contiguous().view(torch.int32).reshape(-1).long()

    high = torch.zeros(1 << 16, dtype=torch.long)
    for t in targets:
        high += torch.bincount(bits(t.name) >> 16, minlength=1 << 16)
    below = torch.cumsum(high, 0)
    bucket = int(torch.searchsorted(below, wanted))  # first bucket whose cumulative count reaches ``wanted``
    rank = wanted - (int(below[bucket - 1]) if bucket else 0)
    low = torch.zeros(1 << 16, dtype=torch.long)
    for t in targets:
        b = bits(t.name)
        low += torch.bincount(b[(b >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
    value = (bucket << 16) | int(torch.searchsorted(torch.cumsum(low, 0), rank))
    return float(torch.tensor([value], dtype=torch.int32).view(torch.float32))
