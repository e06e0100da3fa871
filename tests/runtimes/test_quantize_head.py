"""The embedding and lm_head on the quantization grid: one quantized tensor for a tied pair, and onnxruntime computes
exactly the dequantized grid weights (MatMulNBits and GatherBlockQuantized agree on the symmetric zero point)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import transformers
from conftest import tiny_program

from nexus_export.graph.program import Program
from passes.shared.quant_grid import Grid
from runtimes import ort
from runtimes.onnx_export import lower_to_onnx
from runtimes.quantize_head import quantize_head


def tied_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                      max_position_embeddings=512, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval()


def dequantized(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    grid = Grid(grid.bits, grid.group_size, sym=True, clip_search=True)
    scales, zeros = grid.group_params(w)
    return grid.dequantize(grid.layer_codes(w, scales, zeros), scales, zeros)


def assert_computes_the_grid(program, grid: Grid, tied: bool, tmp_path) -> None:
    """tmp_path/q.onnx computes what ``program`` does with its embedding (and head) replaced by the dequantized grid
    weights, in float32."""
    embed = program.structure.embeddings["model.embed_tokens"]
    program.store.set(embed, dequantized(program.parameter(embed, torch.float32), grid), torch.float32)
    if not tied:
        head = program.linear("lm_head").weight
        program.store.set(head, dequantized(program.parameter(head, torch.float32), grid), torch.float32)
    expected = ort.logits(ort.session(lower_to_onnx(program, tmp_path / "ref" / "model.onnx", lower="logits")),
                          torch.arange(48).reshape(2, 24))
    actual = ort.logits(ort.session(tmp_path / "q.onnx"), torch.arange(48).reshape(2, 24))
    assert np.abs(actual - expected).max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("tied", [True, False])
def test_head_and_embedding_compute_the_dequantized_grid(tmp_path, bits, tied):
    program = Program.from_model(tied_llama()) if tied else tiny_program("llama")
    grid = Grid(bits, 32)
    full = lower_to_onnx(program, tmp_path / "model.onnx", lower="logits")
    model = onnx.load(str(full))
    done = quantize_head(model, grid, accuracy_level=0)
    assert len(done) == (1 if tied else 2)
    onnx.save(model, str(tmp_path / "q.onnx"), save_as_external_data=True, location="q.onnx.data")
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == 1 and "Gather" not in ops
    floats = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
              and sorted(t.dims) == [64, 300]]
    assert floats == []  # no float vocabulary table left: a tied pair is one quantized tensor
    quantized = [t.name for t in model.graph.initializer if t.name.endswith(f"_Q{bits}")]
    assert len(quantized) == (1 if tied else 2)
    assert_computes_the_grid(program, grid, tied, tmp_path)


def test_a_model_without_a_vocabulary_table_is_left_alone(tmp_path):
    full = lower_to_onnx(tiny_program("llama"), tmp_path / "model.onnx", lower="logits")
    model = onnx.load(str(full), load_external_data=False)
    model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value = 7  # no MatMul has this many outputs
    gather = next(n for n in model.graph.node if n.op_type == "Gather")
    gather.input[1] = "renamed_ids"  # nor does a Gather read input_ids
    assert quantize_head(model, Grid(4, 32)) == []


@pytest.mark.parametrize("bits", [4, 8])
def test_a_vocabulary_is_quantized_rows_at_a_time_as_whole(bits):
    """The head's codes and scales are taken 1,024 rows at a time (a 128k vocabulary's temporaries would be several
    GB each); a transposed (untied) head read in row blocks gives what the whole matrix gives."""
    from runtimes.quantize_head import _quantized

    grid = Grid(bits, 16, sym=True, clip_search=True)
    rows = np.random.default_rng(0).standard_normal((64, 37)).astype(np.float32).T  # [37, 64], not contiguous
    whole = _quantized(rows, grid, chunk=10**6)
    for chunk in (1, 5):
        part = _quantized(rows, grid, chunk=chunk)
        assert np.array_equal(part[0], whole[0]) and np.array_equal(part[1], whole[1])
    w = torch.from_numpy(np.ascontiguousarray(rows))
    scales, zeros = grid.group_params(w)
    codes = grid.layer_codes(w, scales, zeros).numpy()
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)) if bits == 4 else codes
    assert np.array_equal(whole[0], packed) and np.array_equal(whole[1], scales.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False])
def test_a_bf16_vocabulary_is_read_through_its_cast(tmp_path, tied):
    """A bf16 model stores its embedding and head in bf16 behind Casts to float32: they are quantized from those
    values, and their bf16 tables and Casts leave the file."""
    program = Program.from_model(tied_llama()) if tied else tiny_program("llama")
    for name in program.weight_names():  # every weight on bf16 values, so a float32 file computes the same numbers
        if program.store.nbytes(name) >= 4096:
            program.store.set(name, program.parameter(name, torch.float32).to(torch.bfloat16), torch.float32)
    grid = Grid(4, 32)
    model = onnx.load(str(lower_to_onnx(program, tmp_path / "model.onnx", lower="logits", dtype=torch.bfloat16)))
    tables = {t.name for t in model.graph.initializer if 300 in t.dims and t.data_type == onnx.TensorProto.BFLOAT16}
    casts = [n for n in model.graph.node if n.op_type == "Cast" and n.input[0] in tables]
    assert len(tables) == (1 if tied else 2) and len(casts) == len(tables)  # the form read through
    assert quantize_head(model, grid, accuracy_level=0)
    onnx.save(model, str(tmp_path / "q.onnx"), save_as_external_data=True, location="q.onnx.data")
    assert not tables & {t.name for t in model.graph.initializer}
    assert not [n for n in model.graph.node if n.op_type == "Cast" and n.input[0] in tables]
    assert_computes_the_grid(program, grid, tied, tmp_path)
