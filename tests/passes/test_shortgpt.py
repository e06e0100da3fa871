"""ShortGPT: block scores, removal from the graph, strategies, bad input, Hugging Face round trip."""

import copy

import onnx
import pytest
import torch
from conftest import BlockStack, archs, make_tiny, tiny_program

from nexus_export.engine.pass_base import PassContext
from nexus_export.errors import UserError
from nexus_export.graph.hf_export import save_hf
from nexus_export.graph.program import Program
from nexus_export.graph.runner import BlockRunner
from passes.shortgpt import ShortGPTPass, loss_without_each, loss_without_each_sublayer, score_blocks, sublayer_params
from runtimes.onnx_export import lower_to_onnx


def calib(n=4, seq=16):
    return torch.randint(0, 300, (n, seq), generator=torch.Generator().manual_seed(5))


def ctx():
    return PassContext(calibration_windows=calib())


def test_removing_nothing_is_identity():
    program = tiny_program("llama", layers=3)
    ids = calib(n=1)
    before = program.logits(ids)
    result = ShortGPTPass({"remove": 0}).run(program, ctx())
    assert result.report.changes["removed"] == [] and len(result.program.structure.blocks) == 3
    assert torch.equal(result.program.logits(ids), before)


def test_a_block_that_adds_nothing_scores_lowest_and_goes():
    model = make_tiny("llama", layers=4)
    with torch.no_grad():  # block 2 writes nothing to the stream: its output equals its input
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    program = Program.from_model(model)
    scores = score_blocks(program, calib(), "similarity")
    assert scores[2] == pytest.approx(0.0, abs=1e-9) and min(scores, key=scores.get) == 2
    assert all(scores[k] > 1e-4 for k in (0, 1, 3))
    result = ShortGPTPass({"remove": 1}).run(program, ctx())
    assert result.report.changes["removed"] == [2]
    assert result.report.changes["scores"]["2"] == pytest.approx(0.0, abs=1e-9)
    ids = calib(n=1)
    assert torch.allclose(result.program.logits(ids), program.logits(ids), atol=1e-5)  # removing it changes nothing


@pytest.mark.slow
@pytest.mark.parametrize("arch", archs("llama", "gpt2", "opt"))
def test_removed_blocks_are_gone_from_the_onnx(arch, tmp_path):
    model = make_tiny(arch, layers=4)
    program = Program.from_model(model)
    new = ShortGPTPass({"layers": "1,2"}).run(program).program
    assert new.structure.blocks == [f"{program.structure.block_list}.{k}" for k in range(2)]
    reference = copy.deepcopy(model)  # the same model with the blocks deleted by hand
    blocks = reference.get_submodule(program.structure.block_list)
    del blocks[2], blocks[1]
    ids = calib(n=2)
    with torch.no_grad():
        assert torch.allclose(reference(input_ids=ids).logits, new.logits(ids), atol=1e-5)
    assert program.num_parameters() - new.num_parameters() == sum(p.numel() for p in model.get_submodule(
        f"{program.structure.block_list}.1").parameters()) * 2
    sizes = {}
    for label, prog in (("dense", program), ("short", new)):
        path = lower_to_onnx(prog, tmp_path / label / "model.onnx")
        graph = onnx.load(str(path), load_external_data=False).graph
        sizes[label] = (len(graph.node), len(graph.initializer))
    assert sizes["short"][0] < sizes["dense"][0] and sizes["short"][1] < sizes["dense"][1]
    # every remaining initializer of the block list is numbered 0 or 1
    names = [i.name for i in onnx.load(str(tmp_path / "short" / "model.onnx"), load_external_data=False).graph.initializer]
    numbered = {n[len("lm." + program.structure.block_list) + 1:].split(".")[0] for n in names
                if n.startswith("lm." + program.structure.block_list + ".")}
    assert numbered == {"0", "1"}
    # the key/value-cache model has one past pair per remaining block, numbered 0 and 1
    kv = onnx.load(str(tmp_path / "short" / "model.kv.onnx"), load_external_data=False).graph
    assert sorted(v.name for v in kv.input if v.name.startswith("past_")) == [
        f"past_key_values.{i}.{kind}" for i in range(2) for kind in ("key", "value")]


def test_attention_strategy_removes_only_attention():
    program = tiny_program("llama", layers=3)
    result = ShortGPTPass({"remove": 2, "strategy": "attention"}).run(program, ctx())
    removed = result.report.changes["removed"]
    assert len(removed) == 2 and result.report.changes["unit"] == "attention sublayer"
    kinds = [(s.block, s.kind) for s in result.program.structure.sublayers]
    assert sum(kind == "attention" for _, kind in kinds) == 1 and sum(kind == "mlp" for _, kind in kinds) == 3
    assert len(result.program.structure.blocks) == 3
    assert not any(l.role.startswith("attn") and l.block in removed for l in result.program.structure.linears.values())


def test_gradient_strategy_scores_every_block():
    program = tiny_program("llama", layers=3)
    scores = score_blocks(program, calib(), "gradient")
    assert sorted(scores) == [0, 1, 2] and all(v >= 0 for v in scores.values()) and max(scores.values()) > 0
    result = ShortGPTPass({"remove_ratio": 0.34, "strategy": "gradient"}).run(program, ctx())
    assert result.report.changes["removed"] == [min(scores, key=scores.get)]


def loss_of(program, ids):
    """Mean next-token NLL of ``program`` on ``ids``, by plain logits."""
    logits = program.logits(ids)
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   ids[:, 1:].reshape(-1)))


def test_perplexity_strategy_scores_are_the_loss_without_each_block():
    """Each score is exactly the calibration loss of the model with that block deleted by surgery."""
    from nexus_export.graph.surgery import remove_blocks

    program = tiny_program("llama", layers=4)
    ids = calib()
    scores = loss_without_each(program, ids, set())
    assert sorted(scores) == [0, 1, 2, 3]
    for k, score in scores.items():
        assert score == pytest.approx(loss_of(remove_blocks(program, [k]), ids), rel=1e-5)
    without_1 = loss_without_each(program, ids, {1})  # iterative rounds: block 1 already gone
    assert sorted(without_1) == [0, 2, 3]
    assert without_1[3] == pytest.approx(loss_of(remove_blocks(program, [1, 3]), ids), rel=1e-5)

    result = ShortGPTPass({"remove": 2, "strategy": "perplexity", "rank_windows": 3, "iterative": True}).run(
        program, ctx())
    changes = result.report.changes
    first = changes["removal_order"][0]
    assert str(first) == min(changes["scores"], key=changes["scores"].get)  # the first round's scores
    assert changes["rank_windows"] == 3 and changes["iterative"] and len(changes["removal_order"]) == 2
    assert changes["removed"] == sorted(changes["removal_order"]) and changes["ranking_s"] >= 0
    again = loss_without_each(program, calib()[:3], {first})  # the second removal is the best given the first
    assert changes["removal_order"][1] == min(again, key=again.get)


@pytest.mark.parametrize("options, message", [
    ({"remove": 4}, "cannot remove 4 of 4 blocks"),
    ({"remove": -1}, "0 or more"),
    ({"layers": [1, 7]}, "out of range"),
    ({"layers": "1,1"}, "more than once"),
    ({"remove": 1, "layers": [1]}, "exactly one"),
    ({"remove": 1, "strategy": "bogus"}, "unknown strategy"),
    ({"remove": 1, "rank_windows": 4}, "belong to strategy perplexity"),
    ({"remove": 1, "iterative": True}, "belong to strategy perplexity"),
    ({"remove": 1, "strategy": "perplexity", "rank_windows": 0}, "positive number of windows"),
])
def test_bad_input(options, message):
    program = tiny_program("llama", layers=4)
    with pytest.raises(UserError, match=message):
        ShortGPTPass(options).check(program)


class MLPBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.up, self.down = torch.nn.LayerNorm(16), torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


def test_attention_strategy_needs_attention():
    program = Program.from_model(BlockStack([MLPBlock() for _ in range(3)]))
    assert [s.kind for s in program.structure.sublayers] == ["mlp"] * 3
    with pytest.raises(UserError, match="needs blocks with an attention sublayer"):
        ShortGPTPass({"remove": 1, "strategy": "attention"}).check(program)


@pytest.mark.parametrize("arch", archs("llama", "gpt2"))
def test_hugging_face_folder_round_trip(arch, tmp_path):
    import transformers

    program = tiny_program(arch, layers=4)
    new = ShortGPTPass({"layers": [0, 3]}).run(program).program
    diff = save_hf(new, tmp_path / "hf")
    assert diff < 1e-5
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", use_safetensors=True)
    assert loaded.config.num_hidden_layers == 2
    assert not list((tmp_path / "hf").glob("*.bin")) and list((tmp_path / "hf").glob("*.safetensors"))
    ids = calib(n=1)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, new.logits(ids), atol=1e-5)


def test_hugging_face_folder_refused_after_attention_removal(tmp_path):
    program = tiny_program("llama", layers=3)
    new = ShortGPTPass({"layers": [1], "strategy": "attention"}).run(program).program
    with pytest.raises(UserError, match="attention sublayers were removed"):
        save_hf(new, tmp_path / "hf")


def test_rank_windows_beyond_the_calibration_set_is_refused():
    program = tiny_program("llama", layers=4)
    pass_ = ShortGPTPass({"remove": 1, "strategy": "perplexity", "rank_windows": 5})
    with pytest.raises(UserError, match="--rank-windows 5 is more than the 4 calibration windows"):
        pass_.check_calibration(program, calib())


# ------------------------------------------------------------------------------------------------ sublayers

def zeroed(program, pairs):
    """``program``'s model with the output projection of each (block, kind) zeroed: the sublayer adds nothing, which is
    what deleting it by hand does (the tiny LLaMA's projections have no bias)."""
    new = program.fork()
    for block, kind in pairs:
        writer = next(s.writers[0] for s in program.structure.sublayers if (s.block, s.kind) == (block, kind))
        new.set_weight(writer, torch.zeros_like(program.weight(writer)))
    return new


def test_a_removed_sublayer_equals_deleting_it_by_hand():
    from nexus_export.graph.surgery import remove_sublayers

    program = tiny_program("llama", layers=3)
    ids = calib(n=2)
    pairs = [(0, "mlp"), (1, "attention"), (2, "attention"), (2, "mlp")]  # block 2 loses both: it goes whole
    new = remove_sublayers(program, pairs)
    assert len(new.structure.blocks) == 2
    assert [(s.block, s.kind) for s in new.structure.sublayers] == [(0, "attention"), (1, "mlp")]
    assert new.origin["attention_removed"] == [1] and new.origin["mlp_removed"] == [0]
    assert torch.allclose(new.logits(ids), zeroed(program, pairs).logits(ids), atol=1e-5)
    assert program.num_parameters() - new.num_parameters() == sum(
        v for u, v in sublayer_params(program).items() if u in pairs) + 4 * 64  # and their norms
    with pytest.raises(UserError, match="no sublayer 5.mlp"):
        remove_sublayers(program, [(5, "mlp")])


def test_sublayer_losses_are_the_loss_without_each():
    from nexus_export.graph.surgery import remove_sublayers

    program = tiny_program("llama", layers=3)
    ids = calib()
    base, losses = loss_without_each_sublayer(program, ids, set())
    assert base == pytest.approx(loss_of(program, ids), rel=1e-5)
    assert sorted(losses) == [(k, kind) for k in range(3) for kind in ("attention", "mlp")]
    for unit, loss in losses.items():
        assert loss == pytest.approx(loss_of(remove_sublayers(program, [unit]), ids), rel=1e-5)
    gone = {(1, "attention"), (2, "mlp")}
    base, losses = loss_without_each_sublayer(program, ids, gone)
    assert base == pytest.approx(loss_of(remove_sublayers(program, sorted(gone)), ids), rel=1e-5)
    assert (1, "attention") not in losses and len(losses) == 4
    assert losses[(1, "mlp")] == pytest.approx(loss_of(remove_sublayers(program, [*gone, (1, "mlp")]), ids), rel=1e-5)


@pytest.mark.parametrize("iterative", [False, True])
def test_sublayers_go_cheapest_per_parameter_until_the_share_is_reached(iterative):
    program = tiny_program("llama", layers=3)
    params = sublayer_params(program)
    result = ShortGPTPass({"granularity": "sublayer", "remove_params": 0.3, "iterative": iterative}).run(
        program, ctx())
    changes = result.report.changes
    assert changes["unit"] == "sublayer" and changes["removed_params_share"] >= 0.3
    order = [(int(b), kind) for b, kind in (label.split(".") for label in changes["removal_order"])]
    assert sum(params[u] for u in order[:-1]) < 0.3 * sum(params.values())  # it stopped as soon as it could
    scores = {(int(label.split(".")[0]), label.split(".")[1]): v for label, v in changes["scores"].items()}
    first = min(scores, key=lambda u: (scores[u] - changes["dense_loss"]) / params[u])
    assert order[0] == first
    if iterative and len(order) > 1:  # the second is the cheapest given the first
        base, again = loss_without_each_sublayer(program, calib()[:4], {order[0]})
        assert order[1] == min(again, key=lambda u: (again[u] - base) / params[u])
    assert result.program.num_parameters() < program.num_parameters()


@pytest.mark.parametrize("options, message", [
    ({"remove_params": 0.2}, "belongs to granularity sublayer"),
    ({"granularity": "sublayer", "remove_params": 1.0}, r"must be in \(0, 1\)"),
    ({"granularity": "sublayer", "remove_params": 0.0}, r"must be in \(0, 1\)"),
    ({"granularity": "sublayer", "layers": "1"}, "not layers or remove_ratio"),
    ({"granularity": "sublayer", "remove": 1, "strategy": "gradient"}, "ranks by calibration loss"),
    ({"granularity": "sublayers", "remove": 1}, "unknown granularity"),
    ({"granularity": "sublayer", "remove": 8}, "cannot remove 8 of 8 sublayers"),
])
def test_bad_sublayer_input(options, message):
    program = tiny_program("llama", layers=4)
    with pytest.raises(UserError, match=message):
        ShortGPTPass(options).check(program)


def test_a_budget_that_would_remove_everything_is_refused():
    program = tiny_program("llama", layers=2)
    with pytest.raises(UserError, match="would remove every sublayer"):
        ShortGPTPass({"granularity": "sublayer", "remove_params": 0.99}).run(program, ctx())


@pytest.mark.slow
def test_parallel_blocks_have_no_separate_sublayers():
    program = tiny_program("gpt_neox")
    with pytest.raises(UserError, match="remove whole blocks without it"):
        ShortGPTPass({"granularity": "sublayer", "remove": 1}).check(program)


@pytest.mark.slow
def test_a_sublayer_removed_model_lowers_with_its_cache(tmp_path):
    program = tiny_program("llama", layers=3)
    new = ShortGPTPass({"granularity": "sublayer", "remove": 2}).run(program, ctx()).program
    path = lower_to_onnx(new, tmp_path / "model.onnx")
    from runtimes import ort

    ids = calib(n=2)
    assert float((torch.from_numpy(ort.logits(ort.session(path), ids)) - new.logits(ids)).abs().max()) < 1e-4
    kv = onnx.load(str(tmp_path / "model.kv.onnx"), load_external_data=False).graph
    attention = sum(s.kind == "attention" for s in new.structure.sublayers)
    assert len([v for v in kv.input if v.name.startswith("past_")]) == 2 * attention


def test_a_folded_repair_is_the_fitted_map_on_the_removed_span():
    """Removing block 1's MLP with --repair linear: the stream leaving block 1 is r + y T, with r the stream entering
    block 1, y its attention's output and T the least-squares map onto what the MLP would have made (s - r)."""
    from nexus_export.graph.surgery import remove_sublayers
    from passes.shared.repair import RIDGE, fit_repairs, fold

    program = tiny_program("llama", layers=3)
    ids = calib(n=2, seq=64)  # one micro-batch, 126 tokens for a map of 64 x 64
    (repair,) = fit_repairs(program, ids, [(1, "mlp")])
    assert repair.after == (1, "attention") and repair.span == [(1, "mlp")] and repair.writer.endswith("o_proj")
    dense = BlockRunner(program, ids, batch_size=2)
    r = dense.graphs.blocks[0](dense.load(dense.graphs.blocks[0]), *dense.inputs(0, 0))[0]
    out = dense.graphs.blocks[1](dense.load(dense.graphs.blocks[1]), *dense.inputs(1, 0, r))
    after_attention, s = out[dense.graphs.residuals[1]["attention"]], out[0]
    y, target = (after_attention - r).reshape(-1, 64).double(), (s - r).reshape(-1, 64).double()
    gram = y.T @ y  # the ridge least-squares solution (the ridge keeps a near-singular y^T y solvable)
    ridged = gram + (RIDGE * float(gram.diagonal().mean()) + 1e-12) * torch.eye(64, dtype=torch.float64)
    least = torch.linalg.solve(ridged, y.T @ target)
    assert torch.allclose(repair.map, least, rtol=1e-4, atol=1e-4 * float(least.abs().max()))
    repaired = program.fork()
    fold(repaired, [repair])
    pruned = remove_sublayers(repaired, [(1, "mlp")])
    runner = BlockRunner(pruned, ids, batch_size=2)
    h = runner.graphs.blocks[0](runner.load(runner.graphs.blocks[0]), *runner.inputs(0, 0))[0]
    leaving = runner.graphs.blocks[1](runner.load(runner.graphs.blocks[1]), *runner.inputs(1, 0, h))[0]
    assert torch.allclose(leaving.double().reshape(-1, 64), r.double().reshape(-1, 64) + y @ repair.map, atol=1e-4)
    measured = float(((leaving - s) ** 2).sum() / ((after_attention - s) ** 2).sum())
    assert repair.residual == pytest.approx(measured, rel=1e-3) and repair.residual < 1.0
    assert program.weight(repair.writer).data_ptr() != repaired.weight(repair.writer).data_ptr()  # dense unchanged


@pytest.mark.parametrize("options", [{"granularity": "sublayer", "remove": 3}, {"layers": "1"}])
def test_the_repair_runs_after_either_removal_and_lowers_the_calibration_loss(options):
    program = tiny_program("llama", layers=3)
    plain = ShortGPTPass(options).run(program, ctx())
    repaired = ShortGPTPass({**options, "repair": "linear"}).run(program, ctx())
    assert repaired.report.changes["removed"] == plain.report.changes["removed"]
    spans = repaired.report.changes["repair"]
    assert spans and all(0.0 <= s["residual"] < 1.0 for s in spans)
    assert loss_of(repaired.program, calib()) < loss_of(plain.program, calib())
    assert repaired.program.num_parameters() == plain.program.num_parameters()  # folded: nothing added


@pytest.mark.parametrize("options, message", [
    ({"remove": 0, "repair": "linear"}, "nothing is"),
    ({"remove": 1, "repair": "quadratic"}, "repair"),
])
def test_bad_repair_input(options, message):
    with pytest.raises(UserError, match=message):
        ShortGPTPass(options).check(tiny_program("llama", layers=4))


@pytest.mark.slow
def test_a_post_norm_model_cannot_be_repaired():
    with pytest.raises(UserError, match="cannot be folded"):
        ShortGPTPass({"remove": 1, "repair": "linear"}).check(tiny_program("olmo2"))
