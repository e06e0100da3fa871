"""Channel permutation for N:M: exact on every architecture, never a worse kept score, undone when not exact."""

import itertools

import pytest
import torch
from conftest import archs, tiny_program

from nexus_export.errors import UserError
from passes.shared import permute as P
from passes.shared.mask_plan import plan_targets
from passes.shared.masking import MaskConfig
from passes.shared.sparsity import NMPattern, nm_mask, nm_valid
from passes.sparsegpt import SparseGPTPass
from passes.wanda import WandaPass

PATTERN = NMPattern(2, 4)
IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(6))
CALIB = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(5))


def random_norms(program, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {lin.name: torch.rand(lin.in_features, generator=g) * 4 for lin in program.structure.in_blocks()}


@pytest.mark.parametrize("arch", archs())
def test_the_permuted_model_computes_the_same_logits(arch):
    program = tiny_program(arch, random_norms=True)
    before = program.logits(IDS)
    targets = MaskConfig(pattern="2:4").targets(program)
    facts = P.permute(program, targets, PATTERN, random_norms(program), IDS[:1])
    # the stream, each block's MLP and (a separate value projection) each key/value head were permuted, and the check
    # on one window found the same function
    value_heads = {"gpt2": 0, "opt": 4}.get(arch, 2)  # GPT-2 projects q, k and v together; OPT has 4 key/value heads
    assert facts["applied"] and facts["spaces"] == 1 + 2 + 2 * value_heads
    assert set(facts["kept_score_gain"]) == {"stream", "mlp", "value"} - ({"value"} if arch == "gpt2" else set())
    assert all(gain >= 0 for gain in facts["kept_score_gain"].values())
    after = program.logits(IDS)
    assert float((after - before).abs().max() / before.abs().max()) < 1e-5
    # and something did move: the first block's MLP output weights are not in their old order
    down = program.structure.sublayers[1].writers[0]
    assert not torch.equal(program.weight(down), tiny_program(arch, random_norms=True).weight(down))


def test_kept_score_is_what_the_n_m_mask_keeps():
    scores = torch.rand(6, 16, generator=torch.Generator().manual_seed(1))
    kept = float((scores * nm_mask(scores, PATTERN)).sum())
    assert P.kept_score(scores, torch.arange(16), PATTERN) == pytest.approx(kept, rel=1e-6)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(2))
    moved = scores[:, perm]
    expected = float((moved * nm_mask(moved, PATTERN)).sum())
    assert P.kept_score(scores, perm, PATTERN) == pytest.approx(expected, rel=1e-6)


def test_the_chosen_permutation_finds_the_best_grouping_of_a_small_case():
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(5, 8, generator=g) * torch.tensor([9.0, 8, 7, 1, 1, 1, 1, 6])  # big channels share group 0
    best = max(P.kept_score(scores, torch.tensor(list(first) + [c for c in range(8) if c not in first]), PATTERN)
               for first in itertools.combinations(range(8), 4))
    chosen = P.choose_permutation(scores, PATTERN)
    assert sorted(chosen.tolist()) == list(range(8))
    assert P.kept_score(scores, chosen, PATTERN) == pytest.approx(best, rel=1e-6)
    assert best > P.kept_score(scores, torch.arange(8), PATTERN) * 1.05


@pytest.mark.parametrize("seed", range(4))
def test_the_permutation_never_keeps_less_than_the_stored_order(seed):
    scores = torch.rand(64, 32, generator=torch.Generator().manual_seed(seed)) ** 3
    assert P.kept_score(scores, P.choose_permutation(scores, PATTERN), PATTERN) >= P.kept_score(
        scores, torch.arange(32), PATTERN)


def test_a_rewrite_that_changes_the_function_is_undone(monkeypatch, caplog):
    program = tiny_program()
    names = program.weight_names()
    before = {n: program.parameter(n).clone() for n in names}
    real = P.find_spaces

    def readers_only(*args):  # a stream permuted in its readers but not its writers: no longer the same function
        spaces = real(*args)
        stream = spaces[0]
        stream.uses = [u for u in stream.uses if "q_proj" in u.param or "gate_proj" in u.param]
        return [stream]

    monkeypatch.setattr(P, "find_spaces", readers_only)
    facts = P.permute(program, MaskConfig(pattern="2:4").targets(program), PATTERN, random_norms(program), IDS[:1])
    assert not facts["applied"] and facts["logits_rel_change"] > P.EXACT_REL
    assert all(torch.equal(program.parameter(n), before[n]) for n in names)
    assert "left in their order" in caplog.text


def test_wanda_with_permute_reports_it_and_keeps_a_valid_two_four_mask():
    program = tiny_program()
    dense = program.logits(IDS)
    result = WandaPass({"pattern": "2:4", "permute": True}).run(program, ctx_of(CALIB))
    changes = result.report.changes
    assert changes["permutation"]["applied"] and changes["permutation"]["spaces"] == 7
    assert changes["overall_sparsity"] == 0.5
    assert all(nm_valid(result.program.weight(lin.name), PATTERN) for lin in result.program.structure.in_blocks())
    assert torch.isfinite(result.program.logits(IDS)).all() and not torch.equal(result.program.logits(IDS), dense)


def test_magnitude_permutes_on_weights_alone_without_calibration():
    program = tiny_program()
    targets, facts = plan_targets(program, ctx_of(None), MaskConfig(pattern="2:4", permute=True), calibrated=False)
    assert facts["permutation"]["applied"] and len(targets) == 14


@pytest.mark.parametrize("options, message", [
    ({"permute": True}, "needs --pattern N:M"),
    ({"permute": True, "sparsity": 0.5}, "needs --pattern N:M"),
])
def test_permute_without_a_pattern_is_refused(options, message):
    with pytest.raises(UserError, match=message):
        WandaPass(options)


def ctx_of(windows):
    from nexus_export.engine.pass_base import PassContext

    return PassContext(calibration_windows=windows)


def test_sparsegpt_chooses_its_permutation_by_obs_saliency():
    from passes.shared.mask_plan import dense_scales

    program = tiny_program()
    names = [lin.name for lin in program.structure.in_blocks()]
    norms = dense_scales(program, CALIB, names)
    obs = dense_scales(program, CALIB, names, obs=True, percdamp=0.01)
    tokens = CALIB.numel()
    for name in names:  # [H^-1]_jj >= 1 / H_jj for any positive definite H: the OBS scale never exceeds sqrt(H_jj)
        diag = 2 / tokens * norms[name].double() ** 2
        damped = diag + 0.01 * diag.mean()
        assert (obs[name].double() <= damped.sqrt() * (1 + 1e-4)).all(), name
        assert (obs[name].double() < 0.99 * damped.sqrt()).any(), name  # correlated inputs: strictly below somewhere
    twelve = torch.randint(0, 300, (12, 32), generator=torch.Generator().manual_seed(7))
    result = SparseGPTPass({"pattern": "2:4", "permute": True}).run(program, ctx_of(twelve))
    assert result.report.changes["permutation"]["applied"]
    assert result.report.changes["dense_sweep"]["windows"] == 8  # PERMUTE_WINDOWS of the 12 calibration windows
