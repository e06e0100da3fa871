"""OWL's per-block sparsities: outlier shares, the mapping around the target, and the passes that use it."""

import pytest
import torch
from conftest import tiny_program

from nexus_export.engine.pass_base import PassContext
from nexus_export.errors import UserError
from passes.magnitude import MagnitudePass
from passes.shared import owl
from passes.sparsegpt import SparseGPTPass
from passes.wanda import WandaPass

CALIB = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(5))


def test_block_sparsities_centre_on_the_target_and_spread_two_lambda():
    chosen = owl.block_sparsities({0: 0.01, 1: 0.03, 2: 0.02, 3: 0.01}, 0.6, 0.08)
    assert sum(chosen.values()) / 4 == pytest.approx(0.6)
    assert chosen[1] == pytest.approx(min(chosen.values())) and chosen[0] == pytest.approx(max(chosen.values()))
    assert max(chosen.values()) - min(chosen.values()) == pytest.approx(0.16)  # the most outliers: pruned least
    assert chosen[2] == pytest.approx(0.6 + 0.06 - 0.08)  # r = (0, 0.16, 0.08, 0): mean 0.06
    assert owl.block_sparsities({0: 0.02, 1: 0.02}, 0.5, 0.08) == {0: 0.5, 1: 0.5}
    with pytest.raises(UserError, match="lower --owl-lambda"):
        owl.block_sparsities({0: 0.0, 1: 1.0}, 0.95, 0.08)


def test_outlier_share_counts_scores_above_m_times_the_block_mean():
    program = tiny_program()
    names = [lin.name for lin in program.structure.in_blocks() if lin.block == 0]
    norms = {n: torch.ones(program.linear(n).in_features) for n in names}
    scores = torch.cat([program.weight(n).abs().reshape(-1) for n in names])
    expected = float((scores > 2 * scores.mean()).float().mean())
    assert owl.outlier_share(program, names, norms, 2.0) == pytest.approx(expected) and 0 < expected < 0.2
    norms[names[0]][0] = 1e4  # one input channel of q carries huge activations: its 64 weights are the outliers
    assert owl.outlier_share(program, names, norms, 2.0) == pytest.approx(64 / scores.numel())


@pytest.mark.parametrize("pass_cls", [WandaPass, SparseGPTPass, MagnitudePass])
def test_owl_prunes_blocks_differently_at_the_same_overall_sparsity(pass_cls):
    program = tiny_program(layers=4)
    result = pass_cls({"sparsity": 0.6, "layerwise": "owl", "owl_m": 3.0}).run(program, PassContext(CALIB))
    changes = result.report.changes
    chosen = changes["layerwise"]["block_sparsity"]
    assert len(chosen) == 4 and max(chosen.values()) - min(chosen.values()) == pytest.approx(0.16, abs=1e-6)
    assert changes["overall_sparsity"] == pytest.approx(0.6, abs=0.01)  # per-row rounding of 64-wide rows
    by_block = {}
    for name, layer in changes["per_layer"].items():
        by_block.setdefault(str(result.program.linear(name).block), []).append(layer["sparsity"])
    for block, sparsities in by_block.items():  # every linear of a block at its block's sparsity
        assert all(s == pytest.approx(chosen[block], abs=0.02) for s in sparsities)


def test_magnitude_with_owl_needs_calibration():
    assert MagnitudePass({"sparsity": 0.6, "layerwise": "owl"}).needs_calibration
    assert not MagnitudePass({"sparsity": 0.6}).needs_calibration


@pytest.mark.parametrize("options, message", [
    ({"pattern": "2:4", "layerwise": "owl"}, "N:M fixes every layer's"),
    ({"sparsity": 0.6, "layerwise": "owl", "owl_lambda": 0.5}, r"in \(0, 0.5\)"),
    ({"sparsity": 0.6, "layerwise": "owl", "owl_lambda": 0.0}, r"in \(0, 0.5\)"),
    ({"sparsity": 0.6, "layerwise": "owl", "owl_m": -1.0}, "must be positive"),
    ({"sparsity": 0.6, "layerwise": "owl", "schedule": {"mlp_out": 0.5}}, "drop --schedule"),
    ({"sparsity": 0.6, "layerwise": "outliers"}, "uniform or owl"),
])
def test_bad_owl_options_are_refused(options, message):
    with pytest.raises(UserError, match=message):
        WandaPass(options)
