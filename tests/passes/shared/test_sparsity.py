"""Pattern math, schedules and targets shared by the masking passes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_export.errors import UserError
from passes.shared.sparsity import NMPattern, nm_mask, nm_valid, parse_pattern, resolve_targets, unstructured_mask


@settings(max_examples=60, deadline=None)
@given(m=st.integers(2, 8), data=st.data())
def test_any_nm_mask_has_exactly_n_zeros_per_group(m, data):
    n = data.draw(st.integers(1, m - 1))
    rows = data.draw(st.integers(1, 6))
    groups = data.draw(st.integers(1, 6))
    seed = data.draw(st.integers(0, 2**16))
    scores = torch.rand(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    keep = nm_mask(scores, NMPattern(n, m))
    pruned_per_group = (~keep).reshape(rows, groups, m).sum(dim=2)
    assert torch.all(pruned_per_group == n)
    # The pruned ones are the lowest scores of their group.
    g = scores.reshape(rows, groups, m)
    k = keep.reshape(rows, groups, m)
    assert torch.all(g.masked_fill(k, float("-inf")).amax(dim=2) <= g.masked_fill(~k, float("inf")).amin(dim=2))
    assert nm_valid(scores * keep, NMPattern(n, m))


def test_nm_valid_on_hand_made_weights():
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0]])
    assert nm_valid(w, NMPattern(2, 4))
    w[0, 0] = 5.0
    assert not nm_valid(w, NMPattern(2, 4))
    assert nm_valid(w, NMPattern(1, 4))
    assert not nm_valid(torch.zeros(2, 6), NMPattern(2, 4))  # 6 is not a multiple of 4


def test_unstructured_mask_counts():
    scores = torch.arange(20.0).reshape(4, 5)
    keep = unstructured_mask(scores, 0.5)
    assert (~keep).sum() == 10 and not keep.flatten()[:10].any() and keep.flatten()[10:].all()
    keep_rows = unstructured_mask(scores.flip(0), 0.4, per_row=True)
    assert torch.all((~keep_rows).sum(dim=1) == 2)
    assert not keep_rows[:, :2].any()


@pytest.mark.parametrize("text", ["3:2", "2:0", "abc", "2:2", "0:4", "2-4"])
def test_bad_patterns(text):
    with pytest.raises(UserError):
        parse_pattern(text)


def test_pattern_parsing():
    assert parse_pattern("2:4") == NMPattern(2, 4) and parse_pattern("2:4").sparsity == 0.5
    assert parse_pattern("1:4").sparsity == 0.25 and str(parse_pattern(" 4 : 8 ")) == "4:8"
    assert parse_pattern(None) is None and parse_pattern("unstructured") is None


def test_nm_on_indivisible_layer_names_it():
    with pytest.raises(UserError, match="my.layer"):
        nm_mask(torch.rand(3, 6), NMPattern(2, 4), "my.layer")


@pytest.fixture(scope="module")
def llama_structure(tiny_program_factory):
    return tiny_program_factory("llama").structure


def test_default_scope_is_every_block_linear(llama_structure):
    targets = resolve_targets(llama_structure, 0.5)
    assert {t.name for t in targets} == {l.name for l in llama_structure.in_blocks()}
    assert all(t.sparsity == 0.5 for t in targets)


def test_schedule_syntax_users_know(llama_structure):
    schedule = {"embed": 0.0, "layer_0": 0.3, "layer_1-1": 0.6, "mlp_out": 0.5, "lm_head": 0.2,
                "model.layers.1.self_attn.q_proj": 0.1}
    got = {t.name: t.sparsity for t in resolve_targets(llama_structure, 0.9, schedule)}
    assert got["model.layers.0.self_attn.k_proj"] == 0.3
    assert got["model.layers.1.mlp.up_proj"] == 0.6
    assert got["model.layers.0.mlp.down_proj"] == 0.5  # role beats block range
    assert got["model.layers.1.self_attn.q_proj"] == 0.1  # module name beats everything
    assert got["lm_head"] == 0.2
    assert "model.embed_tokens" not in got


@pytest.mark.parametrize("schedule, message", [
    ({"layer_7": 0.5}, "outside"),
    ({"attn_qkv": 0.5}, "matches no layer"),
    ({"mlp_in": 1.5}, "outside"),
])
def test_schedule_errors(llama_structure, schedule, message):
    with pytest.raises(UserError, match=message):
        resolve_targets(llama_structure, 0.5, schedule)


def test_nm_with_other_sparsity_is_refused(llama_structure):
    with pytest.raises(UserError, match="2:4"):
        resolve_targets(llama_structure, 0.5, {"mlp_out": 0.3}, NMPattern(2, 4))
