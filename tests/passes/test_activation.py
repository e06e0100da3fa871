"""Activation sparsity: thresholds placed at the target quantile, the rewritten graph equal to the model with the same
thresholds applied by hooks, every architecture, ONNX parity, measured sparsity, bad input."""

import pytest
import torch
from conftest import archs, make_tiny, tiny_program

from nexus_export.engine.pass_base import PassContext
from nexus_export.errors import UserError
from nexus_export.evaluation.activation_stats import input_sparsity, summarize_inputs
from nexus_export.graph.program import Program
from passes.activation import ActivationPass, nudged, place_thresholds
from passes.shared.activation_greedy import greedy_levels


def windows(n=4, seq=32, seed=1):
    return torch.randint(0, 300, (n, seq), generator=torch.Generator().manual_seed(seed))


def run(program, **options):
    return ActivationPass(options).run(program, PassContext(calibration_windows=windows()))


def test_thresholds_equal_the_model_thresholded_by_hooks():
    """The rewrite is exactly x -> x * (|x| >= t) in front of each chosen linear: the HF model with forward pre-hooks
    doing that gives the same logits; q/k/v share one threshold, gate/up another."""
    model = make_tiny("llama")
    result = run(Program.from_model(model), sparsity=0.5)
    thresholds = result.report.changes["thresholds"]
    assert result.report.changes["inputs"] == 4 * 2  # attn_in, attn_out, mlp_in, mlp_out in 2 blocks
    assert thresholds["model.layers.0.self_attn.q_proj"]["linears"] == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    handles = []
    for entry in thresholds.values():
        for name in entry["linears"]:
            t = entry["threshold"]
            handles.append(model.get_submodule(name).register_forward_pre_hook(
                lambda module, args, t=t: (args[0] * (args[0].abs() >= t),)))
    ids = windows(n=2, seed=5)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    for h in handles:
        h.remove()
    got = result.program.logits(ids)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert not torch.allclose(got, dense, atol=1e-3)  # the thresholds do something



@pytest.mark.parametrize("criterion", ["magnitude", "wina"])
def test_nudged_thresholds_scale_every_threshold(criterion):
    """nudged(program, f) multiplies every threshold (magnitude's literals, WINA's limit parameters) by f: at 0 every
    entry passes (the dense model), at 1 nothing changes, and the program nudged is left as it was."""
    dense = tiny_program("llama")
    result = run(dense, sparsity=0.5, criterion=criterion)
    ids = windows(n=2, seed=5)
    placed = result.program.logits(ids)
    assert torch.allclose(nudged(result.program, 0.0).logits(ids), dense.logits(ids), atol=1e-5)
    assert torch.equal(nudged(result.program, 1.0).logits(ids), placed)
    half = nudged(result.program, 0.5).logits(ids)
    assert not torch.allclose(half, placed, atol=1e-3) and not torch.allclose(half, dense.logits(ids), atol=1e-3)
    assert torch.equal(result.program.logits(ids), placed)
    with pytest.raises(ValueError, match="no activation thresholds"):
        nudged(dense, 2.0)


def test_wina_thresholds_equal_the_model_thresholded_by_hooks():
    """With criterion wina the rewrite is x -> x * (|x| * c >= t), c the norms of the weight columns x multiplies
    (over q, k and v together; gate and up), computed here from the model's own modules; each input's calibration
    share sits at the target, and the graph gains one float32 parameter of limits per input."""
    model = make_tiny("llama")
    result = run(Program.from_model(model), sparsity=0.5, criterion="wina")
    changes = result.report.changes
    assert changes["criterion"] == "wina" and changes["calibration_sparsity"] == pytest.approx(0.5, abs=1e-3)
    handles = []
    for entry in changes["thresholds"].values():
        columns = sum(model.get_submodule(n).weight.detach().double().pow(2).sum(dim=0) for n in entry["linears"])
        c, t = columns.sqrt().float(), entry["threshold"]
        for name in entry["linears"]:
            handles.append(model.get_submodule(name).register_forward_pre_hook(
                lambda module, args, t=t, c=c: (args[0] * (args[0].abs() * c >= t),)))
    ids = windows(n=2, seed=5)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    for h in handles:
        h.remove()
    limits = [n for n in result.program.store.names() if n.endswith(".activation_limit")]
    assert len(limits) == 4 * 2 and all(result.program.store.stored_dtype(n) == torch.float32 for n in limits)
    # |x| >= t / c and |x| * c >= t round differently at the boundary: a handful of entries may flip
    assert torch.allclose(result.program.logits(ids), expected, atol=1e-3, rtol=1e-3)


def test_wina_keeps_what_moves_the_output_where_columns_differ():
    """Columns whose weights are 30x larger carry most of the output: at the same share of zeroed entries, WINA's
    thresholds (which spare them) leave logits nearer the dense model's than magnitude thresholds do."""
    model = make_tiny("llama")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.mlp.down_proj, layer.self_attn.o_proj):
                lin.weight.mul_(torch.where(torch.rand(lin.in_features, generator=gen) < 0.2, 30.0, 1.0))
    ids = windows(n=2, seed=6)
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    errors = {}
    for criterion in ("magnitude", "wina"):
        result = run(Program.from_model(model), sparsity=0.5, roles=["attn_out", "mlp_out"], criterion=criterion)
        assert result.report.changes["calibration_sparsity"] == pytest.approx(0.5, abs=1e-3)
        errors[criterion] = float((result.program.logits(ids) - dense).norm() / dense.norm())
    assert errors["wina"] < 0.7 * errors["magnitude"]

@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_each_threshold_sits_at_the_target_quantile(sparsity):
    program = tiny_program("llama")
    thresholds = place_thresholds(program, windows(), sparsity, ["attn_in", "mlp_out"])
    assert len(thresholds) == 2 * 2
    for t in thresholds:
        assert t.calibration_sparsity == pytest.approx(sparsity, abs=1e-3)
        assert t.value > 0


def test_measured_sparsity_on_other_windows_and_roles_chosen():
    """Only the chosen role is thresholded; the evaluation windows' measured sparsity is near the target, the other
    inputs stay dense, and the skippable share of multiply-adds follows from both."""
    result = run(tiny_program("llama"), sparsity=0.4, roles=["mlp_out"])
    assert result.report.changes["inputs"] == 2
    per_input = summarize_inputs(input_sparsity(result.program, windows(seed=9)))["per_input"]
    for name, entry in per_input.items():
        if name.endswith("down_proj"):
            assert entry["sparsity"] == pytest.approx(0.4, abs=0.08)
        else:
            assert entry["sparsity"] < 0.01


def test_zero_sparsity_leaves_the_program():
    program = tiny_program("llama")
    result = run(program, sparsity=0.0)
    assert result.program is program and result.report.changes["inputs"] == 0


@pytest.mark.parametrize("arch", archs())
def test_every_architecture_and_composition_with_two_four(arch):
    """On top of SparseGPT 2:4 the thresholds go in and the masks stay; every input reaches the target (OPT's ReLU
    output is already sparser: its threshold is 0 and its exact zeros count)."""
    from passes.sparsegpt import SparseGPTPass

    program = tiny_program(arch)
    masked = SparseGPTPass({"pattern": "2:4"}).run(program, PassContext(calibration_windows=windows())).program
    result = run(masked, sparsity=0.4)
    reached = [t["calibration_sparsity"] for t in result.report.changes["thresholds"].values()]
    assert len(reached) == 4 * 2 and min(reached) == pytest.approx(0.4, abs=0.01)
    for lin in masked.structure.in_blocks():
        assert torch.equal(result.program.weight(lin.name), masked.weight(lin.name))
    assert torch.isfinite(result.program.logits(windows(n=1))).all()


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["magnitude", "wina"])  # wina: per-column limits as initializers
def test_onnx_parity(tmp_path, criterion):
    from runtimes import ort, parity
    from runtimes.onnx_export import lower_to_onnx

    result = run(tiny_program("llama"), sparsity=0.5, criterion=criterion)
    path = lower_to_onnx(result.program, tmp_path / "model.onnx")
    import onnx

    ops = {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}
    assert {"Abs", "GreaterOrEqual", "Where"} <= ops
    ids = windows(n=2, seed=4)
    sess = ort.session(path, threads=1)
    assert parity.max_abs_diff(result.program.logits(ids), sess, ids, torch.ones_like(ids)) < 1e-4


def test_greedy_levels_follow_the_error():
    """Two inputs whose error grows as 1 x level^2 and 4 x level^2: for a mean of 0.5 the optimum puts 0.8 on the
    cheap one and 0.2 on the other, and greedy rounds of 0.1 of the mean find it; at equal cost per level, a wide
    input takes more of the target (each round moves the mean by the same step)."""
    levels = greedy_levels(lambda ls: ls[0] ** 2 + 4 * ls[1] ** 2, [1, 1], 0.5, 0.1)
    assert levels == pytest.approx([0.8, 0.2])
    wide = greedy_levels(lambda ls: ls[0] ** 2 + ls[1] ** 2, [1, 3], 0.5, 0.1)
    assert (wide[0] + 3 * wide[1]) / 4 == pytest.approx(0.5) and wide[1] > wide[0]


def test_greedy_allocation_keeps_the_mean_and_with_one_input_is_uniform():
    ids = windows(n=8)
    greedy = place_thresholds(tiny_program("llama"), ids, 0.5, list(ROLES_ALL), allocation="greedy")
    for block in (0, 1):
        mine = [t for t in greedy if t.block == block]
        widths = [64 if not t.linears[0].endswith("down_proj") else 128 for t in mine]
        mean = sum(w * t.calibration_sparsity for w, t in zip(widths, mine)) / sum(widths)
        assert mean == pytest.approx(0.5, abs=0.01)
        assert len({round(t.calibration_sparsity, 2) for t in mine}) > 1  # not the uniform answer
    one = place_thresholds(tiny_program("llama"), ids, 0.5, ["mlp_out"], allocation="greedy")
    uniform = place_thresholds(tiny_program("llama"), ids, 0.5, ["mlp_out"])
    assert [t.value for t in one] == [t.value for t in uniform]
    result = run(tiny_program("llama"), sparsity=0.4, allocation="greedy")
    assert result.report.changes["allocation"] == "greedy"
    assert result.report.changes["calibration_sparsity"] == pytest.approx(0.4, abs=0.01)
    wina = run(tiny_program("llama"), sparsity=0.4, allocation="greedy", criterion="wina")
    assert wina.report.changes["calibration_sparsity"] == pytest.approx(0.4, abs=0.01)


ROLES_ALL = ("attn_in", "attn_out", "mlp_in", "mlp_out")


@pytest.mark.parametrize("options, message", [
    ({"allocation": "best"}, "uniform or greedy"),
    ({"criterion": "teal"}, "magnitude or wina"),
    ({"greedy_step": 0.0}, "greedy_step"),
    ({"sparsity": 0.97}, "at most 0.95"),
    ({"sparsity": 1.0}, r"\[0, 1\)"),
    ({"sparsity": -0.1}, r"\[0, 1\)"),
    ({"roles": ["attn_in", "lm_head"]}, "not roles of linears in the blocks"),
    ({"roles": []}, "not roles of linears in the blocks"),
    ({"sparsity": "0.4"}, "without quotes"),
])
def test_bad_options(options, message):
    with pytest.raises(UserError, match=message):
        ActivationPass(options)


def test_too_few_calibration_tokens_says_how_many():
    pass_ = ActivationPass({"sparsity": 0.5})
    with pytest.raises(UserError, match="at least 2 are needed"):
        pass_.run(tiny_program("llama"), PassContext(calibration_windows=windows(n=1, seq=1)))
    with pytest.raises(UserError, match="needs calibration data"):
        pass_.run(tiny_program("llama"), PassContext())


@pytest.mark.slow
def test_after_structural_passes():
    """After ShortGPT the remaining blocks get thresholds; after SliceGPT the sliced linears' inputs do (the shortcut
    matrices are not in a role); in both the target is reached and the logits are finite."""
    from passes.shortgpt import ShortGPTPass
    from passes.slicegpt import SliceGPTPass

    ctx = PassContext(calibration_windows=windows())
    short = ShortGPTPass({"layers": [0]}).run(tiny_program("llama", layers=3), ctx).program
    sliced = SliceGPTPass({"slicing": 0.25}).run(tiny_program("llama"), ctx).program
    for program, blocks in ((short, 2), (sliced, 2)):
        result = ActivationPass({"sparsity": 0.4}).run(program, ctx)
        assert result.report.changes["inputs"] == 4 * blocks
        assert result.report.changes["calibration_sparsity"] == pytest.approx(0.4, abs=0.01)
        assert torch.isfinite(result.program.logits(windows(n=1))).all()


def test_a_role_the_model_does_not_have():
    """After every attention sublayer is removed the blocks have no attn_in: asking for it is refused, naming the
    roles there are."""
    from passes.shortgpt import ShortGPTPass

    ctx = PassContext(calibration_windows=windows())
    program = ShortGPTPass({"remove": 2, "strategy": "attention"}).run(tiny_program("llama"), ctx).program
    with pytest.raises(UserError, match="has no attn_in linears; its blocks have mlp_in, mlp_out"):
        ActivationPass({"roles": ["attn_in"]}).check(program)
