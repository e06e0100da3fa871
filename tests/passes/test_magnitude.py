"""Magnitude pass: structural effect, identity at 0, exact values, and every tiny architecture."""

import pytest
import torch
from conftest import archs, make_tiny, tiny_program

from nexus_export.errors import UserError
from passes.magnitude import MagnitudePass
from passes.shared.sparsity import NMPattern, nm_valid


def fresh(arch="llama"):
    return tiny_program(arch)


@pytest.mark.parametrize("arch", archs())
def test_two_four_on_every_architecture(arch):
    program = fresh(arch)
    dense = {n: program.weight(n).clone() for n in program.structure.linears}
    result = MagnitudePass({"pattern": "2:4"}).run(program)
    changes = result.report.changes
    assert changes["targeted_layers"] == len(program.structure.in_blocks())
    assert changes["overall_sparsity"] == pytest.approx(0.5)
    for lin in program.structure.in_blocks():
        w = program.weight(lin.name)
        assert nm_valid(w, NMPattern(2, 4))
        # kept weights are unchanged and are the two largest |w| of each group of four
        assert torch.equal(w[w != 0], dense[lin.name][w != 0])
        groups = dense[lin.name].abs().reshape(w.shape[0], -1, 4)
        kept = (w != 0).reshape(w.shape[0], -1, 4)
        assert torch.all(groups.masked_fill(~kept, float("inf")).amin(2) >= groups.masked_fill(kept, -1).amax(2))
    assert torch.equal(program.weight("lm_head"), dense["lm_head"])  # outside the default scope


def test_zero_sparsity_is_identity():
    program = fresh()
    before = {k: program.parameter(k).clone() for k in program.weight_names()}
    report = MagnitudePass({"sparsity": 0.0}).run(program).report
    assert report.changes["targeted_layers"] == 0
    assert all(torch.equal(before[k], program.parameter(k)) for k in program.weight_names())


def test_unstructured_exact_count_and_values():
    program = fresh()
    MagnitudePass({"sparsity": 0.3}).run(program)
    w = program.weight("model.layers.0.mlp.down_proj")
    assert int((w == 0).sum()) == int(w.numel() * 0.3)


def test_zeros_reach_the_forward_pass():
    program = fresh()
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    dense = program.logits(ids)
    MagnitudePass({"sparsity": 0.5}).run(program)
    pruned = program.logits(ids)
    assert (dense - pruned).abs().max() > 1e-3
    ref = make_tiny("llama")
    with torch.no_grad():
        for lin in program.structure.in_blocks():
            ref.get_submodule(lin.name).weight.copy_(program.weight(lin.name))
        assert torch.allclose(ref(input_ids=ids).logits, pruned, atol=1e-5)


def test_global_threshold_gives_nonuniform_layers():
    program = fresh()
    changes = MagnitudePass({"sparsity": 0.5, "uniform": False}).run(program).report.changes
    assert changes["overall_sparsity"] == pytest.approx(0.5, abs=1e-3)
    per = [v["sparsity"] for v in changes["per_layer"].values()]
    assert max(per) - min(per) > 0.01


@pytest.mark.parametrize("options, message", [
    ({"sparsity": 1.0}, "outside"),
    ({"sparsity": -0.1}, "outside"),
    ({"pattern": "3:2"}, "0 < N < M"),
    ({"pattern": "2:4", "sparsity": 0.3}, "contradicts"),
    ({"sparsity": 0.5, "bogus": 1}, "valid options"),
])
def test_bad_options(options, message):
    with pytest.raises(UserError, match=message):
        MagnitudePass(options)
