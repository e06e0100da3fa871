"""GPTQ: grids that hold zero, error compensation that beats rounding, masks kept, joint sweeps, grids to ONNX."""

import numpy as np
import pytest
import torch
from conftest import tiny_program

from nexus_export.engine.pass_base import PassContext
from nexus_export.errors import UserError
from passes.gptq import GPTQPass, quantization_grids
from passes.shared.obs import factor_hessian, obs_sweep, reconstruction_error
from passes.shared.quant_grid import Grid, grid_names
from passes.shared.sparsity import NMPattern, nm_valid
from passes.sparsegpt import SparseGPTPass


def problem(rows=16, cols=128, tokens=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=gen) / cols ** 0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=gen) @ mixing  # correlated inputs, as in real activations
    w = torch.randn(rows, cols, generator=gen)
    return w, 2.0 / tokens * (x.t() @ x).double()


def rtn(w, grid):
    scales, zeros = grid.group_params(w)
    return grid.dequantize(grid.layer_codes(w, scales, zeros), scales, zeros)


def on_grid(w, grid, scales, zeros):
    return torch.equal(grid.dequantize(grid.layer_codes(w, scales, zeros), scales, zeros), w)


@pytest.mark.parametrize("bits, sym", [(4, True), (4, False), (8, True), (8, False)])
def test_grid_holds_zero_and_codes_fit(bits, sym):
    grid = Grid(bits, 32, sym)
    w = torch.randn(8, 64) + (0.0 if sym else 0.7)  # asymmetric ranges for the zero point to matter
    w[:, ::5] = 0.0
    w[3] = 0.0  # a row of zeros: the grid still has a scale
    scales, zeros = grid.group_params(w)
    codes = grid.layer_codes(w, scales, zeros)
    deq = grid.dequantize(codes, scales, zeros)
    assert int(codes.max()) <= 2 ** bits - 1 and torch.all(deq[w == 0] == 0)
    assert torch.all(scales != 0) and torch.equal(zeros, zeros.round())
    step = scales.abs().repeat_interleave(32, dim=1)
    inside = codes < 2 ** bits - 1  # round to nearest: within half a step, a full step where clipped at the top
    assert torch.all((deq - w).abs()[inside] <= step[inside] / 2 + 1e-6)
    assert torch.all((deq - w).abs() <= step + 1e-6)
    if sym:  # the largest magnitude of each group is exactly on the grid (onnxruntime's convention)
        assert torch.all(zeros == 2 ** (bits - 1))
        groups, exact = w.reshape(-1, 32), deq.reshape(-1, 32)
        extreme = groups.abs().argmax(dim=1, keepdim=True)
        assert torch.equal(groups.gather(1, extreme), exact.gather(1, extreme))


@pytest.mark.parametrize("sym", [True, False])
def test_clip_search_rounds_each_group_at_least_as_close_and_keeps_zero(sym):
    """Searching the range never rounds a group worse than the whole range, rounds closer wherever it shrinks it,
    and keeps 0 exact."""
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) + (0.0 if sym else 0.5)
    w[:, ::7] = 0.0
    plain, searched = Grid(4, 32, sym), Grid(4, 32, sym, clip_search=True)
    errors = {}
    for grid in (plain, searched):
        scales, zeros = grid.group_params(w)
        deq = grid.dequantize(grid.layer_codes(w, scales, zeros), scales, zeros)
        assert torch.all(deq[w == 0] == 0)
        errors[grid.clip_search] = ((deq - w).abs() ** 2.4).reshape(64, 2, 32).sum(dim=2)
        ranges = scales.abs()
    assert torch.all(errors[True] <= errors[False] * (1 + 1e-5))
    shrunk = ranges < plain.group_params(w)[0].abs() * (1 - 1e-6)
    assert float(shrunk.float().mean()) > 0.5  # most groups of 32 Gaussian weights round closer on a narrower range
    assert torch.all(errors[True][shrunk] < errors[False][shrunk])


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_sweep_lands_on_the_grid_and_beats_rounding(sym, act_order):
    w, h = problem()
    grid = Grid(4, 32, sym)
    result = obs_sweep(w, factor_hessian(h, 0.01, act_order), grid=grid, blocksize=64)
    assert on_grid(result.weight, grid, result.scales, result.zeros)
    ours, rounded = reconstruction_error(w, result.weight, h), reconstruction_error(w, rtn(w, grid), h)
    assert ours < 0.75 * rounded  # the compensation is the point of GPTQ (0.53-0.60 on this problem)


def test_fixed_mask_stays_zero_and_helps():
    w, h = problem()
    w = w * (torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5)
    keep = w != 0
    grid = Grid(4, 32)
    result = obs_sweep(w, factor_hessian(h, 0.01), keep=keep, grid=grid)
    assert torch.all(result.weight[~keep] == 0)
    assert on_grid(result.weight, grid, result.scales, result.zeros)
    assert reconstruction_error(w, result.weight, h) < reconstruction_error(w, rtn(w, grid), h)


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), None])
def test_joint_sweep_prunes_and_quantizes(pattern):
    w, h = problem()
    grid = Grid(4, 32)
    result = obs_sweep(w, factor_hessian(h, 0.01), sparsity=0.5, pattern=pattern, grid=grid)
    assert on_grid(result.weight, grid, result.scales, result.zeros)
    if pattern:
        assert nm_valid(result.weight, pattern)
    else:
        assert float((result.weight == 0).float().mean()) >= 0.5


def test_joint_n_m_scales_fit_the_weights_that_stay():
    """A quantization group spans several N:M groups whose masks are chosen later in the sweep: the group's scale
    must come from the weights likely to stay, not from a large weight about to be zeroed. Column 5 is large but
    nearly free to remove (its input is almost never active), so 2:4 prunes it in every row; with a diagonal Hessian
    nothing moves between columns, so the kept weights are the stored ones, all within 1 in magnitude."""
    gen = torch.Generator().manual_seed(0)
    w = (0.5 + 0.5 * torch.rand(4, 32, generator=gen)) * torch.sign(torch.randn(4, 32, generator=gen))
    w[:, 5] = 5.0
    h = torch.ones(32, dtype=torch.float64)
    h[5] = 1e-6
    result = obs_sweep(w, factor_hessian(torch.diag(h), 1e-4), pattern=NMPattern(2, 4), grid=Grid(4, 32))
    assert torch.all(result.weight[:, 5] == 0) and nm_valid(result.weight, NMPattern(2, 4))
    assert torch.all(result.scales.abs() * 8 <= 1.0)  # the grid's end (-8 steps) is a kept weight, not 5.0
    assert on_grid(result.weight, Grid(4, 32), result.scales, result.zeros)


def test_act_order_refuses_to_choose_a_mask():
    w, h = problem()
    with pytest.raises(UserError, match="act-order"):
        obs_sweep(w, factor_hessian(h, 0.01, act_order=True), pattern=NMPattern(2, 4), grid=Grid())


def windows(n=8, seq=64):
    return torch.randint(0, 300, (n, seq), generator=torch.Generator().manual_seed(0))


def test_pass_quantizes_every_block_linear_and_keeps_pruned_zeros():
    program = tiny_program("llama")
    ctx = PassContext(calibration_windows=windows())
    program = SparseGPTPass({"pattern": "2:4"}).run(program, ctx).program
    zeros = {lin.name: program.weight(lin.name) == 0 for lin in program.structure.in_blocks()}
    result = GPTQPass({"bits": 4, "group_size": 32}).run(program, ctx)
    program, changes = result.program, result.report.changes
    grids = quantization_grids(program)
    assert set(grids) == set(zeros) and changes["layers"] == len(zeros) == 14
    grid = Grid(4, 32)
    for name, (scales, zero_points) in grids.items():
        w = program.weight(name)
        assert scales.shape == (w.shape[0], w.shape[1] // 32) and zero_points.dtype == torch.uint8
        assert on_grid(w, grid, scales, zero_points.float())
        assert torch.all(w[zeros[name]] == 0) and nm_valid(w, NMPattern(2, 4))
    assert program.origin["quantization"] == {"bits": 4, "group_size": 32, "sym": True, "clip_search": True,
                                                "method": "gptq"}
    assert "lm_head" not in grids  # the head stays float, as in the reference


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_joint_pass_reports_the_mask(method):
    program = tiny_program("llama")
    result = GPTQPass({"group_size": 32, "prune": {"method": method, "pattern": "2:4"}}).run(
        program, PassContext(calibration_windows=windows()))
    changes = result.report.changes
    assert changes["joint"] == method and changes["pattern"] == "2:4" and changes["overall_sparsity"] >= 0.5
    assert all(entry["nm_valid"] for entry in changes["per_layer"].values())


def test_grids_are_checkpointed_with_their_block(tmp_path):
    program = tiny_program("llama")
    ctx = PassContext(calibration_windows=windows(), checkpoint_dir=tmp_path)
    done = GPTQPass({"group_size": 32}).run(program, ctx).program
    resumed = GPTQPass({"group_size": 32}).run(tiny_program("llama"), PassContext(
        calibration_windows=windows(), checkpoint_dir=tmp_path, resume=True)).program
    for name, (scales, zeros) in quantization_grids(done).items():
        again = quantization_grids(resumed)[name]
        assert torch.equal(scales, again[0]) and torch.equal(zeros, again[1])
        assert torch.equal(done.weight(name), resumed.weight(name))


@pytest.mark.parametrize("options, message", [
    ({"bits": 3}, "bits must be 4 or 8"),
    ({"group_size": 48}, "group size must be one of"),
    ({"prune": {"method": "magnitude"}}, "joint sweep prunes with sparsegpt or wanda"),
    ({"act_order": True, "prune": {"method": "sparsegpt", "pattern": "2:4"}}, "act-order cannot be combined"),
    ({"prune": {"method": "wanda", "pattern": "2:5:1"}}, "pattern"),
])
def test_bad_options(options, message):
    with pytest.raises(UserError, match=message):
        GPTQPass(options)


def test_refusals_before_work():
    program = tiny_program("llama")
    with pytest.raises(UserError, match="group size 128 does not divide the input width 64 of model.layers.0"):
        GPTQPass({"group_size": 128}).check(program)
    with pytest.raises(UserError, match="needs calibration data"):
        GPTQPass({"group_size": 32}).run(program, PassContext())
    half = tiny_program("llama")
    half.store.dtype = torch.bfloat16
    with pytest.raises(UserError, match=r"bfloat16.*8-bit grids apart; use --dtype fp32 .* or --quantize-bits 4"):
        GPTQPass({"bits": 8, "group_size": 32}).check(half)
    GPTQPass({"bits": 4, "group_size": 32}).check(half)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_program_keeps_the_grid_values_rounded_and_float32_scales(dtype):
    """In a bf16 (fp16) program GPTQ keeps each weight as its grid value rounded to that dtype (half the memory of
    float32) and its scales in float32: the first stage's layers, which see the same inputs either way, hold the
    float32 run's values rounded, on the same grids; every weight still gives back its codes."""
    exact = GPTQPass({"group_size": 32}).run(tiny_program("llama"), PassContext(calibration_windows=windows())).program
    half = tiny_program("llama")
    half.store.dtype = dtype
    half = GPTQPass({"group_size": 32}).run(half, PassContext(calibration_windows=windows())).program
    grid, first = Grid(4, 32), ("q_proj", "k_proj", "v_proj")
    exact_grids, half_grids = quantization_grids(exact), quantization_grids(half)
    for lin in half.structure.in_blocks():
        w, (scales, zeros) = half.weight(lin.name), half_grids[lin.name]
        assert w.dtype == dtype and scales.dtype == torch.float32
        codes = grid.layer_codes(w.float(), scales, zeros.float())
        assert torch.equal(grid.dequantize(codes, scales, zeros.float()).to(dtype), w)
        if lin.name.startswith("model.layers.0.") and lin.name.endswith(first):
            assert torch.equal(scales, exact_grids[lin.name][0]) and torch.equal(zeros, exact_grids[lin.name][1])
            assert torch.equal(exact.weight(lin.name).to(dtype), w)


def test_names_of_the_grids_follow_the_weight():
    assert grid_names("lm.model.layers.0.mlp.up_proj.weight") == ("lm.model.layers.0.mlp.up_proj.weight::qscale",
                                                                  "lm.model.layers.0.mlp.up_proj.weight::qzero")
    assert np.isclose(Grid(4, 32).maxq, 15)


@pytest.mark.parametrize("rows", [1, 5, 1024])
def test_group_params_taken_rows_at_a_time_are_the_whole_ones(rows):
    w = torch.randn(13, 64, generator=torch.Generator().manual_seed(6))
    keep = torch.rand(13, 64, generator=torch.Generator().manual_seed(7)) > 0.5
    grid = Grid(4, 16, clip_search=True)
    whole = grid.params((w * keep).reshape(-1, 16))
    scales, zeros = grid.group_params(w, keep, rows=rows)
    assert torch.equal(scales, whole[0].reshape(13, 4)) and torch.equal(zeros, whole[1].reshape(13, 4))
