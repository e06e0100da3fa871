"""Wanda: masks equal a direct computation of |W| * ||X_j||, N:M validity, every architecture."""

import pytest
import torch
from conftest import archs, make_tiny, tiny_program

from nexus_export.engine.pass_base import PassContext
from nexus_export.graph.program import Program
from passes import wanda
from passes.shared.sparsity import NMPattern, nm_mask, nm_valid, unstructured_mask
from passes.wanda import WandaPass, wanda_mask


def record_input(store):
    """A forward pre-hook that keeps the first input as [tokens, features] (and returns None: inputs unchanged)."""
    def hook(module, args):
        store.setdefault("x", args[0].detach().reshape(-1, args[0].shape[-1]))
    return hook


def calib(n=4, seq=16):
    return torch.randint(0, 300, (n, seq), generator=torch.Generator().manual_seed(3))


def test_mask_equals_direct_score_computation():
    model = make_tiny("llama")
    ids = calib()
    inputs = {}
    name = "model.layers.0.mlp.down_proj"  # block 0 sees the dense model's activations
    handle = model.get_submodule(name).register_forward_pre_hook(record_input(inputs))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    handle.remove()
    dense = model.get_submodule(name).weight.detach().clone()
    score = dense.abs() * inputs["x"].double().pow(2).sum(0).sqrt().float()
    k = int(dense.shape[1] * 0.5)
    expected_pruned = torch.zeros_like(dense, dtype=torch.bool)
    expected_pruned.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)

    program = Program.from_model(model)
    WandaPass({"sparsity": 0.5}).run(program, PassContext(calibration_windows=ids))
    assert torch.equal(program.weight(name) == 0, expected_pruned)
    assert torch.all((program.weight(name) == 0).sum(dim=1) == k)  # per-row comparison groups


def test_equal_norms_reduce_to_row_magnitude():
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(wanda_mask(w, torch.ones(16), 0.5, None), unstructured_mask(w.abs(), 0.5, per_row=True))


@pytest.mark.parametrize("pattern,sparsity", [(None, 0.3), (NMPattern(2, 4), 0.5)])
def test_the_mask_scored_in_row_chunks_is_the_whole_matrix_mask(monkeypatch, pattern, sparsity):
    """Rows are scored a chunk at a time (3 rows here: 10 rows end in a partial chunk); each row's choice is its own,
    so the mask is the one of the whole float64 score matrix."""
    w = torch.randn(10, 16, generator=torch.Generator().manual_seed(1))
    norms = torch.rand(16, generator=torch.Generator().manual_seed(2)) + 0.5
    scores = w.abs().double() * norms.double()
    whole = nm_mask(scores, pattern) if pattern else unstructured_mask(scores, sparsity, per_row=True)
    monkeypatch.setattr(wanda, "MASK_ROWS", 3)
    chunked = wanda.wanda_mask(w, norms, sparsity, pattern)
    assert torch.equal(chunked, whole) and int((~chunked).sum()) == (80 if pattern else 10 * int(16 * sparsity))


@pytest.mark.parametrize("arch", archs())
def test_two_four_valid_on_every_architecture(arch):
    program = tiny_program(arch)
    changes = WandaPass({"pattern": "2:4"}).run(program, PassContext(calibration_windows=calib())).report.changes
    assert changes["overall_sparsity"] == pytest.approx(0.5)
    for lin in program.structure.in_blocks():
        assert nm_valid(program.weight(lin.name), NMPattern(2, 4))
