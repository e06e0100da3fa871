"""Prune + quantize, fp16 weights, deployment bundles and their verification, Hugging Face folders out."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_program

from nexus_export.cli import main
from nexus_export.errors import UserError
from nexus_export.graph.hf_export import save_hf
from passes.magnitude import MagnitudePass
from runtimes import ort
from runtimes.bundle import make_bundle, verify_bundle
from runtimes.onnx_export import lower_to_onnx
from runtimes.precision import to_fp16_weights
from runtimes.quantize import dequantized_weights, quantize_onnx, zeros_kept

FAST = ["--eval-windows", "2", "--seq-len", "64", "--no-latency"]


@pytest.fixture(scope="module")
def pruned_onnx(tmp_path_factory):
    program = tiny_program("llama")
    MagnitudePass({"pattern": "2:4"}).run(program)
    return program, lower_to_onnx(program, tmp_path_factory.mktemp("pack") / "model.onnx")


@pytest.mark.parametrize("bits, tolerance", [(4, 0.3), (8, 0.02)])
def test_quantization_keeps_pruned_zeros(pruned_onnx, bits, tolerance):
    program, path = pruned_onnx
    q = quantize_onnx(path, path.with_name(f"model.q{bits}.onnx"), bits=bits, block_size=32)
    weights = dequantized_weights(q)
    name = "model.layers.1.mlp.down_proj"
    original = program.weight(name).detach().numpy().T  # [K, N] as in the ONNX MatMul
    assert np.all(weights[name][original == 0] == 0)
    assert np.abs(weights[name] - original).max() < tolerance * np.abs(original).max()
    assert zeros_kept(path, q)
    assert not zeros_kept(path, q, targets={"no.such.layer"})  # nothing matched: nothing was checked
    ids = np.arange(32, dtype=np.int64).reshape(2, 16)
    diff = np.abs(ort.logits(ort.session(q), ids) - ort.logits(ort.session(path), ids)).max()
    assert 0 < diff < (0.5 if bits == 4 else 0.05)


@pytest.mark.parametrize("bits, block, message", [
    (3, 32, "bits must be 4 or 8"),
    (4, 24, "power of two"),
    (4, 256, "does not divide the reduction dimension 64 of model.layers.0.self_attn.q_proj"),
])
def test_bad_quantization_settings(pruned_onnx, tmp_path, bits, block, message):
    _, path = pruned_onnx
    with pytest.raises(UserError, match=message):
        quantize_onnx(path, tmp_path / "q.onnx", bits=bits, block_size=block)


def test_fp16_weights_halve_the_file_and_keep_parity(pruned_onnx):
    _, path = pruned_onnx
    half = to_fp16_weights(path, path.with_name("model.fp16.onnx"))
    size = lambda p: sum(f.stat().st_size for f in p.parent.glob(p.name + "*"))  # noqa: E731
    assert size(half) < 0.6 * size(path)
    ids = np.arange(32, dtype=np.int64).reshape(2, 16)
    assert np.abs(ort.logits(ort.session(half), ids) - ort.logits(ort.session(path), ids)).max() < 1e-2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(["-q", "prune", "--model", "tiny-llama", "--method", "magnitude", "--pattern", "2:4", *FAST,
                 "--quantize-bits", "4", "--fp16", "--eval-runtime", "both", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_run_reports_every_variant(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    names = [a["name"] for a in report["artifacts"]]
    assert names == ["fp32", "fp16", "int4"] and report["deploy"] == {"model": "model.q4.onnx", "variant": "int4"}
    fp32, fp16, int4 = report["artifacts"]
    assert int4["pruned_zeros_kept"] and int4["bytes"] < fp32["bytes"] and fp16["bytes"] < fp32["bytes"]
    assert abs(fp16["perplexity"] - fp32["perplexity"]) / fp32["perplexity"] < 1e-3 and fp16["parity_max_abs_diff"] < 1e-2
    assert (run_dir / "tokenizer.json").is_file()
    assert all((run_dir / name).is_file() for name in ("model.q4.kv.onnx", "model.fp16.kv.onnx", "model.kv.onnx"))
    assert json.loads((run_dir / "genai_config.json").read_text())["model"]["decoder"]["filename"] == \
        "model.q4.kv.onnx"  # the deployable model's cache twin
    md = (run_dir / "report.md").read_text()
    assert "| int4 | model.q4.onnx |" in md and "Deployable: model.q4.onnx." in md


@pytest.mark.slow
def test_bundle_verifies_and_catches_a_changed_byte(run_dir, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    assert main(["package", str(run_dir), "--out", str(bundle), "--archive"]) == 0
    assert (tmp_path / "bundle.tar.gz").stat().st_size > 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"] == "model.q4.onnx"
    assert manifest["inputs"][0] == {"name": "input_ids", "dtype": "int64", "dims": ["batch", "sequence"]}
    assert set(manifest["sha256"]) >= {"model.q4.onnx", "model.q4.onnx.data", "model.q4.kv.onnx", "tokenizer.json",
                                       "genai_config.json"}
    assert manifest["cache_model"] == "model.q4.kv.onnx" and len(manifest["generation_check"]["tokens"]) == 16
    assert {"nexus-export", "torch", "onnx"} <= set(manifest["versions"])
    card = (bundle / "README.md").read_text()  # the model card, hashed like every other file
    assert "README.md" in manifest["sha256"] and card.startswith("---\nlibrary_name: onnx\n")
    assert "# tiny-llama, pruned (magnitude 2:4), ONNX" in card and 'ort.InferenceSession("model.q4.onnx")' in card
    assert "holds MatMulNBits weights" in card and "| weight sparsity of the pruned layers | 50.0% (2:4) |" in card
    assert main(["verify", str(bundle)]) == 0
    assert "verified" in capsys.readouterr().out

    data = bundle / "model.q4.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert main(["verify", str(bundle)]) == 2
    assert "model.q4.onnx.data does not match its sha256" in capsys.readouterr().err
    data.write_bytes(bytes(raw[:-10]))
    with pytest.raises(UserError, match="model.q4.onnx.data has .* bytes"):
        verify_bundle(bundle)
    data.unlink()
    with pytest.raises(UserError, match="model.q4.onnx.data is missing"):
        verify_bundle(bundle)


@pytest.mark.slow
def test_bundle_bad_input(run_dir, tmp_path):
    with pytest.raises(UserError, match="no report.json"):
        make_bundle(tmp_path, tmp_path / "b")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        make_bundle(run_dir, taken)


def test_hugging_face_folder_of_a_masked_model(tmp_path):
    import transformers

    program = tiny_program("qwen2")
    MagnitudePass({"pattern": "2:4"}).run(program)
    assert save_hf(program, tmp_path / "hf") < 1e-5
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", use_safetensors=True)
    w = loaded.model.layers[0].mlp.down_proj.weight
    assert float((w == 0).float().mean()) == pytest.approx(0.5)
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, program.logits(ids), atol=1e-5)
