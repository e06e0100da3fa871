"""TensorRT, onnxruntime GPU providers and torch semi-structured: what runs everywhere, and GPU checks that skip here."""

import logging

import numpy as np
import pytest
import torch
from conftest import tiny_program

from nexus_export.cli import main
from nexus_export.errors import UserError
from passes.magnitude import MagnitudePass
from runtimes import ort, tensorrt, torch_sparse
from runtimes.onnx_export import lower_to_onnx

TRT_OK, TRT_WHY = tensorrt.available()
SPARSE_OK, SPARSE_WHY = torch_sparse.available()


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    program = tiny_program("llama")
    MagnitudePass({"pattern": "2:4"}).run(program)
    path = lower_to_onnx(program, tmp_path_factory.mktemp("gpu") / "model.onnx")
    return program, path


def test_trtexec_line_matches_the_build_settings(tmp_path):
    line = tensorrt.trtexec_command(tmp_path / "m.onnx", tmp_path / "m.engine", tensorrt.Profile((1, 4, 8), (2, 128, 512)),
                                    timing_cache=tmp_path / "t.cache")
    assert "--fp16" in line and "--sparsity=enable" in line and "--int8" not in line
    assert "--minShapes=input_ids:1x2,attention_mask:1x2" in line
    assert "--maxShapes=input_ids:8x512,attention_mask:8x512" in line
    assert f"--timingCacheFile={tmp_path / 't.cache'}" in line


def test_sparsity_lines_of_the_build_log_are_parsed():
    lines = ["[INFO] (Sparsity) Layers eligible for sparse math: /lm/model/layers.0/mlp/down_proj/MatMul, lm_head",
             "[INFO] (Sparsity) TRT inference plan picked sparse implementation for layers: lm_head",
             "[VERBOSE] something else"]
    eligible, picked = tensorrt.parse_sparsity_lines(lines)
    assert eligible == ["/lm/model/layers.0/mlp/down_proj/MatMul", "lm_head"] and picked == ["lm_head"]


@pytest.mark.skipif(TRT_OK, reason="TensorRT is installed here")
def test_build_engine_without_tensorrt_names_what_to_install(pruned, tmp_path, capsys):
    _, path = pruned
    assert main(["build-engine", str(path), "--out", str(tmp_path / "engine")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("pip install tensorrt" in err[0] or "no CUDA GPU" in err[0])
    assert not (tmp_path / "engine").exists()


@pytest.mark.skipif(not TRT_OK, reason=TRT_WHY)
def test_engine_builds_with_sparse_weights_and_matches_onnxruntime(pruned, tmp_path):
    _, path = pruned
    build = tensorrt.build_engine(path, tmp_path, tensorrt.Profile((1, 2, 4), (2, 32, 64)))
    assert (tmp_path / "model.engine").stat().st_size > 0 and build.sparse and build.layer_tactics
    parity = tensorrt.compare_with_onnxruntime(tmp_path / "model.engine", path, batch=2, seq=32)
    assert parity["max_abs_diff"] < 5e-2  # fp16 engine vs fp32 onnxruntime


def test_gpu_provider_falls_back_to_cpu_with_a_reason(pruned, caplog):
    _, path = pruned
    import onnxruntime

    if "TensorrtExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT provider")
    with caplog.at_level(logging.WARNING):
        sess = ort.session(path, device="tensorrt")
    assert sess.get_providers() == ["CPUExecutionProvider"]
    assert "TensorrtExecutionProvider is not available" in caplog.text
    ids = np.arange(8, dtype=np.int64).reshape(1, 8)
    assert np.allclose(ort.logits(sess, ids), ort.logits(ort.session(path), ids))


def test_tensorrt_provider_options_enable_sparsity():
    options = _tensorrt_options()
    assert options["trt_sparsity_enable"] is True and options["trt_fp16_enable"] is True
    assert options["trt_engine_cache_path"] == "/tmp/c"
    with pytest.raises(UserError, match="unknown device"):
        ort.provider_chain("tpu")


def _tensorrt_options():
    import onnxruntime

    real = onnxruntime.get_available_providers
    onnxruntime.get_available_providers = lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                   "CPUExecutionProvider"]
    try:
        chain = ort.provider_chain("tensorrt", "/tmp/c")
    finally:
        onnxruntime.get_available_providers = real
    assert [entry if isinstance(entry, str) else entry[0] for entry in chain] == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    return chain[0][1]


def test_two_four_linears_are_selected(pruned):
    program, _ = pruned
    names = torch_sparse.two_four_linears(program)
    assert sorted(names) == sorted(l.name for l in program.structure.in_blocks())  # lm_head is dense


@pytest.mark.skipif(SPARSE_OK, reason="a CUDA GPU is present")
def test_semi_structured_without_gpu_is_a_clear_error(pruned):
    program, _ = pruned
    with pytest.raises(UserError, match="CUDA"):
        torch_sparse.to_semi_structured(program)


@pytest.mark.skipif(not SPARSE_OK, reason=SPARSE_WHY)
def test_semi_structured_logits_match_dense(pruned):
    program, _ = pruned
    sparse, names = torch_sparse.to_semi_structured(program)
    dense = torch_sparse.dense_module(program)
    ids = torch.randint(0, 257, (2, 64), device="cuda")
    with torch.no_grad():
        diff = (sparse(ids, torch.ones_like(ids)).float() - dense(ids, torch.ones_like(ids)).float()).abs().max()
    assert names and float(diff) < 5e-2
