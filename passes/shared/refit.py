"""The kept weights of a pruned linear re-solved for the layer's least-squares optimum under its mask.

SparseGPT's sweep fixes columns left to right and compensates each one's error only in the columns after it, so for
the mask it chose its weights are not the best ones: the best are, row by row, w_S = argmin (w - w0) H (w - w0)^T over
the weights w that are zero off the row's kept set S (H the layer's damped Hessian, w0 the weight before pruning).
Every row is an independent positive definite system on its own kept set; they are solved together by preconditioned
conjugate gradients (a Jacobi preconditioner, per-row step sizes) started from the sweep's weights: each step costs
one [rows, in] x [in, in] product, no system is ever formed, the mask never changes (an N:M weight stays valid).
"""

from __future__ import annotations

import torch


def refit_masked(original: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor, damp: float, steps: int,
                 rows: int = 1024) -> torch.Tensor:
    """``pruned`` [out, in] with its nonzero weights moved towards argmin tr((W - original) H' (W - original)^T), H' =
    ``hessian`` + ``damp`` * mean(diag H) I, by ``steps`` conjugate-gradient steps; its zeros stay zero. Computed in the
    Hessian's dtype, ``rows`` rows at a time (the rows are independent: the result does not depend on ``rows``);
    returned in ``pruned``'s dtype."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    lam = damp * float(hessian.diagonal().mean())
    diag = (hessian.diagonal() + lam).clamp_min(torch.finfo(hessian.dtype).tiny)
    out = torch.empty_like(pruned)
    for i in range(0, pruned.shape[0], rows):
        chunk = _refit_rows(original[i:i + rows].to(hessian.dtype), pruned[i:i + rows].to(hessian.dtype, copy=True),
                            hessian, lam, diag, steps)
        out[i:i + rows] = chunk.to(pruned.dtype)
    return out


def _refit_rows(w0: torch.Tensor, w: torch.Tensor, hessian: torch.Tensor, lam: float, diag: torch.Tensor,
                steps: int) -> torch.Tensor:
    """Preconditioned CG on every row of ``w`` at once; the operator of a row is v -> keep * (v H + lam v)."""
    keep = w != 0

    def apply(v: torch.Tensor) -> torch.Tensor:
        return (v @ hessian).add_(v, alpha=lam).mul_(keep)

    residual = apply(w0 - w)  # minus half the gradient, on the kept weights
    z = residual / diag
    direction = z.clone()
    rz = (residual * z).sum(dim=1)
    for _ in range(steps):
        if not bool((rz > 0).any()):  # every row solved exactly
            break
        a_dir = apply(direction)
        curvature = (direction * a_dir).sum(dim=1)
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(torch.finfo(w.dtype).tiny), 0.0)
        w.addcmul_(alpha.unsqueeze(1), direction)
        residual.addcmul_(alpha.unsqueeze(1), a_dir, value=-1.0)
        z = residual / diag
        rz_next = (residual * z).sum(dim=1)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(torch.finfo(w.dtype).tiny), 0.0)
        direction = z.add_(direction * beta.unsqueeze(1))
        rz = rz_next
    return w
