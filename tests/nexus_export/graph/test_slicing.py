"""Norm fusion, stream projections and rotate-and-slice on every tiny architecture: the function is kept exactly where
it must be, and the sliced program computes what the projected calibration program computes."""

import pytest
import torch
from conftest import archs, make_tiny, random_bases, tiny_program
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from nexus_export.graph.program import Program
from nexus_export.graph.slicing import (
    NormNotFusable,
    align_bases,
    find_norms,
    fuse_norms,
    rotate_and_slice,
    with_projections,
)
from nexus_export.graph.trace_settings import tracing

IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", archs())
def test_fusion_keeps_logits_and_leaves_scale_free_norms(arch):
    program = tiny_program(arch, random_norms=True)
    fused = fuse_norms(program)
    assert rel(fused.logits(IDS), program.logits(IDS)) < 1e-5
    sites = find_norms(fused, fused.exported)
    assert len(sites) == 2 * 2 + 1  # two sublayers per block, plus the final norm
    assert all(s.kind == "rmsnorm" and s.weight is None and s.bias is None for s in sites)
    assert stale_values(fused) == []  # fused without a retrace: the new nodes' shapes are right
    assert not fused.structure.tied_embedding
    head = fused.structure.linears[fused.structure.lm_head].weight
    assert head not in fused.structure.embeddings.values()
    if arch in ("opt", "gpt2"):  # LayerNorm models: every write to the stream is zero-mean across features
        for param in fused.structure.embeddings.values():
            assert float(fused.parameter(param).detach().double().mean(dim=1).abs().max()) < 1e-6
        for sub in fused.structure.sublayers:
            for name in sub.writers:
                assert float(fused.weight(name).detach().double().mean(dim=0).abs().max()) < 1e-6


def stale_values(program: Program) -> list[str]:
    """Nodes whose recorded value's shape differs from the shape a fresh fake run of the graph gives."""
    graph_module = program.exported.graph_module
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    fake_mode = detect_fake_mode([n.meta["val"] for n in placeholders])
    recorded = {n.name: n.meta.get("val") for n in graph_module.graph.nodes}
    with tracing():  # as the graph edits run it, on every supported torch
        FakeTensorProp(graph_module, fake_mode).propagate_dont_convert_inputs(*[n.meta["val"] for n in placeholders])
    stale = [n.name for n in graph_module.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)
             and str(recorded[n.name].shape) != str(n.meta["val"].shape)]
    for node in graph_module.graph.nodes:
        node.meta["val"] = recorded[node.name]
    return stale


@pytest.mark.parametrize("arch", archs())
def test_full_width_rotation_keeps_logits(arch, caplog):
    program = tiny_program(arch, random_norms=True)
    fused = fuse_norms(program)
    projected, matrices = with_projections(fused)
    assert torch.equal(projected.logits(IDS), fused.logits(IDS))  # identity projections
    width = projected.store.shape(matrices[0])[0]
    with caplog.at_level("INFO", logger="nexus_export.progress"):
        rotated = rotate_and_slice(fused, random_bases(len(matrices), width))
    done = len(program.structure.sublayers)
    assert f"rotate and slice: {done}/{done} sublayers" in caplog.text  # the long rewrite reports its progress
    assert rel(rotated.logits(IDS), program.logits(IDS)) < 1e-5
    shortcuts = [lin for lin in rotated.structure.linears.values() if lin.role == "shortcut"]
    assert len(shortcuts) == len(rotated.structure.sublayers)  # the basis changes at every residual add
    assert len(rotated.structure.in_blocks()) == len(program.structure.in_blocks())  # shortcuts are not targets


@pytest.mark.parametrize("arch", archs())
def test_sliced_program_computes_what_the_projected_program_computes(arch):
    fused = fuse_norms(tiny_program(arch, random_norms=True))
    projected, matrices = with_projections(fused)
    bases = random_bases(len(matrices), projected.store.shape(matrices[0])[0], seed=1)
    widths = [40] * len(matrices)
    for m, q, d in zip(matrices, bases, widths):
        projected.set_parameter(m, (q[:, :d] @ q[:, :d].t()).float(), dtype=torch.float32)
    sliced = rotate_and_slice(fused, [q[:, :d] for q, d in zip(bases, widths)])
    assert rel(sliced.logits(IDS), projected.logits(IDS)) < 1e-5
    assert rel(sliced.logits(IDS), fused.logits(IDS)) > 1e-2  # and slicing did change the function
    structure = sliced.structure
    for sub in structure.sublayers:
        assert all(sliced.linear(n).in_features == 40 for n in sub.readers)
        assert all(sliced.linear(n).out_features == 40 for n in sub.writers)
    assert sliced.linear(structure.lm_head).in_features == 40
    assert all(sliced.parameter(p).shape[1] == 40 for p in structure.embeddings.values())
    assert sliced.origin["sliced_widths"] == widths


def test_same_basis_at_consecutive_points_needs_no_shortcut():
    fused = fuse_norms(tiny_program("llama"))
    _, matrices = with_projections(fused)
    (q,) = random_bases(1, 64)
    sliced = rotate_and_slice(fused, [q[:, :48]] * len(matrices))
    assert not [lin for lin in sliced.structure.linears.values() if lin.role == "shortcut"]


@pytest.mark.slow
def test_aligned_bases_span_the_same_subspaces_and_compute_the_same_function():
    fused = fuse_norms(tiny_program("llama", random_norms=True))
    _, matrices = with_projections(fused)
    bases = [q[:, :40] for q in random_bases(len(matrices), 64, seed=2)]
    aligned = align_bases(bases)
    for b, a in zip(bases, aligned):
        assert torch.allclose(a.t() @ a, torch.eye(40, dtype=torch.float64), atol=1e-10)
        assert torch.allclose(a @ a.t(), b @ b.t(), atol=1e-10)  # the same projection
    for prev, cur, raw in zip(aligned, aligned[1:], bases[1:]):  # each shortcut is nearer identity than before
        eye = torch.eye(40, dtype=torch.float64)
        assert (prev.t() @ cur - eye).norm() < (prev.t() @ raw - eye).norm()
    plain, turned = rotate_and_slice(fused, bases), rotate_and_slice(fused, aligned)
    assert rel(turned.logits(IDS), plain.logits(IDS)) < 1e-5
    full = align_bases(random_bases(len(matrices), 64, seed=3))  # nothing sliced: one basis for every point
    assert all(torch.allclose(f, full[0], atol=1e-10) for f in full)
    rotated = rotate_and_slice(fused, full)
    assert not [lin for lin in rotated.structure.linears.values() if lin.role == "shortcut"]


def test_a_norm_of_unknown_form_is_named():
    model = make_tiny("llama", layers=1)
    norm = model.model.layers[0].post_attention_layernorm
    norm.forward = lambda x: x / (x.abs().mean(-1, keepdim=True) + 1e-6) * norm.weight
    program = Program.from_model(model)
    with pytest.raises(NormNotFusable, match="in front of model.layers.0.mlp.gate_proj"):
        fuse_norms(program)
