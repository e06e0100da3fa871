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
from passes.shortgpt import ShortGPTPass, loss_without_each, score_blocks
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
