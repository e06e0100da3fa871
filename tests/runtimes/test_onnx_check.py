"""inspect_onnx: every linear traced to its layer as a constant weight, sparsity and N:M read exactly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from nexus_export.errors import UserError
from runtimes.onnx_check import inspect_onnx, nm_groups_valid, report_rows, summarize

ONE_OF_FOUR_LAYER = "model.layers.1.mlp.down_proj"  # see conftest.tiny_llama


def test_nm_groups_on_hand_made_arrays():
    # columns: [0, 0, 1, 1] has 2 zeros; [1, 0, 1, 1] has 1; K runs down axis 0
    kn = np.array([[0.0, 1.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    assert nm_groups_valid(kn[:, :1], 2, 4) is True
    assert nm_groups_valid(kn, 2, 4) is False
    assert nm_groups_valid(kn, 1, 4) is True
    assert nm_groups_valid(kn[:, :1], 3, 4) is False
    # two groups along K: the second group of column 0 has only one zero
    eight = np.array([[0, 0, 1, 1, 0, 1, 1, 1]], dtype=np.float32).T
    assert nm_groups_valid(eight, 2, 4) is False
    assert nm_groups_valid(eight, 1, 4) is True
    # zeros along N (the wrong axis) do not count
    rows = np.array([[0.0, 0.0, 1.0, 1.0]] * 4)
    assert nm_groups_valid(rows, 2, 4) is False
    assert nm_groups_valid(rows.T, 2, 4) is True
    # -0.0 is a zero; K not divisible by M is never valid
    assert nm_groups_valid(np.array([[-0.0], [0.0], [2.0], [3.0]]), 2, 4) is True
    assert nm_groups_valid(np.zeros((6, 3)), 2, 4) is False
    with pytest.raises(UserError):
        nm_groups_valid(kn, 5, 4)


def test_every_llama_linear_is_a_constant_weight_of_its_layer(tiny_llama):
    layers = {layer.layer: layer for layer in inspect_onnx(tiny_llama.onnx_path)}
    linears = {name for name, m in tiny_llama.model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(layers) == linears
    assert {(layer.op, layer.form) for layer in layers.values()} == {("MatMul", "constant")}
    q = layers["model.layers.0.self_attn.q_proj"]
    assert (q.weight, q.k, q.n) == ("lm.model.layers.0.self_attn.q_proj.weight", 64, 64)
    assert (layers["model.layers.0.self_attn.k_proj"].k, layers["model.layers.0.self_attn.k_proj"].n) == (64, 32)
    assert (layers["model.layers.1.mlp.down_proj"].k, layers["model.layers.1.mlp.down_proj"].n) == (128, 64)
    assert (layers["lm_head"].k, layers["lm_head"].n) == (64, 300)


def test_llama_zeros_survive_lowering(tiny_llama):
    layers = inspect_onnx(tiny_llama.onnx_path)
    for layer in layers:
        if layer.layer == ONE_OF_FOUR_LAYER:
            assert layer.sparsity == pytest.approx(0.25) and layer.nm_valid is False
        elif ".layers." in layer.layer:
            assert layer.sparsity == pytest.approx(0.5) and layer.nm_valid is True, layer
        else:
            assert layer.sparsity == 0.0 and layer.nm_valid is False
    summary = summarize(layers)
    assert summary["layers"] == 15 and summary["by_op"] == {"MatMul": 15} and summary["by_form"] == {"constant": 15}
    assert summary["nm_valid_layers"] == 13 and summary["all_nm_valid"] is False
    per_block = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128  # q, o; k, v; gate, up, down
    assert summary["parameters"] == 2 * per_block + 64 * 300
    zeros = 2 * per_block // 2 - 128 * 64 // 4  # half of the decoder, less a quarter of the 1-of-4 layer
    assert summary["sparsity"] == pytest.approx(zeros / summary["parameters"])


def test_onnx_weight_is_the_transposed_torch_weight(tiny_llama):
    model = onnx.load(str(tiny_llama.onnx_path))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    torch_weight = tiny_llama.model.model.layers[0].mlp.down_proj.weight.detach().numpy()
    np.testing.assert_array_equal(weights["lm.model.layers.0.mlp.down_proj.weight"], torch_weight.T)


def test_report_rows_and_no_pattern(tiny_llama):
    rows = report_rows(inspect_onnx(tiny_llama.onnx_path, nm=None))
    assert list(rows[0]) == ["layer", "op", "k", "n", "sparsity", "nm_valid", "form", "targeted"]
    assert all(row["targeted"] for row in rows)  # no targets given: every layer counts
    assert all(row["nm_valid"] is None for row in rows)


@pytest.mark.slow
def test_gpt2_conv1d_and_tied_head(tiny_gpt2):
    layers = {layer.layer: layer for layer in inspect_onnx(tiny_gpt2.onnx_path)}
    expected = {
        "transformer.h.0.attn.c_attn": ("Gemm", 64, 192),
        "transformer.h.0.attn.c_proj": ("Gemm", 64, 64),
        "transformer.h.0.mlp.c_fc": ("Gemm", 64, 256),
        "transformer.h.0.mlp.c_proj": ("Gemm", 256, 64),
        "lm_head": ("MatMul", 64, 300),
    }
    for name, (op, k, n) in expected.items():
        form = "transposed" if name == "lm_head" else "constant"
        assert (layers[name].op, layers[name].k, layers[name].n, layers[name].form) == (op, k, n, form)
    assert len(layers) == 9
    # the tied head reads the embedding through a Transpose: the matrix is stored once
    assert layers["lm_head"].weight == "lm.lm_head.weight"


def _gemm_and_transposed_model(path):
    """Gemm(transB=1) on W1[N=4, K=8] with 2:4 zeros along K, and MatMul on Transpose(W2[4, 8]): saved externally."""
    h = onnx.helper
    w1 = np.tile(np.array([1.0, 0.0, 0.0, 2.0], dtype=np.float32), (4, 2))  # [4, 8]: groups along dim 1
    w2 = w1.copy()
    nodes = [
        h.make_node("Gemm", ["x", "lm.a.weight"], ["y1"], transB=1),
        h.make_node("Transpose", ["lm.b.weight"], ["bt"], perm=[1, 0]),
        h.make_node("MatMul", ["x", "bt"], ["y2"]),
    ]
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])],
        [h.make_tensor_value_info(y, onnx.TensorProto.FLOAT, [2, 4]) for y in ("y1", "y2")],
        [onnx.numpy_helper.from_array(w1, "lm.a.weight"), onnx.numpy_helper.from_array(w2, "lm.b.weight")],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    onnx.save_model(model, path, save_as_external_data=True, location="m.onnx.data", size_threshold=0)


def test_gemm_trans_b_and_transposed_form(tmp_path):
    _gemm_and_transposed_model(tmp_path / "m.onnx")
    a, b = inspect_onnx(tmp_path / "m.onnx")
    assert (a.layer, a.op, a.form, a.k, a.n, a.sparsity, a.nm_valid) == ("a", "Gemm", "constant", 8, 4, 0.5, True)
    assert (b.layer, b.op, b.form, b.k, b.n, b.sparsity, b.nm_valid) == ("b", "MatMul", "transposed", 8, 4, 0.5, True)


@pytest.mark.parametrize("chunk_bytes", [8, 64 * 2**20])
def test_external_weights_read_in_chunks_give_the_whole_matrix_answer(tmp_path, monkeypatch, chunk_bytes):
    """bf16 and fp32 weights in external data, read two rows at a time or whole: the same sparsity and N:M verdict as
    numpy on the full matrix, -0.0 counted as a zero, one group breaking 2:4 found wherever the chunks cut."""
    import ml_dtypes

    from runtimes import onnx_check

    monkeypatch.setattr(onnx_check, "CHUNK_BYTES", chunk_bytes)
    h = onnx.helper
    gen = np.random.default_rng(0)
    kn = gen.standard_normal((16, 6)).astype(np.float32)
    kn[0::4] = -0.0
    kn[1::4] = 0.0  # 2:4 along K
    broken = kn.copy()
    broken[13, 5] = 1.0  # the group of rows 12-15 in column 5 keeps three
    nk16 = kn.T.astype(ml_dtypes.bfloat16)  # [N, K] behind Gemm transB, stored in bf16 behind a Cast
    nodes = [
        h.make_node("MatMul", ["x", "lm.a.weight"], ["ya"]),
        h.make_node("MatMul", ["x", "lm.b.weight"], ["yb"]),
        h.make_node("Cast", ["lm.c.weight"], ["c32"], to=onnx.TensorProto.FLOAT),
        h.make_node("Gemm", ["x", "c32"], ["yc"], transB=1),
    ]
    graph = h.make_graph(
        nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 16])],
        [h.make_tensor_value_info(y, onnx.TensorProto.FLOAT, [2, 6]) for y in ("ya", "yb", "yc")],
        [onnx.numpy_helper.from_array(kn, "lm.a.weight"), onnx.numpy_helper.from_array(broken, "lm.b.weight"),
         onnx.numpy_helper.from_array(nk16, "lm.c.weight")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    onnx.save_model(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    a, b, c = inspect_onnx(tmp_path / "m.onnx")
    assert (a.k, a.n, a.sparsity, a.nm_valid) == (16, 6, 0.5, True)
    assert (b.sparsity, b.nm_valid) == (float((broken == 0).mean()), False)
    assert (c.op, c.form, c.k, c.n, c.sparsity, c.nm_valid) == ("Gemm", "constant", 16, 6, 0.5, True)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no ONNX file"):
        inspect_onnx(tmp_path / "missing.onnx")
