"""The Optimal Brain Surgeon sweep SparseGPT and GPTQ share: one input's Hessian, factored once, and a column-by-column
pass over a weight that fixes each column (zeroed by a mask, rounded to a grid, or both) and spreads that column's
error over the columns not yet fixed.

The math follows the references (see shared algorithms notes): dead inputs get H_ii = 1 and zero columns; damping
percdamp * mean(diag H); Hinv = upper Cholesky factor of H^-1; blocks of ``blocksize`` columns with per-column error
propagation inside a block and a lazy batch update after it. Masked weights end exactly zero: a masked weight that
received compensation from an earlier column is set back to zero when its column comes, and that change is
compensated in turn (the SparseGPT paper's joint sweep), so the result is one OBS solution for "these weights zero,
the others on the grid".
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from nexus_export.engine.calibration import LEAN_HESSIAN_WIDTH
from nexus_export.errors import UserError
from passes.shared.quant_grid import Grid
from passes.shared.sparsity import NMPattern

log = logging.getLogger(__name__)

MAX_DAMPING_RETRIES = 6
# Columns a block of the in-place factoring works on: its temporaries are [D, FACTOR_BLOCK] (117 MB at a 70B model's
# 28,672 in float32), and a block this wide keeps the updates in large matrix products.
FACTOR_BLOCK = 1024
# The OBS math runs in float32, as in the references (the Hessian is accumulated in float64 and cast once). Measured on
# SmolLM2-135M 2:4 (default protocol): float32 64.28, float64 66.40 perplexity: the difference is mask choices flipping
# on near-ties, not accuracy, and float32 reproduces the reference's 64.43.
COMPUTE_DTYPE = torch.float32
ROWS = 1024  # rows of a weight a temporary covers where a whole [out, in] one would be 1 GB (a 70B down projection)


@dataclass
class HessianFactor:
    """What the sweep needs from one input's Hessian, computed once and shared by every linear reading that input
    (q, k and v; gate and up): the upper Cholesky factor of (H + damp I)^-1, the damping used (``damp``: its fraction
    of the mean diagonal; ``shift``: what was added to the diagonal), the dead inputs (H_ii = 0: never active, their
    weights are zeroed) and, for act-order, the column order (decreasing diag H; the factor is then of the permuted
    Hessian)."""

    upper: torch.Tensor
    damp: float
    dead: torch.Tensor
    perm: torch.Tensor | None = None
    shift: float = 0.0


def factor_hessian(hessian: torch.Tensor, percdamp: float, act_order: bool = False, layer: str = "",
                   consume: bool = False, scratch: Path | None = None) -> HessianFactor:
    """The Hessian of one input made ready for the sweep (see HessianFactor). ``hessian`` is not changed, unless
    ``consume``: the caller needs it no more, and a ``COMPUTE_DTYPE`` one becomes the factor in its own memory (no
    second [D, D] matrix: 3.3 GB at a 70B model's 28,672 inputs), its values kept for the damping retries in a
    temporary file under ``scratch`` (the default temporary folder when None). ``layer`` names the input in the error
    when no damping makes it positive definite."""
    diagonal = torch.diag(hessian)
    dead = diagonal == 0
    perm = torch.argsort(diagonal, descending=True) if act_order else None
    if consume and hessian.dtype == COMPUTE_DTYPE:
        backup = None
        try:
            backup = tempfile.TemporaryFile(dir=scratch)
            hessian.cpu().numpy().tofile(backup)  # raw bytes, written from the matrix itself (on a CPU)
        except OSError as exc:
            if backup is not None:
                backup.close()
            raise UserError(f"cannot write a copy of the Hessian{_of(layer)} to {scratch or tempfile.gettempdir()} "
                            f"({exc.strerror or exc}); free disk space there") from None
        with backup:
            upper, damp, shift = _factor(hessian.shape[0], _file_rows(backup, hessian), hessian, percdamp, dead,
                                         perm, layer)
    else:
        upper, damp, shift = _factor(hessian.shape[0], lambda i, j: hessian[i:j], _like(hessian), percdamp, dead,
                                     perm, layer)
    return HessianFactor(upper, damp, dead, perm, shift)


def upper_inverse_cholesky(hessian: torch.Tensor, percdamp: float, dead: torch.Tensor | None = None,
                           perm: torch.Tensor | None = None, layer: str = "") -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp I)^-1 in COMPUTE_DTYPE (of P H P^T when ``perm`` is given), with H_ii = 1
    for the ``dead`` inputs; damping grows tenfold on failure. Returns (factor, damp fraction). Beside ``hessian``, one
    [D, D] matrix in COMPUTE_DTYPE, and two temporaries while it is factored unless D is past LEAN_HESSIAN_WIDTH
    (3.3 GB each in float32 at a 70B model's 28,672: there it is factored in place). ``layer`` names the input in
    the error."""
    upper, damp, _ = _factor(hessian.shape[0], lambda i, j: hessian[i:j], _like(hessian), percdamp, dead, perm,
                             layer)
    return upper, damp


def _like(hessian: torch.Tensor) -> torch.Tensor:
    """The [D, D] matrix in COMPUTE_DTYPE, on the Hessian's device, that a factor of a Hessian kept whole is made in."""
    return torch.empty(hessian.shape, dtype=COMPUTE_DTYPE, device=hessian.device)


def _factor(n: int, rows: Callable[[int, int], torch.Tensor], out: torch.Tensor, percdamp: float,
            dead: torch.Tensor | None, perm: torch.Tensor | None, layer: str) -> tuple[torch.Tensor, float, float]:
    """The damping loop of ``upper_inverse_cholesky``: each try fills ``out`` from ``rows(i, j)`` (rows i..j of H)
    and factors it in place. Returns (factor, damp fraction, diagonal shift)."""
    damp = percdamp
    for _ in range(MAX_DAMPING_RETRIES):
        factor = _fill(n, rows, out, dead, perm)
        shift = damp * float(torch.diag(factor).mean())
        factor.diagonal().add_(shift)  # H + damp I without an identity beside it
        if inverse_upper_cholesky_(factor):
            return factor, damp, shift
        log.warning("OBS sweep: Cholesky failed with damping %.3g; retrying with %.3g", damp, damp * 10)
        damp *= 10
    raise UserError(f"the Hessian{_of(layer)} is not positive definite even with damping {damp / 10:.3g} of its mean "
                    f"diagonal; raise --percdamp (now {percdamp:g}) or calibrate on more samples")


def _of(layer: str) -> str:
    return f" of the input of {layer}" if layer else ""


def _fill(n: int, rows: Callable[[int, int], torch.Tensor], out: torch.Tensor, dead: torch.Tensor | None,
          perm: torch.Tensor | None) -> torch.Tensor:
    """P H P^T in COMPUTE_DTYPE (H when ``perm`` is None) with 1 on the diagonal of the dead inputs, written into
    ``out`` FACTOR_BLOCK rows of H at a time: no permuted or converted [D, D] copy beside it."""
    where = torch.argsort(perm) if perm is not None else None  # row i of H is row where[i] of P H P^T
    for i in range(0, n, FACTOR_BLOCK):
        j = min(i + FACTOR_BLOCK, n)
        block = rows(i, j).to(COMPUTE_DTYPE)
        if perm is None:
            out[i:j] = block
        else:
            out.index_copy_(0, where[i:j], block.index_select(1, perm))
    if dead is not None and bool(dead.any()):
        out.diagonal()[dead if perm is None else dead[perm]] = 1.0
    return out


def _file_rows(file, like: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    """rows(i, j) of the matrix ``like`` [D, D] whose bytes ``file`` holds, read into a buffer of their own."""
    n = like.shape[1]
    size = like.element_size() * n

    def rows(i: int, j: int) -> torch.Tensor:
        block = torch.empty(j - i, n, dtype=like.dtype)
        file.seek(i * size)
        if file.readinto(memoryview(block.numpy()).cast("B")) != (j - i) * size:
            raise OSError("the Hessian's temporary copy is short")
        return block.to(like.device)

    return rows


def inverse_upper_cholesky_(a: torch.Tensor) -> bool:
    """a := U, the upper triangular factor with a^-1 = U^T U; False when ``a`` (symmetric) is not positive definite.
    Through torch (two [D, D] temporaries), or, past LEAN_HESSIAN_WIDTH, in blocks on the tensor's own memory
    (``blocked_inverse_upper_cholesky_``: temporaries of a block column only; the result differs from torch's by
    rounding)."""
    if a.shape[0] > LEAN_HESSIAN_WIDTH:
        return blocked_inverse_upper_cholesky_(a)
    lower, info = torch.linalg.cholesky_ex(a)
    if int(info):
        return False
    a.copy_(torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True))
    return True


def blocked_inverse_upper_cholesky_(a: torch.Tensor, block: int = FACTOR_BLOCK) -> bool:
    """``inverse_upper_cholesky_`` in place, ``block`` columns at a time. If A = V V^T with V upper triangular (a
    Cholesky factorization taken from the bottom-right corner up), then A^-1 = V^-T V^-1, so U = V^-1. First a := V,
    block columns from the right: the diagonal block's own factor, the block column above it solved against it, and
    the rank-``block`` update of what lies above and to the left (``addmm_`` on the matrix's own memory); then
    a := V^-1, block columns from the left. Beside ``a``, tensors of one block column ([D, block]) at most."""
    n = a.shape[0]
    starts = range(0, n, block)
    for j in reversed(starts):
        e = min(j + block, n)
        lower, info = torch.linalg.cholesky_ex(a[j:e, j:e].flip(0, 1))
        if int(info):
            return False
        corner = lower.flip(0, 1)  # upper triangular, its block of A = corner corner^T
        a[j:e, j:e].copy_(corner)
        a[e:, j:e].zero_()  # below the diagonal: what the updates left there
        if j:
            above = torch.linalg.solve_triangular(corner.T, a[:j, j:e], upper=False, left=False)  # B corner^-T
            a[:j, j:e].copy_(above)
            a[:j, :j].addmm_(above, above.T, alpha=-1.0)
            del above
    eye = torch.eye(block, dtype=a.dtype, device=a.device)
    for j in starts:
        e = min(j + block, n)
        inverse = torch.linalg.solve_triangular(a[j:e, j:e], eye[: e - j, : e - j], upper=True)
        if j:  # [[T11^-1, -T11^-1 T12 T22^-1], [0, T22^-1]], T11^-1 already in place
            a[:j, j:e].copy_(-(a[:j, :j] @ a[:j, j:e]) @ inverse)
        a[j:e, j:e].copy_(inverse)
    return True


@dataclass
class SweepResult:
    weight: torch.Tensor  # [out, in], COMPUTE_DTYPE, columns in the stored order
    scales: torch.Tensor | None = None  # [out, in / group_size] when a grid was given
    zeros: torch.Tensor | None = None
    error: float = 0.0  # reconstruction_error(weight before, weight after, H), from the sweep's own terms


def obs_sweep(weight: torch.Tensor, factor: HessianFactor, *, sparsity: float = 0.0,
              pattern: NMPattern | None = None, keep: torch.Tensor | None = None, grid: Grid | None = None,
              blocksize: int = 128) -> SweepResult:
    """Fix every column of ``weight`` [out, in] in turn and compensate in the columns after it.

    Which weights become zero: ``sparsity`` (the lowest w^2 / d^2 of each block of columns) or ``pattern`` (N of every
    M columns, chosen on the updated weights), and/or ``keep`` (a fixed mask: False = zero, e.g. an earlier pruning).
    ``grid``: the other weights are rounded to it; each group's scale is taken when the group starts, on the updated
    weights without the masked ones, or, with act-order (``factor.perm``), from the whole weight before the sweep so
    that groups stay contiguous in the stored layout.

    The result's ``error`` is the layer's reconstruction error, taken without the Hessian (which the caller may have
    given away to the factor): the sweep moves the weight by -E U (E the columns' scaled errors, U the factor), so
    with U^T U = (H + shift I)^-1 the damped error is ||E||^2 exactly, and the undamped one ||E||^2 - shift ||dW||^2.
    """
    perm = factor.perm
    if perm is not None and (sparsity or pattern is not None):
        raise UserError("act-order cannot choose a mask in the same sweep (N:M groups and mask blocks follow the stored "
                        "column order); prune first, or quantize without act-order")
    W = weight.detach().to(COMPUTE_DTYPE, copy=True)  # the only [out, in] copy: permuted in place, rows at a time
    rows, cols = W.shape
    W[:, factor.dead] = 0.0
    if pattern is not None and cols % pattern.m:
        raise UserError(f"input dimension {cols} is not a multiple of {pattern.m}; {pattern} cannot apply")
    scales = zeros = None
    if grid is not None:
        g = grid.group_size
        if cols % g:
            raise UserError(f"group size {g} does not divide the input width {cols}")
        blocksize = max(g, blocksize - blocksize % g)  # every group inside one block of columns
        if perm is not None:
            scales, zeros = grid.group_params(W, keep)
        else:
            scales = torch.empty(rows, cols // g, dtype=COMPUTE_DTYPE, device=W.device)
            zeros = torch.empty_like(scales)
    if perm is not None:
        _permute_columns_(W, perm)
        keep = keep[:, perm] if keep is not None else None
    Hinv = factor.upper
    damped = 0.0  # ||E||^2

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if pattern is None and sparsity:
            scores = W1 ** 2 / d.reshape(1, -1) ** 2
            k = int(scores.numel() * sparsity)
            prune_mask = torch.zeros(scores.numel(), dtype=torch.bool, device=W.device)
            if k:
                prune_mask[torch.topk(scores.reshape(-1), k, largest=False).indices] = True
            prune_mask = prune_mask.view_as(scores)
        else:
            prune_mask = torch.zeros_like(W1, dtype=torch.bool)
        if keep is not None:
            prune_mask |= ~keep[:, i1:i2]
        for i in range(count):
            w = W1[:, i]
            if pattern is not None and i % pattern.m == 0:
                nm = slice(i, i + pattern.m)
                prune_mask[:, nm] |= _nm_mask(W1[:, nm], d[nm], pattern)
            q = w.clone()
            q[prune_mask[:, i]] = 0.0
            if grid is not None:
                if perm is None:
                    group = (i1 + i) // grid.group_size
                    if (i1 + i) % grid.group_size == 0:
                        span = slice(i, i + grid.group_size)
                        pruned = prune_mask[:, span]
                        if pattern is not None:  # N:M groups after this one are not chosen yet: guess them now
                            pruned = pruned | _nm_mask(W1[:, span], d[span], pattern)
                        scales[:, group], zeros[:, group] = grid.params(W1[:, span] * ~pruned)
                else:
                    group = int(perm[i1 + i]) // grid.group_size
                q = grid.quantize(q, scales[:, group], zeros[:, group])  # a zero stays exactly zero
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)  # no [out, in] temporary (1 GB for a 70B down proj)
        damped += float(Err1.double().pow(2).sum())

    if perm is not None:
        _permute_columns_(W, torch.argsort(perm))
    moved = 0.0  # ||dW||^2 over the live inputs (a dead input's weight is zeroed and weighs nothing in H)
    for i in range(0, rows, ROWS):
        delta = W[i:i + ROWS].double() - weight[i:i + ROWS].detach().to(W.device, torch.float64)
        delta[:, factor.dead] = 0.0
        moved += float(delta.pow(2).sum())
    return SweepResult(W, scales, zeros, (damped - factor.shift * moved) / 2.0)


def _permute_columns_(w: torch.Tensor, index: torch.Tensor) -> None:
    """w := w[:, index], ROWS rows at a time (no [out, in] copy beside it)."""
    for i in range(0, w.shape[0], ROWS):
        w[i:i + ROWS] = w[i:i + ROWS].index_select(1, index)


def _nm_mask(W: torch.Tensor, d: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """The sweep's N:M rule on ``W`` [rows, k*M] as it stands (True = pruned): the N lowest w^2 / d^2 of every M
    columns. Applied to one group of M when the sweep reaches it, and ahead of time to a quantization group's span so
    that its scale is fitted to the weights likely to stay rather than to ones about to be zeroed."""
    rows, cols = W.shape
    if cols % pattern.m:
        return torch.zeros_like(W, dtype=torch.bool)
    scores = (W ** 2 / d.reshape(1, -1) ** 2).reshape(rows, cols // pattern.m, pattern.m)
    low = torch.topk(scores, pattern.n, dim=2, largest=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(2, low, True).reshape(rows, cols)


def reconstruction_error(old: torch.Tensor, new: torch.Tensor, hessian: torch.Tensor, rows: int = 1024) -> float:
    """||(W' - W) X||^2 / n for H = (2/n) X^T X: the sum over rows of d H d^T / 2 with d = W' - W, taken ``rows``
    rows at a time (no [out, in] temporary) in the Hessian's dtype and summed in float64."""
    total = 0.0
    for i in range(0, old.shape[0], rows):
        delta = new[i:i + rows].to(hessian.dtype) - old[i:i + rows].detach().to(hessian.dtype)
        total += float(((delta @ hessian) * delta).sum(dtype=torch.float64))
    return total / 2.0
