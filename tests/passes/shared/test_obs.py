"""The OBS sweep's numerical building blocks: the in-place factoring and the row-blocked reconstruction error."""

from __future__ import annotations

import pytest
import torch

from nexus_export.errors import UserError
from passes.shared import obs
from passes.shared.obs import inverse_upper_cholesky_, reconstruction_error, upper_inverse_cholesky


def _spd(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    x = torch.randn(3 * n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    h = x.t() @ x / n
    return h.to(dtype)


@pytest.mark.parametrize("lean", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_factor_is_torchs_and_the_lean_one_uses_the_matrix_itself(dtype, lean, monkeypatch):
    """Narrow inputs: torch's factoring, as before. Past LEAN_HESSIAN_WIDTH (0 here): in blocks on the matrix's own
    memory, equal up to rounding."""
    monkeypatch.setattr(obs, "LEAN_HESSIAN_WIDTH", 0 if lean else 10**9)
    h = _spd(96, dtype)
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    a = h.clone()
    pointer = a.data_ptr()
    assert inverse_upper_cholesky_(a)
    assert a.data_ptr() == pointer
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(a, expected, rtol=tol, atol=tol * float(expected.abs().max()))
    assert torch.equal(a, torch.triu(a))  # upper triangular: nothing of the matrix it came from is left below
    assert torch.allclose(a.t() @ a, torch.linalg.inv(h), rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("lean", [False, True])
def test_a_matrix_that_is_not_positive_definite_is_reported_not_factored(lean, monkeypatch):
    monkeypatch.setattr(obs, "LEAN_HESSIAN_WIDTH", 0 if lean else 10**9)
    assert not inverse_upper_cholesky_(-torch.eye(4))


def test_no_damping_that_helps_names_the_layer_and_the_option():
    with pytest.raises(UserError, match=r"input of model\.layers\.3\.mlp\.down_proj .* raise --percdamp \(now 0\.01\)"):
        upper_inverse_cholesky(-torch.eye(3), 0.01, layer="model.layers.3.mlp.down_proj")


def test_dead_inputs_and_a_permutation_give_the_factor_of_the_permuted_hessian():
    h = _spd(16, torch.float32)
    h[5, :] = h[:, 5] = 0.0
    dead = torch.diag(h) == 0
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    upper, damp = upper_inverse_cholesky(h, 0.01, dead, perm)
    ref = h.double().clone()
    ref[5, 5] = 1.0
    ref = ref[perm][:, perm]
    ref.diagonal().add_(0.01 * float(ref.diagonal().mean()))
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(ref)), upper=True)
    assert damp == 0.01 and torch.allclose(upper.double(), expected, rtol=1e-4, atol=1e-5)


def test_the_error_taken_in_row_blocks_is_the_whole_product():
    g = torch.Generator().manual_seed(2)
    old, new = torch.randn(10, 24, generator=g), torch.randn(10, 24, generator=g)
    h = _spd(24, torch.float64)
    delta = new.double() - old.double()
    whole = float(((delta @ h) * delta).sum()) / 2.0
    assert reconstruction_error(old, new, h, rows=3) == pytest.approx(whole, rel=1e-12)
    assert reconstruction_error(old, new, h.float(), rows=4) == pytest.approx(whole, rel=1e-5)


@pytest.mark.parametrize("size, block", [(96, 32), (100, 32), (70, 128), (257, 64)])
def test_the_blocked_factor_is_torchs_whatever_the_blocks(size, block):
    """The in-place factoring of wide Hessians, with the matrix a whole number of blocks, not one, and one block."""
    h = _spd(size, torch.float64)
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    a = h.clone()
    assert obs.blocked_inverse_upper_cholesky_(a, block)
    assert torch.allclose(a, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))
    assert torch.equal(a, torch.triu(a))
    singular = h.clone()
    singular[size - 1, size - 1] = -1.0  # fails in the first block it factors
    assert not obs.blocked_inverse_upper_cholesky_(singular, block)
    singular = h.clone()
    singular[0, 0] = 0.0  # fails in the last
    assert not obs.blocked_inverse_upper_cholesky_(singular, block)


def _rank_deficient(n: int, seed: int = 3) -> torch.Tensor:
    """A float32 Hessian of n / 2 tokens with a dead input, shifted so that 1% damping is not enough and 10% is."""
    x = torch.randn(n // 2, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[:, 7] = 0.0
    h = x.t() @ x / n
    mean = float(h.diagonal().mean())
    h.diagonal().sub_(0.05 * mean)
    h[7, 7] = 0.0
    return h.float()


@pytest.mark.parametrize("act_order", [False, True])
def test_a_consumed_hessian_becomes_the_factor_in_its_own_memory(act_order, tmp_path):
    """consume: the float32 Hessian's memory holds the factor, bit for bit the factor of a copy, through the damping
    retries (read back from the temporary file, which is gone afterwards)."""
    h = _rank_deficient(300)
    expected = obs.factor_hessian(h, 0.01, act_order)
    assert expected.damp == pytest.approx(0.1)  # it took a retry
    given = h.clone()
    pointer = given.data_ptr()
    factor = obs.factor_hessian(given, 0.01, act_order, consume=True, scratch=tmp_path)
    assert factor.upper.data_ptr() == pointer
    assert torch.equal(factor.upper, expected.upper) and factor.damp == expected.damp
    assert factor.shift == expected.shift == pytest.approx(0.1 * float(h.diagonal().mean() + 1.0 / 300))
    assert torch.equal(factor.dead, expected.dead) and bool(factor.dead[7]) and int(factor.dead.sum()) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_float64_hessian_is_copied_once_even_when_consumed():
    h = _spd(40, torch.float64)
    factor = obs.factor_hessian(h, 0.01, consume=True)
    assert factor.upper.dtype == torch.float32 and factor.upper.data_ptr() != h.data_ptr()
    assert torch.equal(factor.upper, obs.factor_hessian(h, 0.01).upper)


def _sweep_problem(dead: bool):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, 128, generator=g) @ (torch.eye(128) + torch.randn(128, 128, generator=g) / 12)
    if dead:
        x[:, [3, 50]] = 0.0
    w = torch.randn(24, 128, generator=g)
    return w, (2.0 / 512 * x.t() @ x).double()


@pytest.mark.parametrize("dead", [False, True])
@pytest.mark.parametrize("how", ["unstructured", "2:4", "grid", "act-order grid", "kept mask and grid"])
def test_the_sweep_s_own_error_is_the_reconstruction_error(how, dead):
    """The error the sweep returns (from its scaled column errors, without the Hessian) equals the reconstruction
    error computed with the Hessian, whatever fixes the columns, with dead inputs too."""
    from passes.shared.quant_grid import Grid
    from passes.shared.sparsity import NMPattern

    w, h = _sweep_problem(dead)
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(5)) > 0.3
    options = {"unstructured": {"sparsity": 0.5}, "2:4": {"pattern": NMPattern(2, 4)}, "grid": {"grid": Grid(4, 32)},
               "act-order grid": {"grid": Grid(4, 32)}, "kept mask and grid": {"grid": Grid(4, 32), "keep": keep}}[how]
    factor = obs.factor_hessian(h, 0.01, act_order=how == "act-order grid")
    result = obs.obs_sweep(w, factor, blocksize=32, **options)
    direct = reconstruction_error(w, result.weight, h)
    assert direct > 0 and result.error == pytest.approx(direct, rel=1e-4)


def test_a_hessian_that_cannot_be_copied_aside_is_a_clear_error(tmp_path):
    h = _spd(8, torch.float32)
    with pytest.raises(UserError, match=r"cannot write a copy of the Hessian of the input of L to .*missing.*free disk"):
        obs.factor_hessian(h, 0.01, layer="L", consume=True, scratch=tmp_path / "missing")
    assert torch.equal(h, _spd(8, torch.float32))  # not touched
