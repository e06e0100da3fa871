"""Helpers every masking pass shares: writing a keep mask into a weight and describing the result for the report."""

from __future__ import annotations

import torch

from nexus_export.program import Program

from .sparsity import NMPattern, Target, nm_valid


def apply_mask(weight: torch.Tensor, keep: torch.Tensor) -> None:
    """Zero the weights where ``keep`` is False, in place (through views, so Conv1D layouts work too)."""
    weight.mul_(keep.to(weight.dtype))


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
