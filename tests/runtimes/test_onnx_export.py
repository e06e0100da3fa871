"""Lowering: checker, symbolic dims, parity at two shapes, weights folded under their parameter names."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_program

from nexus_export.errors import UserError
from runtimes import ort, parity
from runtimes.onnx_export import export_graph, lower_to_onnx


def _dims(value: onnx.ValueInfoProto) -> list:
    return [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]


def test_lowered_llama_passes_checker_with_symbolic_dims(tiny_llama):
    path = tiny_llama.onnx_path
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    assert [v.name for v in model.graph.input] == ["input_ids", "attention_mask"]
    assert [_dims(v) for v in model.graph.input] == [["batch", "sequence"]] * 2
    assert [(v.name, _dims(v)) for v in model.graph.output] == [("logits", ["batch", "sequence", 300])]
    assert {entry.domain: entry.version for entry in model.opset_import}[""] == 18
    # one data file next to the model, no temporary folder left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.kv.onnx", "model.onnx", "model.onnx.data"]
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


@pytest.mark.parametrize("shape", [(1, 8), (3, 21)])
def test_llama_runs_at_two_shapes_with_parity(tiny_llama, shape):
    sess = ort.session(tiny_llama.onnx_path, threads=1)
    ids = torch.randint(0, 300, shape, generator=torch.Generator().manual_seed(shape[1]))
    mask = torch.ones_like(ids)
    mask[-1, -2:] = 0  # right padding on the last row
    assert ort.logits(sess, ids, mask).shape == (*shape, 300)
    assert parity.max_abs_diff(tiny_llama.program.logits(ids, mask), sess, ids, mask) < 1e-4


@pytest.mark.slow
def test_gpt2_lowers_with_parity(tiny_gpt2):
    sess = ort.session(tiny_gpt2.onnx_path, threads=1)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    assert parity.max_abs_diff(tiny_gpt2.program.logits(ids), sess, ids, torch.ones_like(ids)) < 1e-4


@pytest.mark.slow
def test_no_transpose_left_on_weights_but_a_tied_head(tiny_llama, tiny_gpt2):
    for lowered, kept in ((tiny_llama, []), (tiny_gpt2, ["lm.lm_head.weight"])):
        model = onnx.load(str(lowered.onnx_path), load_external_data=False)
        names = {t.name for t in model.graph.initializer}
        assert [n.input[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in names] == kept


@pytest.mark.slow
def test_folded_weights_keep_their_names_and_values(tiny_llama, tiny_gpt2):
    for lowered in (tiny_llama, tiny_gpt2):
        model = onnx.load(str(lowered.onnx_path))
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        for lin in lowered.program.structure.in_blocks():
            kn = lowered.program.weight(lin.name).numpy().T  # [K, N]: the MatMul's layout
            assert np.array_equal(inits[lin.weight], kn), lin.name


def test_weights_are_streamed_from_the_store_one_read_each(tmp_path):
    program = tiny_program("llama")
    reads = []
    real_get = program.store.get
    program.store.get = lambda name, *a, **kw: reads.append(name) or real_get(name, *a, **kw)
    lower_to_onnx(program, tmp_path / "model.onnx")
    assert sorted(reads) == sorted(set(reads)) and set(reads) == set(program.store.names())


def test_bf16_weights_are_stored_in_bf16_and_cast_for_onnxruntime(tmp_path):
    program = tiny_program("llama")
    path = lower_to_onnx(program, tmp_path / "model.onnx", dtype=torch.bfloat16)
    model = onnx.load(str(path), load_external_data=False)
    dtypes = {t.name: t.data_type for t in model.graph.initializer}
    big = [lin.weight for lin in program.structure.linears.values()]
    assert all(dtypes[w] == onnx.TensorProto.BFLOAT16 for w in big)
    assert dtypes["lm.model.norm.weight"] == onnx.TensorProto.FLOAT  # small tensors stay float32
    casts = [n.input[0] for n in model.graph.node if n.op_type == "Cast" and n.name.startswith("cast_")]
    assert sorted(casts) == sorted(big + ["lm.model.embed_tokens.weight"])
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    rounded = program.store.fork()
    for name in program.weight_names():
        if math.prod(rounded.shape(name)) >= 1024:
            rounded.set(name, rounded.get(name).to(torch.bfloat16), dtype=torch.bfloat16)
    expected = program.derive(program.exported, rounded).logits(ids)
    assert parity.max_abs_diff(expected, ort.session(path), ids, torch.ones_like(ids)) < 1e-4
    data = (tmp_path / "model.onnx.data").stat().st_size
    assert data < 0.6 * sum(program.store.nbytes(n) for n in program.store.names())  # half the float32 bytes


def test_fixed_shape_program_is_a_user_error_and_writes_nothing(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)

        def forward(self, input_ids, attention_mask):
            return self.embed(input_ids) * attention_mask.unsqueeze(-1)

    ids = torch.zeros(2, 3, dtype=torch.long)
    exported = torch.export.export(Tiny(), (ids, torch.ones_like(ids)))
    with pytest.raises(UserError, match="symbolic"):
        export_graph(exported, 18)
    with pytest.raises(UserError, match="opset >= 18"):
        export_graph(exported, 17)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_graph_lowered_before_is_reused_and_its_weights_are_the_new_ones(tmp_path, caplog):
    """Masking changes weights, not the graph: the second lowering reuses the first one's export and writes the new
    weights (onnxruntime computes the pruned program's logits); a graph of another shape is exported afresh."""
    from passes.magnitude import MagnitudePass

    dense = tiny_program("llama")
    first = lower_to_onnx(dense, tmp_path / "dense" / "model.onnx")
    pruned = MagnitudePass({"sparsity": 0.5}).run(tiny_program("llama")).program
    with caplog.at_level("INFO", logger="runtimes.onnx_export"):
        second = lower_to_onnx(pruned, tmp_path / "pruned" / "model.onnx")
        third = lower_to_onnx(tiny_program("llama", layers=1), tmp_path / "short" / "model.onnx")
    reused = [r.message for r in caplog.records if "reused" in r.message]
    assert len(reused) == 2  # the pruned program's two exports (full-sequence and cache), not the one-block model's
    assert first.read_bytes() == second.read_bytes()  # the same graph ...
    data = [(tmp_path / side / "model.onnx.data").read_bytes() for side in ("dense", "pruned")]
    assert data[0] != data[1]  # ... with the pruned weights
    ids = torch.randint(0, 300, (2, 16))
    assert parity.max_abs_diff(pruned.logits(ids), ort.session(second), ids, torch.ones_like(ids)) < 1e-4
    assert parity.max_abs_diff(dense.logits(ids), ort.session(first), ids, torch.ones_like(ids)) < 1e-4
    assert len(onnx.load(str(third), load_external_data=False).graph.node) < len(
        onnx.load(str(first), load_external_data=False).graph.node)


@pytest.mark.slow
def test_the_exporters_trace_is_let_go(monkeypatch, tmp_path):
    """torch's tracer maps the fake tensors of its last trace to that graph's nodes (a module-level dict it empties
    only when the next trace starts): after an export the map is empty, so the decomposed graph can go."""
    from collections import OrderedDict

    from torch.fx.experimental import proxy_tensor

    import runtimes.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "_EXPORTS", OrderedDict())  # exported afresh, not from this process's cache
    monkeypatch.setenv("NEXUS_EXPORT_GRAPH_CACHE", str(tmp_path))  # nor from the graph cache on disk
    monkeypatch.setattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", {})
    model = export_graph(tiny_program("llama").exported, 18)
    assert len(model.graph) > 0 and proxy_tensor._FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT == {}


def test_a_reused_export_keeps_no_dtype_of_an_earlier_lowering(tmp_path):
    """A graph exported once serves later lowerings in any dtype: binding bf16 or fp16 weights to one lowering's copy
    must not change the kept export (onnx_ir's clone shares type objects), or a later float32 lowering of the same
    graph declares bf16 weights and its cache and full-sequence models disagree."""
    for i, (dtype, lower) in enumerate([(torch.bfloat16, "both"), (torch.float16, "logits"), (None, "both")]):
        path = lower_to_onnx(tiny_program("llama"), tmp_path / str(i) / "model.onnx", dtype=dtype, lower=lower)
    for file in (path, path.with_name("model.kv.onnx")):
        weights = {t.name: t.data_type for t in onnx.load(str(file), load_external_data=False).graph.initializer}
        assert weights["lm.model.embed_tokens.weight"] == onnx.TensorProto.FLOAT, file.name
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    expected = tiny_program("llama").logits(ids).detach().numpy()
    assert np.abs(ort.logits(ort.session(path), ids.numpy()) - expected).max() < 1e-4
