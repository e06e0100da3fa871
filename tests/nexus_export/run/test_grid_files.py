"""GPTQ's grids on disk between lowering and the int4 file: every layer's pair reads back exactly (a run writes its
int4 file from them: test_sparsegpt_then_gptq_end_to_end in tests/nexus_export/test_cli.py)."""

import pytest
import torch
from conftest import tiny_program

from nexus_export.engine.pass_base import PassContext
from nexus_export.run.grid_files import GridFiles
from passes.gptq import GPTQPass, grid_items, quantization_grids


def test_grids_read_back_from_their_files(tmp_path):
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
    with pytest.raises(KeyError):
        files["no.such.layer"]
