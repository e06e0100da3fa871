"""Static TensorRT 2:4 check on tiny models: eligible and ineligible layers, the CLI's table and --strict."""

import json

import pytest
import torch
from conftest import tiny_program

from nexus_export.cli import main
from passes.magnitude import MagnitudePass
from runtimes.onnx_export import lower_to_onnx
from runtimes.tensorrt_check import check_tensorrt, summarize_tensorrt


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    """A tiny LLaMA with 2:4 in its decoder linears except one layer left with 1 zero in 4."""
    program = tiny_program("llama")
    MagnitudePass({"pattern": "2:4"}).run(program)
    program.set_weight("model.layers.1.mlp.up_proj", one_zero_in_four(program))
    folder = tmp_path_factory.mktemp("trt")
    return lower_to_onnx(program, folder / "model.onnx"), program


def one_zero_in_four(program):
    w = torch.randn(program.weight("model.layers.1.mlp.up_proj").shape, generator=torch.Generator().manual_seed(0))
    w.view(w.shape[0], -1, 4)[:, :, 0] = 0.0  # only one zero per group of four
    return w


def test_eligibility_per_layer(lowered):
    path, program = lowered
    rows = {r.layer: r for r in check_tensorrt(path)}
    q = rows["model.layers.0.self_attn.q_proj"]
    assert (q.k, q.n, q.groups_2_4, q.eligible, q.form) == (64, 64, True, True, "constant")
    assert not q.likely_sparse  # 64 channels: below the size where TensorRT tends to pick sparse tactics
    up = rows["model.layers.1.mlp.up_proj"]
    assert not up.eligible and "fewer than 2 zeros" in up.reason
    assert not rows["lm_head"].eligible  # dense
    summary = summarize_tensorrt(list(rows.values()), {n for n in rows if n != "lm_head"})
    assert summary["targeted"] == 14 and summary["targeted_eligible"] == 13
    assert summary["targeted_ineligible"] == ["model.layers.1.mlp.up_proj"]


def test_cli_table_and_strict(lowered, capsys):
    path, _ = lowered
    assert main(["check-onnx", str(path), "--tensorrt"]) == 0
    out = capsys.readouterr().out
    assert "TensorRT 2:4: 13 of 15 layers eligible" in out
    assert main(["check-onnx", str(path), "--tensorrt", "--strict"]) == 1
    capsys.readouterr()
    assert main(["check-onnx", str(path), "--tensorrt", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["eligible"] == 13 and len(data["layers"]) == 15


def test_dense_model_has_no_eligible_layer(tmp_path, capsys):
    path = lower_to_onnx(tiny_program("llama"), tmp_path / "model.onnx")
    assert main(["check-onnx", str(path), "--tensorrt", "--strict"]) == 1
    assert "no layer is eligible" in capsys.readouterr().out


@pytest.mark.parametrize("content", [None, b"not an onnx file"])
def test_missing_or_broken_file(tmp_path, capsys, content):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    assert main(["check-onnx", str(path), "--tensorrt"]) == 2
    assert "nexus-export: error:" in capsys.readouterr().err
