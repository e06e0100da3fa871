"""Helpers every masking pass shares: writing a keep mask into a weight and describing the result for the report."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nexus_export.errors import UserError
from nexus_export.passbase import Pass, PassConfig
from nexus_export.program import Program

from .sparsity import NMPattern, Target, check_sparsity, nm_valid, parse_pattern, resolve_targets


@dataclass(frozen=True)
class MaskConfig(PassConfig):
    """Options every masking pass shares: how much, in what pattern, and where."""

    sparsity: float | None = None  # default: the pattern's N/M, or 0.5
    pattern: str | None = None  # "2:4", "4:8", ...; None = unstructured
    schedule: dict | None = None  # per role / block / module sparsities (see passes.sparsity)

    def validate(self) -> None:
        pattern = parse_pattern(self.pattern)
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
