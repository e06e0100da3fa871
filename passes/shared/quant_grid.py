"""The integer grids weight-only quantization rounds to: b bits, one scale (and zero point) per row and group of inputs.

A group is ``group_size`` consecutive inputs of one output row; its weights become ``scale * (code - zero)`` with
integer codes in [0, 2^b - 1]. Symmetric grids fix ``zero`` at 2^(b-1) (onnxruntime's MatMulNBits default, so no zero
points are stored); asymmetric grids take the integer zero point that fits the group's range. Either grid holds 0
exactly (code == zero), so a pruned weight stays exactly zero after quantization. Symmetric scales are onnxruntime's
round-to-nearest convention: the group's weight of largest magnitude maps exactly to code 0 (scale = that weight /
-2^(b-1), so a scale may be negative), which uses all 2^b codes; GPTQ's reference range [-max|w|, max|w|] over 2^b - 1
steps is coarser and clips the positive end.
Asymmetric grids span the group's [min, max] (always including 0) in 2^b - 1 steps, as GPTQ's reference does.
With ``clip_search`` (GPTQ's default here, after the idea of its reference quantizer's ``mse`` option) each group's
range is also tried shrunk by 0.99, 0.98, ..., 0.80, and the one whose rounding error (sum |w - q|^2.4) is least is
kept: clipping the one or two largest weights of a group buys a finer step for all the others. Measured on
SmolLM2-135M (dense, 4 bits, groups of 32, act-order): perplexity 35.28 -> 34.74, other text 23.17 -> 21.84.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nexus_export.errors import UserError
from nexus_export.weights.store import COMPANION

BITS = (4, 8)
GROUP_SIZES = (16, 32, 64, 128, 256)
CLIP_SHRINKS = tuple(1.0 - 0.01 * i for i in range(1, 21))  # ranges tried by clip_search, beside the whole one
CLIP_NORM = 2.4
SCALE_SUFFIX, ZERO_SUFFIX = COMPANION + "qscale", COMPANION + "qzero"  # kept beside the weight in the store


@dataclass(frozen=True)
class Grid:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    clip_search: bool = False  # each group's range shrunk by the factor (1.00 ... 0.80) of least error

    def validate(self) -> None:
        if self.bits not in BITS:
            raise UserError(f"quantization bits must be 4 or 8, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise UserError(f"group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size}")

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point [rows] (float32; zero holds whole numbers) of the grid for the weights ``w`` [rows, g]."""
        w = w.float()
        scale, zero = self._params(w, 1.0)
        if not self.clip_search:
            return scale, zero
        best = self._error(w, scale, zero)
        for shrink in CLIP_SHRINKS:
            s, z = self._params(w, shrink)
            err = self._error(w, s, z)
            better = err < best
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
        return scale, zero

    def _error(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Rounding error of each row of ``w`` on its grid: sum |w - q|^2.4 (the norm GPTQ's reference searches by,
        weighing the large errors of clipped weights more than a square would)."""
        q = self.quantize(w, scale.unsqueeze(1), zero.unsqueeze(1))
        return (q - w).abs().pow(CLIP_NORM).sum(dim=1)

    def _params(self, w: torch.Tensor, shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid over ``w``'s range times ``shrink`` (1: the whole range)."""
        w = w * shrink if shrink != 1.0 else w
        if self.sym:  # the weight of largest magnitude lands exactly on the grid's end code 0 (-2^(b-1))
            half = (self.maxq + 1) // 2
            extreme = w.gather(1, w.abs().argmax(dim=1, keepdim=True))[:, 0]
            scale = torch.where(extreme == 0, 1.0, extreme / -half)
            return scale, torch.full_like(scale, float(half))
        lo = torch.clamp(w.min(dim=1).values, max=0.0)
        hi = torch.clamp(w.max(dim=1).values, min=0.0)
        empty = (lo == 0) & (hi == 0)
        lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
        scale = (hi - lo) / self.maxq
        return scale, torch.round(-lo / scale)

    def quantize(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """``x`` rounded to the grid and dequantized (same shape; ``scale``/``zero`` broadcast against it)."""
        return scale * (self.codes(x, scale, zero) - zero)

    def codes(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """The integer codes of ``x`` (as floats) on the grid."""
        return torch.clamp(torch.round(x / scale) + zero, 0, self.maxq)

    def group_params(self, w: torch.Tensor, keep: torch.Tensor | None = None, rows: int = 1024
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales and zero points [rows, cols / group_size] of every group of ``w`` [rows, cols] (static groups; the
        weights where ``keep`` is False count as zero), ``rows`` rows at a time: the clip search's temporaries are
        each the size of what it searches (1 GB apiece for a whole 70B down projection in float32), and the groups
        are independent."""
        n, cols = w.shape
        scales = torch.empty(n, cols // self.group_size, dtype=torch.float32, device=w.device)
        zeros = torch.empty_like(scales)
        for i in range(0, n, rows):
            part = w[i:i + rows] if keep is None else w[i:i + rows] * keep[i:i + rows]
            scale, zero = self.params(part.reshape(-1, self.group_size))
            scales[i:i + rows], zeros[i:i + rows] = scale.reshape(part.shape[0], -1), zero.reshape(part.shape[0], -1)
        return scales, zeros

    def layer_codes(self, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        """uint8 codes [rows, cols] of a whole weight on its group grids."""
        expand = lambda t: t.repeat_interleave(self.group_size, dim=1)  # noqa: E731
        return self.codes(w.float(), expand(scales), expand(zeros)).to(torch.uint8)

    def dequantize(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        """The float32 weight [rows, cols] that ``codes`` on these group grids stand for."""
        expand = lambda t: t.repeat_interleave(self.group_size, dim=1)  # noqa: E731
        return expand(scales) * (codes.float() - expand(zeros))

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym, "clip_search": self.clip_search}


def grid_names(weight_param: str) -> tuple[str, str]:
    """Store names of the scales and zero points that go with a quantized weight."""
    return weight_param + SCALE_SUFFIX, weight_param + ZERO_SUFFIX


def check_groups(program, group_size: int, names: list[str] | None = None) -> None:
    """Refuse a group size that does not divide the input width of a linear to be quantized (named), before work."""
    linears = [program.linear(n) for n in names] if names is not None else program.structure.in_blocks()
    for lin in linears:
        if lin.in_features % group_size:
            raise UserError(f"group size {group_size} does not divide the input width {lin.in_features} of "
                            f"{lin.name}; choose a group size that divides every layer's input width (e.g. 32)")
