"""GPTQ's grids on disk between lowering and the int4 file: the pairs read back exactly, and the file is the same."""

import numpy as np
import torch
from conftest import tiny_program

from nexus_export.engine.pass_base import PassContext
from nexus_export.run.grid_files import GridFiles
from passes.gptq import GPTQPass, grid_items, quantization_grids
from runtimes.onnx_export import lower_to_onnx
from runtimes.quantize import dequantized_weights, write_grids


def test_grids_read_back_from_their_files_write_the_same_int4_file(tmp_path):
    program = tiny_program("llama")
    windows = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    pass_ = GPTQPass({"group_size": 32, "sym": False})
    program = pass_.run(program, PassContext(calibration_windows=windows)).program
    held = quantization_grids(program)
    files = GridFiles.save(grid_items(program), tmp_path / "grids")
    assert list(files) == list(held) and len(files) == 14 and len(list((tmp_path / "grids").iterdir())) == 14
    for layer, (scales, zeros) in held.items():
        read_scales, read_zeros = files[layer]
        assert torch.equal(read_scales, scales) and torch.equal(read_zeros, zeros) and read_zeros.dtype == torch.uint8
    fp32 = lower_to_onnx(program, tmp_path / "model.onnx")
    grid = pass_.config.grid()
    from_files = dequantized_weights(write_grids(fp32, tmp_path / "a.onnx", grid, files))
    from_memory = dequantized_weights(write_grids(fp32, tmp_path / "b.onnx", grid, held))
    assert from_files.keys() == from_memory.keys() and len(from_files) == 14
    assert all(np.array_equal(from_files[name], from_memory[name]) for name in from_files)
