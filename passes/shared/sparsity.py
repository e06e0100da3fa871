"""Sparsity patterns and targets shared by every masking pass.

Conventions:
- A score matrix has the weight's [out, in] orientation; masks are boolean "keep" masks of the same shape.
- ``N:M`` means N zeros in every group of M consecutive weights along the input (reduction) dimension of each output row,
  so its sparsity is N/M (2:4 -> 50%, 1:4 -> 25%, 4:8 -> 50%, 2:8 -> 25%).
- A schedule maps keys to sparsities: role names (attn_in, attn_out, mlp_in, mlp_out, lm_head, embed), block ranges
  (``layer_3``, ``layer_0-5``) and exact module names. The most specific key wins: module name > role > block range >
  the default sparsity. The default scope is every linear inside the decoder blocks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from nexus_export.errors import UserError
from nexus_export.graph.structure import ROLES, SHORTCUT, Structure

SCHEDULE_ROLES = ROLES + ("embed",)


@dataclass(frozen=True)
class NMPattern:
    n: int  # zeros per group
    m: int  # group size

    @property
    def sparsity(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(text: str | None) -> NMPattern | None:
    """``"2:4"`` -> NMPattern(2, 4); None or "unstructured" -> None. Anything else is a UserError."""
    if text is None or str(text).lower() in ("", "none", "unstructured"):
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not m:
        raise UserError(f"pattern {text!r} is not N:M; use e.g. 2:4 (N zeros in every M weights) or leave it out")
    n, mm = int(m.group(1)), int(m.group(2))
    if mm < 1 or n < 1 or n >= mm:
        raise UserError(f"pattern {text!r} needs 0 < N < M (N zeros in every group of M weights), e.g. 2:4 or 1:4")
    return NMPattern(n, mm)


def check_sparsity(value: float, what: str = "sparsity") -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} {value!r} is not a number; give a fraction in [0, 1), e.g. 0.5") from None
    if not 0.0 <= value < 1.0:
        raise UserError(f"{what} {value} is outside [0, 1); give a fraction such as 0.5 for 50%")
    return value


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Keep mask pruning exactly ``int(count * sparsity)`` lowest scores per matrix (or per row)."""
    if per_row:
        k = int(scores.shape[1] * sparsity)
        keep = torch.ones_like(scores, dtype=torch.bool)
        if k:
            idx = torch.topk(scores, k, dim=1, largest=False).indices
            keep.scatter_(1, idx, False)
        return keep
    k = int(scores.numel() * sparsity)
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        keep[torch.topk(scores.reshape(-1), k, largest=False).indices] = False
    return keep.view_as(scores)


def nm_mask(scores: torch.Tensor, pattern: NMPattern, layer: str = "") -> torch.Tensor:
    """Keep mask with exactly N pruned scores (the lowest) in every M consecutive inputs of each output row."""
    rows, cols = scores.shape
    if cols % pattern.m:
        where = f" of {layer}" if layer else ""
        raise UserError(f"input dimension {cols}{where} is not a multiple of {pattern.m}, so {pattern} cannot apply; "
                        f"exclude this layer with the schedule (e.g. {{\"{layer or 'layer name'}\": 0}})")
    groups = scores.reshape(rows, cols // pattern.m, pattern.m)
    idx = torch.topk(groups, pattern.n, dim=2, largest=False).indices
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(2, idx, False)
    return keep.reshape(rows, cols)


def nm_valid(weight: torch.Tensor, pattern: NMPattern) -> bool:
    """True when every group of M consecutive inputs of every row of an [out, in] weight has at least N zeros."""
    rows, cols = weight.shape
    if cols % pattern.m:
        return False
    zeros = (weight.reshape(rows, cols // pattern.m, pattern.m) == 0).sum(dim=2)
    return bool((zeros >= pattern.n).all())


@dataclass(frozen=True)
class Target:
    """A matrix to prune: a linear (or embedding) name, its role, and its target sparsity."""

    name: str
    role: str
    sparsity: float


_LAYER_KEY = re.compile(r"layer_(\d+)(?:-(\d+))?")


def resolve_targets(structure: Structure, sparsity: float, schedule: dict | None = None,
                    pattern: NMPattern | None = None) -> list[Target]:
    """The matrices a masking pass prunes and at what sparsity; zero-sparsity matrices are left out.

    Errors name the key that matched nothing, or the layer whose sparsity contradicts the N:M pattern.
    """
    sparsity = check_sparsity(sparsity)
    schedule = dict(schedule or {})
    candidates = {lin.name: (lin.role, lin.block) for lin in structure.linears.values() if lin.role != SHORTCUT}
    for emb in structure.embeddings:
        if structure.tied_embedding and structure.lm_head and structure.embeddings[emb] == structure.linears[structure.lm_head].weight:
            continue  # a tied embedding is the lm_head's matrix: the lm_head key governs it
        candidates[emb] = ("embed", None)
    n_blocks = len(structure.blocks)

    def matches(key: str, name: str, role: str, block: int | None) -> bool:
        if key == name:
            return True
        if key in SCHEDULE_ROLES:
            return key == role
        m = _LAYER_KEY.fullmatch(key)
        if m:
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            return block is not None and lo <= block <= hi
        return False

    for key, value in schedule.items():
        check_sparsity(value, f"schedule value for {key!r}")
        m = _LAYER_KEY.fullmatch(key)
        if m:
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo or hi >= n_blocks:
                raise UserError(f"schedule key {key!r} names blocks outside 0-{n_blocks - 1} (the model has {n_blocks})")
        if not any(matches(key, n, r, b) for n, (r, b) in candidates.items()):
            raise UserError(f"schedule key {key!r} matches no layer or role; use a role ({', '.join(SCHEDULE_ROLES)}), "
                            f"a block range like layer_0-{n_blocks - 1}, or a module name from `nexus-export inspect`")

    def specificity(key: str) -> int:
        return 3 if key in candidates else 2 if key in SCHEDULE_ROLES else 1

    targets = []
    for name, (role, block) in candidates.items():
        value = sparsity if block is not None else 0.0
        best = 0
        for key, v in schedule.items():
            if matches(key, name, role, block) and specificity(key) >= best:
                best, value = specificity(key), float(v)
        if value <= 0.0:
            continue
        if pattern is not None and abs(value - pattern.sparsity) > 1e-9:
            raise UserError(f"{name} would get sparsity {value} but pattern {pattern} means exactly {pattern.sparsity}; "
                            f"use sparsity {pattern.sparsity} or 0 for layers to skip")
        targets.append(Target(name=name, role=role, sparsity=value))
    return targets
