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
