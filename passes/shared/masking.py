"""Helpers every masking pass shares: writing a keep mask into a weight and describing the result for the report."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nexus_export.engine.pass_base import Pass, PassConfig, option
from nexus_export.errors import UserError
from nexus_export.graph.program import Program
from passes.shared.sparsity import NMPattern, Target, check_sparsity, nm_valid, parse_pattern, resolve_targets


@dataclass(frozen=True)
class MaskConfig(PassConfig):
    """Options every masking pass shares: how much, in what pattern, and where."""

    sparsity: float | None = option(None, "fraction of weights to zero in [0, 1) (default: N/M or 0.5)")
    pattern: str | None = option(None, "N:M pattern, N zeros in every M consecutive inputs (e.g. 2:4)")
    schedule: dict | None = option(None, 'JSON per role/block/module, e.g. \'{"layer_0-5": 0.3, "mlp_out": 0.5}\'')
    permute: bool = option(False, "N:M: first reorder the channels of the residual stream and the MLPs (an exact "
                                  "rewrite) so the groups keep more importance")
    layerwise: str = option("uniform", "unstructured: the same sparsity in every block (uniform, default) or OWL's "
                                       "per-block sparsity from the share of outlier weights (blocks with more are "
                                       "pruned less)", choices=("uniform", "owl"))
    owl_m: float = option(5.0, "owl: an outlier scores above this many times its block's mean (5)")
    owl_lambda: float = option(0.08, "owl: per-block sparsities within +-lambda of the target (0.08)")

    def validate(self) -> None:
        pattern = parse_pattern(self.pattern)
        if self.permute and pattern is None:
            raise UserError("--permute reorders channels so that N:M groups prune better; it needs --pattern N:M "
                            "(e.g. 2:4)")
        if self.layerwise not in ("uniform", "owl"):
            raise UserError(f"layerwise must be uniform or owl, got {self.layerwise!r}")
        if self.layerwise == "owl":
            if pattern is not None:
                raise UserError(f"--layerwise owl sets a sparsity per block, but N:M fixes every layer's at N/M "
                                f"({pattern} = {pattern.sparsity:.0%}); use unstructured sparsity (drop --pattern)")
            if self.schedule is not None:
                raise UserError("--layerwise owl chooses the per-block sparsities itself; drop --schedule")
            if not 0.0 < self.owl_lambda < 0.5:
                raise UserError(f"--owl-lambda must be in (0, 0.5), e.g. 0.08; got {self.owl_lambda}")
            if not self.owl_m > 0:
                raise UserError(f"--owl-m must be positive, e.g. 5; got {self.owl_m}")
        if self.sparsity is not None:
            check_sparsity(self.sparsity)
            if pattern is not None and abs(self.sparsity - pattern.sparsity) > 1e-9:
                raise UserError(f"sparsity {self.sparsity} contradicts pattern {pattern} (which means {pattern.sparsity}); "
                                f"drop --sparsity or set it to {pattern.sparsity}")
        if self.schedule is not None and not isinstance(self.schedule, dict):
            raise UserError("schedule must be a mapping like {\"layer_0-5\": 0.3, \"mlp_out\": 0.5}")

    def pattern_obj(self) -> NMPattern | None:
        return parse_pattern(self.pattern)

    def target_sparsity(self) -> float:
        if self.sparsity is not None:
            return self.sparsity
        pattern = self.pattern_obj()
        return pattern.sparsity if pattern is not None else 0.5

    def targets(self, program: Program) -> list[Target]:
        return resolve_targets(program.structure, self.target_sparsity(), self.schedule, self.pattern_obj())


class MaskingPass(Pass):
    """A pass that zeros weights in place: shapes stay, the schedule's targets are checked before any work."""

    def check(self, program: Program) -> None:
        self.config.targets(program)


def apply_mask(program: Program, name: str, keep: torch.Tensor) -> None:
    """Zero linear ``name``'s weights where ``keep`` ([out, in]) is False, in the weight's stored dtype."""
    weight = program.weight(name)
    program.set_weight(name, weight * keep.to(device=weight.device, dtype=weight.dtype))


def masking_changes(program: Program, targets: list[Target], pattern: NMPattern | None) -> dict:
    """The ``changes`` of a masking pass: per-layer achieved sparsity, N:M validity, and the overall sparsity."""
    per_layer = {}
    zeros = total = 0
    for t in targets:
        w = program.weight(t.name)
        z = int((w == 0).sum())
        zeros, total = zeros + z, total + w.numel()
        entry = {"role": t.role, "target": t.sparsity, "sparsity": round(z / w.numel(), 6)}
        if pattern is not None:
            entry["nm_valid"] = nm_valid(w, pattern)
        per_layer[t.name] = entry
    return {
        "pattern": str(pattern) if pattern else "unstructured",
        "targeted_layers": len(targets),
        "overall_sparsity": round(zeros / total, 6) if total else 0.0,
        "per_layer": per_layer,
    }
