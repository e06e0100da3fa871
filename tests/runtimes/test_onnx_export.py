"""Lowering: checker, symbolic dims, parity at two shapes, weights folded under their parameter names."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from nexus_export.errors import UserError
from runtimes import ort, parity
from runtimes.onnx_export import cleanup, lower_to_onnx


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
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


@pytest.mark.parametrize("shape", [(1, 8), (3, 21)])
def test_llama_runs_at_two_shapes_with_parity(tiny_llama, shape):
    sess = ort.session(tiny_llama.onnx_path, threads=1)
    ids = torch.randint(0, 300, shape, generator=torch.Generator().manual_seed(shape[1]))
    mask = torch.ones_like(ids)
    mask[-1, -2:] = 0  # right padding on the last row
    assert ort.logits(sess, ids, mask).shape == (*shape, 300)
    assert parity.max_abs_diff(tiny_llama.exported, sess, ids, mask) < 1e-4


def test_gpt2_lowers_with_parity(tiny_gpt2):
    sess = ort.session(tiny_gpt2.onnx_path, threads=1)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    assert parity.max_abs_diff(tiny_gpt2.exported, sess, ids, torch.ones_like(ids)) < 1e-4


def test_no_transpose_left_on_weights_but_a_tied_head(tiny_llama, tiny_gpt2):
    for lowered, kept in ((tiny_llama, []), (tiny_gpt2, ["lm.lm_head.weight"])):
        model = onnx.load(str(lowered.onnx_path), load_external_data=False)
        names = {t.name for t in model.graph.initializer}
        assert [n.input[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in names] == kept


def _linear_model(tied: bool) -> onnx.ModelProto:
    """X[2, 8] @ Transpose(W[4, 8]); when tied, W is also read by a Gather (like a tied embedding)."""
    h = onnx.helper
    weight = onnx.numpy_helper.from_array(np.arange(32, dtype=np.float32).reshape(4, 8), "lm.w.weight")
    nodes = [
        h.make_node("Transpose", ["lm.w.weight"], ["wt"], perm=[1, 0]),
        h.make_node("MatMul", ["x", "wt"], ["y"]),
    ]
    outputs = [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])]
    inputs = [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])]
    if tied:
        nodes.append(h.make_node("Gather", ["lm.w.weight", "ids"], ["e"]))
        inputs.append(h.make_tensor_value_info("ids", onnx.TensorProto.INT64, [3]))
        outputs.append(h.make_tensor_value_info("e", onnx.TensorProto.FLOAT, [3, 8]))
    graph = h.make_graph(nodes, "g", inputs, outputs, [weight])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])


def test_fold_keeps_name_and_never_stores_a_shared_weight_twice():
    plain = cleanup(_linear_model(tied=False))
    assert [n.op_type for n in plain.graph.node] == ["MatMul"]
    assert [(t.name, list(t.dims)) for t in plain.graph.initializer] == [("lm.w.weight", [8, 4])]

    tied = cleanup(_linear_model(tied=True))
    shapes = {t.name: list(t.dims) for t in tied.graph.initializer}
    assert shapes == {"lm.w.weight": [4, 8]}
    assert sorted(n.op_type for n in tied.graph.node) == ["Gather", "MatMul", "Transpose"]


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
        lower_to_onnx(exported, tmp_path / "model.onnx")
    with pytest.raises(UserError, match="opset >= 18"):
        lower_to_onnx(exported, tmp_path / "model.onnx", opset=17)
    assert list(tmp_path.iterdir()) == []
