"""`nexus-export generate` and the Python generate_text: every runtime gives the same greedy text from a run folder,
a bundle or the dense model, and every bad input is one line, exit 2, before any token."""

from __future__ import annotations

import json
import shutil

import pytest

from nexus_export.cli import main
from nexus_export.errors import UserError
from nexus_export.generate.loop import Sampling
from nexus_export.generate.text import generate_text
from runtimes import genai

FAST = ["--eval-windows", "2", "--seq-len", "32", "--no-latency", "--no-decode-speed"]
PROMPT = "It is a truth universally acknowledged"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "run"
    assert main(["-q", "prune", "--model", "tiny-llama", "--method", "magnitude", "--pattern", "2:4", "--save-hf",
                 *FAST, "--out", str(out)]) == 0
    return out


def generated(capsys, *args) -> tuple[int, str, str]:
    code = main(["-q", "generate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_streams_the_prompt_and_its_continuation_and_reports_speed(run_dir, capsys):
    code, out, err = generated(capsys, str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "12")
    assert code == 0 and out.startswith(PROMPT) and len(out) > len(PROMPT)
    assert "onnxruntime: prefill " in err and "tokens/s); decode 12 tokens" in err
    result = generate_text(run_dir, PROMPT, 12)  # the same through the Python API
    assert out == PROMPT + result.text + "\n" and len(result.generated.tokens) == 12


def test_every_runtime_gives_the_same_greedy_text(run_dir, capsys):
    texts = {runtime: generate_text(run_dir, PROMPT, 16, runtime).text for runtime in ("onnxruntime", "pytorch")}
    if genai.available()[0]:
        texts["genai"] = generate_text(run_dir, PROMPT, 16, "genai").text
    assert len(set(texts.values())) == 1, texts


def test_the_dense_model_generates_in_pytorch_and_onnxruntime_alike(capsys):
    code, torch_out, _ = generated(capsys, "--model", "tiny-llama", "--prompt", PROMPT, "--max-new-tokens", "10",
                                   "--runtime", "pytorch")
    code_ort, ort_out, _ = generated(capsys, "--model", "tiny-llama", "--prompt", PROMPT, "--max-new-tokens", "10")
    assert code == code_ort == 0 and torch_out == ort_out


def test_sampling_is_reproducible_from_its_seed(run_dir):
    a = generate_text(run_dir, PROMPT, 16, sampling=Sampling(temperature=1.5, top_p=0.9, seed=7))
    b = generate_text(run_dir, PROMPT, 16, sampling=Sampling(temperature=1.5, top_p=0.9, seed=7))
    assert a.generated.tokens == b.generated.tokens != generate_text(run_dir, PROMPT, 16).generated.tokens


def test_a_bundle_generates_and_verify_repeats_its_recorded_tokens(run_dir, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    assert main(["-q", "package", str(run_dir), "--out", str(bundle)]) == 0
    assert generate_text(bundle, PROMPT, 8).text == generate_text(run_dir, PROMPT, 8).text
    assert main(["verify", str(bundle)]) == 0
    assert "16 greedy tokens from model.kv.onnx as recorded" in capsys.readouterr().out
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["generation_check"]["tokens"][5] = (manifest["generation_check"]["tokens"][5] + 1) % 200
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(bundle)]) == 1
    err = capsys.readouterr().err
    assert "verify failed" in err and "first at new token 5" in err


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be at least 1"),
    (["--max-new-tokens", "1000"], "more than the model's context of 1024 tokens"),
    (["--temperature", "-1"], "--temperature must be between 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
])
def test_bad_generation_settings_are_refused_before_any_token(run_dir, capsys, args, message):
    code, out, err = generated(capsys, str(run_dir), "--prompt", PROMPT * 3, *args)
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1


def test_a_prompt_longer_than_the_context_is_refused(run_dir, capsys):
    code, out, err = generated(capsys, str(run_dir), "--prompt", "x" * 1100, "--max-new-tokens", "4")
    assert code == 2 and out == "" and "the prompt has 1100 tokens" in err


def test_folders_without_a_generation_model_say_what_to_do(run_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = generated(capsys, str(empty), "--prompt", PROMPT)
    assert code == 2 and out == "" and "neither a run folder nor a bundle; for a model folder use --model" in err
    old = tmp_path / "old"  # a run folder written before generation support: no cache model, no genai config
    shutil.copytree(run_dir, old)
    (old / "model.kv.onnx").unlink()
    (old / "genai_config.json").unlink()
    code, out, err = generated(capsys, str(old), "--prompt", PROMPT)
    assert code == 2 and out == "" and "has no key/value-cache model" in err
    assert f"nexus-export run {old / 'recipe.yaml'} --out NEW_DIR" in err
    code, _, err = generated(capsys, str(old), "--prompt", PROMPT, "--runtime", "genai")
    assert code == 2 and ("no key/value-cache model" in err or "onnxruntime-genai" in err)
    code, _, err = generated(capsys, str(tmp_path / "missing"), "--prompt", PROMPT)
    assert code == 2 and "is not a folder" in err
    code, _, err = generated(capsys, str(run_dir), "--model", "tiny-llama", "--prompt", PROMPT)
    assert code == 2 and "not both" in err
    code, _, err = generated(capsys, str(run_dir))
    assert code == 2 and "--prompt TEXT or --prompt-file FILE" in err
    code, _, err = generated(capsys, str(run_dir), "--prompt-file", str(tmp_path / "nope.txt"))
    assert code == 2 and "does not exist" in err


def test_genai_missing_names_the_extra(run_dir, capsys, monkeypatch):
    monkeypatch.setattr(genai, "available", lambda: (False, "onnxruntime-genai is not installed (test); "
                                                            + genai.EXTRA))
    code, out, err = generated(capsys, str(run_dir), "--prompt", PROMPT, "--runtime", "genai")
    assert code == 2 and out == "" and "pip install 'nexus-export[genai]'" in err


def test_pytorch_needs_the_hugging_face_folder(run_dir, tmp_path, capsys):
    copy = tmp_path / "nohf"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "hf")
    code, out, err = generated(capsys, str(copy), "--prompt", PROMPT, "--runtime", "pytorch")
    assert code == 2 and out == "" and "no PyTorch model (hf/" in err


def test_a_program_needs_the_pytorch_runtime():
    from conftest import tiny_program

    with pytest.raises(UserError, match="generates in PyTorch"):
        generate_text(tiny_program("llama"), PROMPT, 4, "onnxruntime")
