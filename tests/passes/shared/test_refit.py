"""The masked refit: the layer's least-squares optimum for a fixed mask, row by row, the mask kept."""

import itertools

import pytest
import torch

from passes.shared.refit import refit_masked
from passes.shared.sparsity import NMPattern, nm_mask, nm_valid


def problem(rows=12, cols=32, tokens=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=gen, dtype=torch.float64) / cols ** 0.5 + torch.eye(cols, dtype=torch.float64)
    x = torch.randn(tokens, cols, generator=gen, dtype=torch.float64) @ mixing
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    return w, 2.0 / tokens * (x.t() @ x)


def closed_form(w0, keep, h, lam):
    """Row by row: the kept weights solve H'_SS w_S = (w0 H')_S, with H' = H + lam I."""
    hd = h + lam * torch.eye(len(h), dtype=h.dtype)
    out = torch.zeros_like(w0)
    for r in range(len(w0)):
        s = keep[r]
        out[r, s] = torch.linalg.solve(hd[s][:, s], (w0[r] @ hd)[s])
    return out


def error(w, w0, h, lam):
    d = w - w0
    return float(((d @ h) * d).sum() + lam * (d * d).sum())


def test_converges_to_each_rows_masked_least_squares():
    w0, h = problem()
    keep = nm_mask(w0.abs(), NMPattern(2, 4))
    start = w0 * keep
    lam = 0.01 * float(h.diagonal().mean())
    refit = refit_masked(w0, start, h, 0.01, steps=64)
    assert torch.allclose(refit, closed_form(w0, keep, h, lam), atol=1e-9, rtol=1e-9)
    assert torch.equal(refit != 0, keep) and nm_valid(refit, NMPattern(2, 4))


def test_each_step_lowers_the_error_and_zero_steps_change_nothing():
    w0, h = problem(seed=1)
    keep = nm_mask(w0.abs(), NMPattern(2, 4))
    start = w0 * keep
    assert torch.equal(refit_masked(w0, start, h, 0.01, steps=0), start)
    lam = 0.01 * float(h.diagonal().mean())
    optimum = error(closed_form(w0, keep, h, lam), w0, h, lam)
    gaps = [error(refit_masked(w0, start, h, 0.01, steps=k), w0, h, lam) - optimum for k in (0, 1, 2, 4, 8)]
    assert all(0 < b < a for a, b in itertools.pairwise(gaps))
    assert gaps[-1] < 1e-3 * gaps[0]  # the magnitude mask's own weights are 80 above the optimum of 98.4


def test_rows_are_independent_and_the_input_is_not_changed():
    w0, h = problem(rows=10, seed=2)
    start = (w0 * nm_mask(w0.abs(), NMPattern(2, 4))).float()
    before = start.clone()
    whole = refit_masked(w0, start, h, 0.01, steps=5)
    assert torch.equal(start, before)
    assert whole.dtype == torch.float32
    assert torch.allclose(refit_masked(w0, start, h, 0.01, steps=5, rows=3), whole, atol=0, rtol=0)


def test_negative_steps_refused():
    w0, h = problem()
    with pytest.raises(ValueError, match="steps"):
        refit_masked(w0, w0, h, 0.01, steps=-1)
