"""GPTQ grids to MatMulNBits: codes and scales as the pass chose them, parity with PyTorch, zeros kept, refusals."""

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_program

from nexus_export.engine.pass_base import PassContext
from nexus_export.errors import UserError
from passes.gptq import GPTQPass, quantization_grids
from passes.magnitude import MagnitudePass
from passes.shared.quant_grid import Grid
from runtimes import ort
from runtimes.onnx_check import inspect_onnx
from runtimes.onnx_export import lower_to_onnx
from runtimes.quantize import dequantized_weights, quantize_onnx, write_grids, zeros_kept


def quantized(tmp_path, bits, sym):
    program = tiny_program("llama")
    MagnitudePass({"pattern": "2:4"}).run(program)
    windows = torch.randint(0, 300, (8, 64), generator=torch.Generator().manual_seed(0))
    pass_ = GPTQPass({"bits": bits, "group_size": 32, "sym": sym})
    program = pass_.run(program, PassContext(calibration_windows=windows)).program
    fp32 = lower_to_onnx(program, tmp_path / "model.onnx")
    return program, fp32, write_grids(fp32, tmp_path / "model.q.onnx", pass_.config.grid(), quantization_grids(program),
                                      head=False)


@pytest.mark.parametrize("bits, sym", [(4, True), (4, False), pytest.param(8, True, marks=pytest.mark.slow),
                                       pytest.param(8, False, marks=pytest.mark.slow)])
def test_matmulnbits_computes_the_programs_weights(tmp_path, bits, sym):
    program, fp32, q = quantized(tmp_path, bits, sym)
    weights = dequantized_weights(q)
    assert len(weights) == 14  # every block linear; the head stays float
    for name, w in weights.items():
        np.testing.assert_array_equal(w, program.weight(name).numpy().T)  # the same numbers, not close ones
    assert zeros_kept(fp32, q)
    layers = [layer for layer in inspect_onnx(q) if layer.op == "MatMulNBits"]  # check-onnx reads the codes
    assert len(layers) == 14 and all(layer.nm_valid and layer.form == "quantized" for layer in layers)
    assert all(layer.sparsity == pytest.approx(float((weights[layer.layer] == 0).mean())) for layer in layers)
    ids = torch.arange(64).reshape(2, 32)
    expected = program.logits(ids).numpy()
    assert np.abs(ort.logits(ort.session(q), ids.numpy()) - expected).max() < 1e-4
    size = lambda p: sum(f.stat().st_size for f in p.parent.glob(p.name + "*"))  # noqa: E731
    assert size(q) < size(fp32)
    assert not list(tmp_path.glob(".scratch-*"))  # the codes' scratch file went once they were copied


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matmulnbits_from_a_16_bit_model_computes_the_exact_grid(tmp_path, dtype):
    """A bf16 (fp16) program keeps GPTQ's weights rounded to its dtype, lowered behind Casts to float32: the file
    written from it finds every code from the rounded weight, computes the exact grid values, keeps the pruned zeros
    and no longer holds the 16-bit weights it replaced."""
    program = tiny_program("llama")
    program.store.dtype = dtype
    MagnitudePass({"pattern": "2:4"}).run(program)
    windows = torch.randint(0, 300, (8, 64), generator=torch.Generator().manual_seed(0))
    pass_ = GPTQPass({"group_size": 32})
    program = pass_.run(program, PassContext(calibration_windows=windows)).program
    half = lower_to_onnx(program, tmp_path / "model.onnx")
    grid, grids = pass_.config.grid(), quantization_grids(program)
    q = write_grids(half, tmp_path / "model.q.onnx", grid, grids, head=False)
    weights = dequantized_weights(q)
    assert len(weights) == 14
    for name, w in weights.items():
        scales, zeros = grids[name][0], grids[name][1].float()
        exact = grid.dequantize(grid.layer_codes(program.weight(name).float(), scales, zeros), scales, zeros)
        assert not torch.equal(exact.to(dtype).float(), exact) or name.endswith("v_proj")  # rounding did happen
        np.testing.assert_array_equal(w, exact.numpy().T)
        program.store.set(program.linear(name).weight, exact, torch.float32)
    assert zeros_kept(half, q)
    model = onnx.load(str(q), load_external_data=False)
    stored = {t.name for t in model.graph.initializer if len(t.dims) == 2 and t.data_type != onnx.TensorProto.UINT8}
    casts = [n.input[0] for n in model.graph.node if n.op_type == "Cast" and n.input[0] in stored]
    assert casts == [] and sorted(stored) == ["lm.lm_head.weight", "lm.model.embed_tokens.weight"]  # float32 here
    ids = torch.arange(64).reshape(2, 32)
    assert np.abs(ort.logits(ort.session(q), ids.numpy()) - program.logits(ids).numpy()).max() < 1e-4


def test_a_weight_off_its_grid_is_refused(tmp_path):
    program, fp32, _ = quantized(tmp_path, 4, True)
    grids = quantization_grids(program)
    name = next(iter(grids))
    scales, zeros = grids[name]
    with pytest.raises(UserError, match=f"the weight of {name} is not on its quantization grid"):
        write_grids(fp32, tmp_path / "bad.onnx", GPTQPass({"group_size": 32}).config.grid(),
                    {name: (scales * 1.37, zeros)})
    with pytest.raises(UserError, match="no constant MatMul weight"):
        write_grids(fp32, tmp_path / "bad.onnx", GPTQPass({"group_size": 32}).config.grid(),
                    {"no.such.layer": (scales, zeros)})
    assert not (tmp_path / "bad.onnx").exists() and not list(tmp_path.glob(".scratch-*"))  # no scratch file left


def onnxruntimes_rtn(src, dst, bits: int, block_size: int, sym: bool):
    """The file onnxruntime's own round-to-nearest quantizer writes from ``src`` (the reference)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, block_size=block_size, is_symmetric=sym)
    quantizer.process()
    onnx.save(quantizer.model.model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    return dst


@pytest.mark.parametrize("bits, sym", [(4, True), (4, False), (8, True)])
def test_round_to_nearest_writes_onnxruntimes_weights(tmp_path, bits, sym):
    """quantize_onnx rounds each weight on the grid onnxruntime's own quantizer uses: the same layers (the untied
    head too), the same weights to float rounding, the same model output; and a program's grid gives them too."""
    program = tiny_program("llama")
    MagnitudePass({"pattern": "2:4"}).run(program)
    fp32 = lower_to_onnx(program, tmp_path / "model.onnx")
    ours = quantize_onnx(fp32, tmp_path / "model.q.onnx", bits, 32, sym)
    theirs = onnxruntimes_rtn(fp32, tmp_path / "theirs.onnx", bits, 32, sym)
    ours_w, theirs_w = dequantized_weights(ours), dequantized_weights(theirs)
    assert sorted(ours_w) == sorted(theirs_w) and len(ours_w) == 15  # 14 block linears and the head
    for name, w in ours_w.items():
        np.testing.assert_allclose(w, theirs_w[name], rtol=0, atol=1e-6 * float(np.abs(w).max()))
    ids = torch.arange(64).reshape(2, 32).numpy()
    assert np.abs(ort.logits(ort.session(ours), ids) - ort.logits(ort.session(theirs), ids)).max() < 1e-4
    assert zeros_kept(fp32, ours) and not list(tmp_path.glob(".scratch-*"))
    grid = Grid(bits, 32, sym)
    for lin in program.structure.in_blocks():
        w = program.weight(lin.name).float()
        scales, zeros = grid.group_params(w)
        np.testing.assert_array_equal(grid.dequantize(grid.layer_codes(w, scales, zeros), scales, zeros).numpy().T,
                                      ours_w[lin.name])


def test_round_to_nearest_reads_a_16_bit_model_through_its_casts(tmp_path):
    """A bf16 file is rounded from its bf16 weights (read through their Casts to float32, one at a time): every
    linear's weight is the grid's rounding of them, the 16-bit weights it replaced are gone, zeros stay zero."""
    program = tiny_program("llama")
    program.store.dtype = torch.bfloat16
    MagnitudePass({"pattern": "2:4"}).run(program)
    half = lower_to_onnx(program, tmp_path / "model.onnx")
    q = quantize_onnx(half, tmp_path / "model.q4.onnx", 4, 32, head=False)
    weights, grid = dequantized_weights(q), Grid(4, 32)
    assert len(weights) == 15  # the block linears and the untied head
    for lin in program.structure.in_blocks():
        w = program.weight(lin.name).float()  # the bf16 values, exactly
        scales, zeros = grid.group_params(w)
        np.testing.assert_array_equal(weights[lin.name],
                                      grid.dequantize(grid.layer_codes(w, scales, zeros), scales, zeros).numpy().T)
    bf16 = lambda path: [t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer  # noqa: E731
                         if t.data_type == onnx.TensorProto.BFLOAT16]
    assert len(bf16(half)) == 14 and bf16(q) == []  # the block linears were bf16; none is kept beside its codes
    assert zeros_kept(half, q)
    ids = torch.arange(64).reshape(2, 32).numpy()
    assert np.abs(ort.logits(ort.session(q), ids) - ort.logits(ort.session(half), ids)).max() < 0.5


def test_codes_taken_rows_at_a_time_are_the_whole_ones():
    """The grid writer takes a weight's codes 1,024 rows at a time (a whole 70B weight's temporaries are several GB):
    any row count gives the same initializers, and a weight off its grid in the last rows is still refused."""
    import onnx
    from onnx import helper, numpy_helper

    from runtimes import quantize

    grid = Grid(4, 16)
    w = torch.randn(37, 64, generator=torch.Generator().manual_seed(0))
    scales, zeros = grid.group_params(w)
    w = grid.dequantize(grid.layer_codes(w, scales, zeros), scales, zeros)
    node = helper.make_node("MatMul", ["x", "layer.weight"], ["y"])
    written = []
    for rows in (1, 5, 1024):
        graph = onnx.GraphProto()
        quantize._nbits_node(node, w, grid, scales, zeros, graph, "layer", "layer.weight",
                             numpy_helper.from_array, rows=rows)
        written.append([t.SerializeToString() for t in graph.initializer])
    assert written[0] == written[1] == written[2] and len(written[0]) == 2
    off = w.clone()
    off[36, 3] += float(scales[36, 0].abs()) * 0.3
    with pytest.raises(UserError, match="not on its quantization grid"):
        quantize._nbits_node(node, off, grid, scales, zeros, onnx.GraphProto(), "layer", "layer.weight",
                             numpy_helper.from_array, rows=5)
