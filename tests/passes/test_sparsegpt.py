"""SparseGPT: the OBS update lowers reconstruction error, masks are valid, damping retries are reported."""

import json

import pytest
import torch
from conftest import archs, tiny_program

from nexus_export.cli import main
from nexus_export.engine.pass_base import PassContext
from nexus_export.errors import UserError
from passes.shared.sparsity import NMPattern, nm_mask, nm_valid, unstructured_mask
from passes.sparsegpt import SparseGPTPass, sparsegpt_prune, upper_inverse_cholesky


def problem(rows=16, cols=64, tokens=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=gen) / cols ** 0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=gen) @ mixing  # correlated inputs, as in real activations
    w = torch.randn(rows, cols, generator=gen)
    return w, x, 2.0 / tokens * (x.t() @ x).double()


def err(w_new, w, x):
    return float(((w_new - w) @ x.t()).norm())


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4), NMPattern(4, 8)])
def test_obs_update_beats_magnitude_and_mask_only(pattern):
    w, x, h = problem()
    pruned, facts = sparsegpt_prune(w, h, 0.5, pattern, blocksize=16)
    keep = pruned != 0
    magnitude = w * (nm_mask(w.abs(), pattern) if pattern else unstructured_mask(w.abs(), 0.5))
    assert err(pruned, w, x) < 0.9 * err(magnitude, w, x)
    assert err(pruned, w, x) < err(w * keep, w, x)  # the update matters, not only the mask
    if pattern:
        assert nm_valid(pruned, pattern)
    else:
        assert int((pruned == 0).sum()) == w.numel() // 2
    assert facts["damping"] == 0.01
    assert facts["reconstruction_error"] == pytest.approx(err(pruned, w, x) ** 2 / len(x), rel=1e-4)  # ||dW X||^2/n


def test_zero_sparsity_leaves_weights_unchanged():
    w, _, h = problem()
    pruned, _ = sparsegpt_prune(w, h, 0.0, None)
    assert torch.allclose(pruned, w, atol=1e-6)


def test_dead_inputs_zero_their_columns():
    w, x, _ = problem()
    x[:, 5] = 0.0
    h = 2.0 / len(x) * (x.t() @ x).double()
    pruned, _ = sparsegpt_prune(w, h, 0.25, None)
    assert torch.all(pruned[:, 5] == 0)


def test_cholesky_failure_increases_damping():
    h = torch.diag(torch.tensor([1.0, 1.0, -0.05], dtype=torch.float64))
    _, damp = upper_inverse_cholesky(h, 0.01)
    assert damp == pytest.approx(0.1)
    with pytest.raises(UserError, match="not positive definite"):
        upper_inverse_cholesky(-torch.eye(3, dtype=torch.float64), 0.01)


@pytest.mark.parametrize("arch", archs())
def test_pass_on_every_architecture(arch):
    program = tiny_program(arch)
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    report = SparseGPTPass({"pattern": "2:4", "blocksize": 32}).run(program, PassContext(calibration_windows=ids)).report
    assert report.changes["overall_sparsity"] == pytest.approx(0.5)
    assert report.changes["damping_increased"] == []
    for lin in program.structure.in_blocks():
        assert nm_valid(program.weight(lin.name), NMPattern(2, 4))
        assert report.changes["per_layer"][lin.name]["reconstruction_error"] > 0  # half the weights gone: never 0


def test_true_sequential_changes_later_stages():
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for true_sequential in (False, True):
        program = tiny_program("llama")
        SparseGPTPass({"sparsity": 0.5, "true_sequential": true_sequential}).run(
            program, PassContext(calibration_windows=ids))
        results.append({n: program.weight(n).clone() for n in program.structure.linears})
    q, down = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"
    assert torch.allclose(results[0][q], results[1][q])  # first stage sees the same inputs
    assert not torch.allclose(results[0][down], results[1][down])  # later stages see pruned predecessors


@pytest.mark.parametrize("options, message", [
    ({"percdamp": 0.0}, "percdamp"),
    ({"percdamp": -1}, "percdamp"),
    ({"blocksize": 0}, "blocksize"),
    ({"pattern": "2:4", "blocksize": 6}, "multiple"),
])
def test_bad_options(options, message):
    with pytest.raises(UserError, match=message):
        SparseGPTPass(options)


def test_one_factor_per_input_and_hessians_freed(monkeypatch):
    """q/k/v and gate/up share one factored Hessian (4 per LLaMA block, not 7), every Hessian is freed once the last
    linear reading it is pruned, and sharing changes no weight."""
    import passes.sparsegpt as sparsegpt
    from nexus_export.engine.calibration import InputStats

    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    reference = tiny_program("llama")
    calls, stats_seen = [], []
    real_factor, real_free = sparsegpt.factor_hessian, InputStats.free
    monkeypatch.setattr(sparsegpt, "factor_hessian", lambda h, p, **kw: calls.append(h.shape) or real_factor(h, p, **kw))
    monkeypatch.setattr(InputStats, "free", lambda self: stats_seen.append(self) or real_free(self))
    program = tiny_program("llama")
    SparseGPTPass({"pattern": "2:4", "blocksize": 32}).run(program, PassContext(calibration_windows=ids))
    blocks = len(program.structure.blocks)
    assert len(calls) == 4 * blocks
    assert len(stats_seen) == 4 * blocks and all(s.xtx is None and not s.derived for s in stats_seen)

    saved = {}  # the Hessian of the input being pruned, before it becomes the shared factor

    def keep_hessian(h, p, **kw):
        saved["h"] = h.clone()
        return real_factor(h, p, **kw)

    monkeypatch.setattr(sparsegpt, "factor_hessian", keep_hessian)

    def unshared(weight, hessian, sparsity, pattern, blocksize=128, percdamp=0.01, factor=None, refit_steps=0):
        return real_prune(weight, saved["h"], sparsity, pattern, blocksize, percdamp, refit_steps=refit_steps)  # own

    real_prune = sparsegpt.sparsegpt_prune
    monkeypatch.setattr(sparsegpt, "sparsegpt_prune", unshared)
    SparseGPTPass({"pattern": "2:4", "blocksize": 32}).run(reference, PassContext(calibration_windows=ids))
    for lin in program.structure.in_blocks():
        assert torch.equal(program.weight(lin.name), reference.weight(lin.name)), lin.name


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4)])
def test_refit_keeps_the_mask_and_lowers_the_error(pattern):
    w, x, h = problem()
    swept, plain = sparsegpt_prune(w, h, 0.5, pattern, blocksize=16)
    refit, facts = sparsegpt_prune(w, h, 0.5, pattern, blocksize=16, refit_steps=30)
    assert torch.equal(refit != 0, swept != 0)  # the sweep's mask, every kept weight still kept
    assert facts["sweep_error"] == pytest.approx(plain["reconstruction_error"], rel=1e-12)
    assert facts["reconstruction_error"] == pytest.approx(err(refit, w, x) ** 2 / len(x), rel=1e-4)
    assert facts["reconstruction_error"] < 0.95 * facts["sweep_error"]
    with pytest.raises(ValueError, match="grid"):
        sparsegpt_prune(w, h, 0.5, pattern, grid=object(), refit_steps=1)


def test_refit_pass_keeps_valid_2_4_and_lowers_every_layers_error():
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    runs = {}
    for steps in (0, 10):
        program = tiny_program("llama")
        options = {"pattern": "2:4", "blocksize": 32, "permute": True, "refit_steps": steps}
        runs[steps] = SparseGPTPass(options).run(program, PassContext(calibration_windows=ids)).report.changes
    layers = runs[10]["per_layer"]
    for name, layer in layers.items():
        assert layer["nm_valid"] and layer["sparsity"] == pytest.approx(0.5)
        assert layer["reconstruction_error"] < layer["sweep_error"]
        assert "sweep_error" not in runs[0]["per_layer"][name]
    first = "model.layers.0.self_attn.q_proj"  # the first stage sees the same inputs in both runs
    assert layers[first]["sweep_error"] == pytest.approx(runs[0]["per_layer"][first]["reconstruction_error"])


@pytest.mark.parametrize("steps", [-1, 2.5, True])
def test_bad_refit_steps(steps):
    with pytest.raises(UserError, match="refit_steps"):
        SparseGPTPass({"pattern": "2:4", "refit_steps": steps})


@pytest.mark.slow
def test_refit_two_four_end_to_end_passes_the_strict_tensorrt_check(tmp_path, capsys):
    """SparseGPT 2:4 with --permute and --refit-steps: every targeted layer of the written ONNX is valid 2:4 for
    TensorRT (check-onnx --strict reads the targets from report.json) and each layer's refit lowered its error."""
    out = tmp_path / "run"
    assert main(["-q", "prune", "--model", "tiny-llama", "--method", "sparsegpt", "--pattern", "2:4", "--permute",
                 "--refit-steps", "10", "--calib-samples", "4", "--eval-windows", "4", "--seq-len", "64", "--no-latency",
                 "--no-decode-speed", "--out", str(out)]) == 0
    layers = json.loads((out / "report.json").read_text())["passes"][0]["changes"]["per_layer"]
    assert len(layers) == 14 and all(v["reconstruction_error"] < v["sweep_error"] for v in layers.values())
    capsys.readouterr()
    assert main(["check-onnx", str(out / "model.onnx"), "--tensorrt", "--strict"]) == 0
    assert "targeted (from report.json): 14 of 14 eligible" in capsys.readouterr().out


def test_wide_inputs_factor_their_hessian_in_place_and_prune_as_before(monkeypatch):
    """Past LEAN_HESSIAN_WIDTH (0 here: every input), the float32 Hessian becomes its own factor (consume), and the
    pass gives the weights it gives with the factor in a matrix of its own."""
    import nexus_export.engine.calibration as calibration
    import passes.shared.obs as obs
    import passes.sparsegpt as sparsegpt

    monkeypatch.setattr(calibration, "LEAN_HESSIAN_WIDTH", 0)
    monkeypatch.setattr(obs, "LEAN_HESSIAN_WIDTH", 0)
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    consumed = []
    real = sparsegpt.factor_hessian

    def recording(h, p, **kw):
        factor = real(h, p, **kw)
        consumed.append(h.dtype == torch.float32 and factor.upper.data_ptr() == h.data_ptr())
        return factor

    monkeypatch.setattr(sparsegpt, "factor_hessian", recording)
    lean = tiny_program("llama")
    SparseGPTPass({"pattern": "2:4", "blocksize": 32}).run(lean, PassContext(calibration_windows=ids))
    assert consumed and all(consumed)
    monkeypatch.setattr(sparsegpt, "factor_hessian", lambda h, p, **kw: real(h, p, **{**kw, "consume": False}))
    copied = tiny_program("llama")
    SparseGPTPass({"pattern": "2:4", "blocksize": 32}).run(copied, PassContext(calibration_windows=ids))
    for lin in lean.structure.in_blocks():
        assert torch.equal(lean.weight(lin.name), copied.weight(lin.name)), lin.name
