"""The command line end to end on tiny-llama, and every bad input: one line, exit 2, no folder left behind."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nexus_export.cli import main

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--eval-windows", "4", "--seq-len", "64", "--no-latency"]


def prune(out, *extra, model="tiny-llama", method="magnitude", decode=False):
    """A CLI run on the fast protocol; the decode-speed stage (which lowers the dense model too) only when asked."""
    return main(["-q", "prune", "--model", model, "--method", method, *FAST, *extra,
                 *([] if decode else ["--no-decode-speed"]), "--out", str(out)])


@pytest.mark.slow
def test_tiny_llama_two_four_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert prune(out, "--sparsity", "0.5", "--pattern", "2:4", decode=True) == 0
    stdout = capsys.readouterr().out
    assert "tiny-llama | magnitude | sparsity 50.0% (2:4)" in stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "genai_config.json", "generation_config.json", "model.kv.onnx", "model.onnx", "model.onnx.data", "plots",
        "recipe.yaml", "report.html", "report.json", "report.md", "tokenizer.json", "tokenizer_config.json"]
    report = json.loads((out / "report.json").read_text())
    for key in ("model", "recipe", "passes", "sparsity", "perplexity", "parity", "onnx", "latency"):
        assert key in report
    (p,) = report["passes"]
    assert p["name"] == "magnitude" and p["wall_s"] >= 0 and p["params_before"] == p["params_after"] == 106944
    assert report["sparsity"]["overall"] == pytest.approx(0.5)
    assert len(report["sparsity"]["per_layer"]) == 14
    assert report["parity"]["max_abs_diff"] < 1e-4
    ppl = report["perplexity"]  # --eval-runtime pytorch (the default): onnxruntime scores the parity windows only
    assert ppl["onnx"] is None and ppl["pruned_runtime"] == "pytorch" and ppl["onnx_eval"].startswith("parity windows")
    assert report["parity"]["perplexity_rel"] < 1e-3 and report["parity"]["pytorch_perplexity"] > 1
    assert "onnxruntime within " in stdout and " relative on the parity windows" in stdout
    assert ppl["tokens"] == 4 * 63 and ppl["dense"] < ppl["pruned"] and not ppl["dense_from_cache"]
    targeted = [row for row in report["onnx"]["layers"] if row["layer"] in report["sparsity"]["per_layer"]]
    assert len(targeted) == 14 and all(row["nm_valid"] for row in targeted)
    # decode speed and a greedy continuation, dense beside pruned, through the key/value-cache models
    gen = report["generation"]
    dense, pruned = gen["models"]
    assert (dense["name"], pruned["name"], pruned["path"]) == ("dense", "pruned", "model.onnx")
    assert dense["decode_tokens_per_s"] > 0 and gen["decode_speedup"] == pytest.approx(
        pruned["decode_tokens_per_s"] / dense["decode_tokens_per_s"])
    assert len(pruned["tokens"]) == gen["sample_tokens"] == 32 and dense["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert dense["tokens"] != pruned["tokens"]  # the dense model is the one before the pass, not the pruned one
    assert "greedy continuation of 'The best way to spend a quiet afternoon is'" in stdout
    assert "## Generation" in (out / "report.md").read_text()
    assert (out / "plots" / "decode_speed.png").is_file() and "<h2>Generation</h2>" in (out / "report.html").read_text()
    genai = json.loads((out / "genai_config.json").read_text())["model"]
    assert genai["decoder"]["filename"] == "model.kv.onnx" and genai["decoder"]["num_hidden_layers"] == 2

    assert main(["check-onnx", str(out / "model.onnx")]) == 0
    table = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in table and "14 targeted layers" in table and "all 2:4-valid" in table

    # --force replaces a finished run only when the new one completes; the dense perplexity comes from the cache;
    # --eval-runtime onnxruntime scores the pruned model in onnxruntime alone
    assert prune(out, "--sparsity", "0.3", "--force", "--eval-runtime", "onnxruntime", decode=True) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["sparsity"]["overall"] == pytest.approx(0.3, abs=0.01)
    assert again["perplexity"]["dense_from_cache"] and again["perplexity"]["dense"] == ppl["dense"]
    assert again["generation"]["models"][0] == {**dense, "from_cache": True}  # the dense row, measured once here
    assert "lower_dense" not in [row["stage"] for row in again["stages"]]
    assert again["perplexity"]["pruned"] == again["perplexity"]["onnx"]
    assert again["perplexity"]["pruned_runtime"] == "onnxruntime"
    assert " (cached) -> pruned " in capsys.readouterr().out


def test_a_recipe_reads_as_prune_writes_it(tmp_path):
    """`run` takes the recipe `prune` builds from its flags (the README recipe runs end to end below)."""
    from nexus_export.run.recipe import Recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-llama\npasses:\n  - magnitude: {pattern: '2:4'}\n"
                      "evaluation: {windows: 2, seq_len: 64, latency: false}\n")
    assert Recipe.from_yaml(recipe).to_dict()["passes"] == [{"magnitude": {
        "pattern": "2:4", "permute": False, "layerwise": "uniform", "owl_m": 5.0, "owl_lambda": 0.08, "per_row": False,
        "uniform": True}}]


def test_method_none_runs_no_pass(tmp_path, capsys):
    """`--method none`: the dense model, quantized only; pass options are refused before any work."""
    from nexus_export.cli import _parser, _prune_recipe

    args = _parser().parse_args(["prune", "--model", "tiny-llama", "--method", "none", "--quantize-bits", "4",
                                 "--quantize-method", "gptq", "--out", str(tmp_path / "o")])
    recipe = _prune_recipe(args)
    assert recipe.passes == () and recipe.quantize.method == "gptq" and recipe.quantize.bits == 4
    assert main(["prune", "--model", "tiny-llama", "--method", "none", "--sparsity", "0.5",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--method none runs no pass, so it takes no pass options; got --sparsity" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_inspect_lists_roles(capsys):
    assert main(["inspect", "tiny-llama"]) == 0
    out = capsys.readouterr().out
    assert "2 blocks (model.layers), 106,944 parameters" in out
    assert "model.layers.0.mlp.down_proj" in out and "mlp_out" in out


BAD = [
    (["--sparsity", "1.5"], "outside [0, 1)"),
    (["--sparsity", "-0.1"], "outside [0, 1)"),
    (["--pattern", "3:2"], "0 < N < M"),
    (["--pattern", "2:0"], "0 < N < M"),
    (["--pattern", "abc"], "is not N:M"),
    (["--pattern", "2:4", "--sparsity", "0.3"], "contradicts"),
    (["--schedule", '{"attn_qkv": 0.5}'], "matches no layer"),
    (["--schedule", "{bad json"], "not valid JSON"),
    (["--eval-windows", "100000"], "too short"),
    (["--eval-runtime", "onnxruntime", "--onnx-eval", "off"], "drop one of them"),
    (["--eval-runtime", "tensorrt"], "must be one of pytorch, onnxruntime, both, got 'tensorrt'"),
]


@pytest.mark.parametrize("args, message", BAD)
def test_bad_prune_input(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert prune(out, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nexus-export: error:") and message in err[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="bogus"), "unknown method 'bogus'"),
    (dict(model="no-such-model"), "unknown model"),
])
def test_unknown_method_and_model(tmp_path, capsys, kwargs, message):
    assert prune(tmp_path / "out", **kwargs) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_path_that_is_not_a_model(tmp_path, capsys):
    folder = tmp_path / "notamodel"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    assert prune(tmp_path / "out", model=str(folder)) == 2
    assert "config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_non_empty_output_is_kept(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert prune(out) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_unknown_recipe_key(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-llama\npasses: [magnitude]\ndistill: {steps: 4}\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "o")]) == 2
    assert "unknown recipe key(s) distill" in capsys.readouterr().err
    recipe.write_text("model: tiny-llama\npasses:\n  - magnitude: {sparsity: 0.5, blocksize: 8}\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "o")]) == 2
    assert "unknown option(s) blocksize for pass magnitude" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_console_script_exit_code(tmp_path):
    exe = Path(sys.executable).parent / "nexus-export"
    proc = subprocess.run([str(exe), "prune", "--model", "tiny-llama", "--method", "magnitude", "--pattern", "abc",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "is not N:M" in proc.stderr


@pytest.mark.slow
def test_readme_demo_command_runs(tmp_path):
    """The README's main command, pointed at tiny-llama so it runs in seconds (the real one is the same script)."""
    out = tmp_path / "demo"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), "--model", "tiny-llama", *FAST,
                           "--calib-samples", "4", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tiny-llama | sparsegpt | sparsity 50.0% (2:4)" in proc.stdout
    assert json.loads((out / "report.json").read_text())["onnx"]["summary"]["layers"] == 15


@pytest.mark.parametrize("method, args, message", [
    ("sparsegpt", ["--percdamp", "0"], "percdamp"),
    ("sparsegpt", ["--percdamp", "-0.5"], "percdamp"),
    ("wanda", ["--blocksize", "64"], "unknown option(s) blocksize for pass wanda"),
    ("wanda", ["--calib-samples", "0"], "calibration.samples must be positive"),
    ("sparsegpt", ["--seq-len", "4096"], "longer than the model's context (1024)"),
])
def test_bad_calibrated_input(tmp_path, capsys, method, args, message):
    assert prune(tmp_path / "out", *args, method=method) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert list(tmp_path.iterdir()) == []


def test_resume_without_checkpoint_is_an_error(tmp_path, capsys):
    assert prune(tmp_path / "out", "--resume", method="sparsegpt") == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_shortgpt_end_to_end_with_hugging_face_folder(tmp_path, capsys):
    import transformers

    out = tmp_path / "short"
    assert prune(out, "--remove", "1", "--strategy", "similarity", "--calib-samples", "4", "--save-hf",
                 "--eval-runtime", "both", method="shortgpt") == 0
    report = json.loads((out / "report.json").read_text())
    (p,) = report["passes"]
    assert p["changes"]["blocks_before"] == 2 and p["changes"]["blocks_after"] == 1
    assert len(p["changes"]["removed"]) == 1 and set(p["changes"]["scores"]) == {"0", "1"}
    assert p["params_after"] < p["params_before"]
    assert report["onnx"]["summary"]["layers"] == 8  # 7 linears of the remaining block + lm_head
    assert report["perplexity"]["onnx_vs_pytorch_rel"] < 1e-3
    assert report["parity"]["hf_folder_max_abs_diff"] < 1e-5
    assert transformers.AutoConfig.from_pretrained(out / "hf").num_hidden_layers == 1
    card = (out / "hf" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "- shortgpt" in card
    assert 'AutoModelForCausalLM.from_pretrained("path/to/this/folder")' in card and "shortgpt:" in card
    md = (out / "report.md").read_text()
    assert "| block | score | removed |" in md


@pytest.mark.parametrize("args, message", [
    (["--remove", "2"], "cannot remove 2 of 2 blocks"),
    (["--remove", "-1"], "0 or more"),
    (["--layers", "5"], "out of range"),
    (["--layers", "0,0"], "more than once"),
    (["--remove", "1", "--strategy", "attention", "--save-hf"], "--save-hf is not possible: shortgpt"),
])
def test_bad_shortgpt_input(tmp_path, capsys, args, message):
    assert prune(tmp_path / "out", *args, method="shortgpt") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_readme_recipe_is_valid_and_structural_then_masking_runs(tmp_path):
    import yaml

    from nexus_export.run.recipe import Recipe

    block = (ROOT / "docs" / "recipes.md").read_text().split("```yaml", 1)[1].split("```", 1)[0]
    recipe = Recipe.from_dict(yaml.safe_load(block))
    assert [s.name for s in recipe.passes] == ["shortgpt", "sparsegpt"] and recipe.quantize.bits == 4

    data = yaml.safe_load(block)
    data.update(model="tiny-llama", calibration={"samples": 4, "seq_len": 64},
                evaluation={"windows": 2, "seq_len": 64, "latency": False})
    data["passes"][0]["shortgpt"]["remove"] = 1
    data["quantize"].update(head=False, accuracy_level=0)  # the int4 file computes exactly what PyTorch evaluated
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    assert main(["-q", "run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    short, sparse, gptq = report["passes"]  # the quantize section runs GPTQ after the recipe's passes
    assert short["changes"]["blocks_after"] == 1 and sparse["changes"]["targeted_layers"] == 7
    assert gptq["name"] == "gptq" and gptq["changes"]["layers"] == 7 and gptq["changes"]["act_order"] is True
    assert report["onnx"]["summary"]["all_nm_valid"] and report["deploy"]["variant"] == "int4"
    assert report["artifacts"][1]["pruned_zeros_kept"] and report["artifacts"][1]["vs_pytorch_rel"] < 1e-4


@pytest.mark.slow
def test_slicegpt_end_to_end(tmp_path, capsys):
    out = tmp_path / "slice"
    assert prune(out, "--slicing", "0.25", "--calib-samples", "8", "--eval-runtime", "both", method="slicegpt") == 0
    assert "tiny-llama | slicegpt (width 64 -> 48) | sparsity 0.0% (none) |" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    (p,) = report["passes"]
    assert p["changes"]["slicing"] == 0.25 and p["changes"]["widths"] == {"0": 48, "1": 48}
    assert p["params_after"] < p["params_before"]
    ppl = report["perplexity"]
    assert abs(ppl["onnx"] - ppl["pruned"]) / ppl["pruned"] < 1e-3
    assert report["onnx"]["summary"]["layers"] == 2 * 7 + 1 + 4  # the linears, the lm_head, 4 shortcut matrices
    assert "stream width in every block: 48" in (out / "report.md").read_text()


@pytest.mark.slow
def test_slicegpt_then_sparsegpt_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-llama\npasses:\n  - slicegpt: {slicing: 0.25}\n  - sparsegpt: {pattern: '2:4'}\n"
                      "calibration: {samples: 8, seq_len: 64}\nevaluation: {windows: 2, seq_len: 64, latency: false}\n")
    assert main(["-q", "run", str(recipe), "--out", str(tmp_path / "o")]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    sliced, sparse = report["passes"]
    assert sparse["changes"]["targeted_layers"] == 14  # the shortcut matrices are not pruning targets
    assert report["onnx"]["summary"]["all_nm_valid"]


@pytest.mark.parametrize("args, message", [
    (["--slicing", "1.0"], "slicing must be a fraction in [0, 1)"),
    (["--slicing", "0.95"], "leaves no dimension"),
    (["--slicing", "0.25", "--save-hf"], "--save-hf is not possible: slicegpt: a sliced model has shortcut matrices"),
])
def test_bad_slicegpt_input(tmp_path, capsys, args, message):
    assert prune(tmp_path / "out", *args, method="slicegpt") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_activation_sparsity_on_top_of_two_four_end_to_end(tmp_path, capsys):
    """--activation-sparsity after a masking method: two passes, the thresholds in the ONNX model (onnxruntime within
    0.1% of PyTorch), the evaluation windows' measured sparsity near the target, and the tables in report.md."""
    out = tmp_path / "run"
    assert prune(out, "--pattern", "2:4", "--activation-sparsity", "0.4", "--calib-samples", "8",
                 "--eval-runtime", "both", method="sparsegpt") == 0
    assert "| activations 4" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["sparsegpt", "activation"]
    assert report["sparsity"]["overall"] == pytest.approx(0.5)
    measured = report["activation_sparsity"]
    assert measured["sparsity"] == pytest.approx(0.4, abs=0.05)
    assert measured["skippable_macs"] == pytest.approx(0.4, abs=0.05)
    ppl = report["perplexity"]
    assert abs(ppl["onnx"] - ppl["pruned"]) / ppl["pruned"] < 1e-3
    rounding = ppl["activation_rounding"]  # PyTorch's own spread under a rounding-sized nudge, beside onnxruntime's
    assert rounding["nudge"] == 1e-6 and rounding["windows"] == "evaluation" and rounding["pytorch"] == ppl["pruned"]
    assert rounding["pytorch_spread_rel"] == pytest.approx(
        max(abs(p - ppl["pruned"]) / ppl["pruned"] for p in rounding["pytorch_nudged"]))
    assert rounding["onnx_vs_pytorch_rel"] == pytest.approx(abs(ppl["onnx"] - ppl["pruned"]) / ppl["pruned"])
    assert rounding["onnx_within_spread"] == (rounding["onnx_vs_pytorch_rel"] <= rounding["pytorch_spread_rel"])
    markdown = (out / "report.md").read_text()
    assert "| thresholds x (1 +- 1e-06), evaluation windows: PyTorch moves by |" in markdown
    assert "## Activation sparsity" in markdown
    assert "differ here by more than float rounding" in markdown  # the parity figures explained where they apply
    assert "| model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj, model.layers.0.self_attn.v_proj | 0 |" \
        in markdown


@pytest.mark.parametrize("args, message", [
    (["--method", "activation", "--activation-sparsity", "1.5"], r"must be in \[0, 1\)"),
    (["--method", "activation", "--activation-roles", "attn_in,head"], "not roles of linears in the blocks"),
    (["--method", "magnitude", "--activation-roles", "mlp_in"], "--activation-roles and --activation-allocation need"),
    (["--method", "activation", "--calib-samples", "1", "--seq-len", "2"], "at least"),
])
def test_bad_activation_input(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["-q", "prune", "--model", "tiny-llama", *args, "--eval-windows", "1", "--no-latency", "--out",
                 str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sparsegpt_then_gptq_end_to_end(tmp_path, capsys):
    """The default quantization of a calibrated run is GPTQ: MatMulNBits from the pass's grids, the 2:4 zeros kept;
    with float32 compute and a float head, onnxruntime's perplexity equals PyTorch's dequantized one; by default
    (int8 activations, the embedding and head on the grid too) the file is smaller and close."""
    out = tmp_path / "run"
    assert prune(out, "--pattern", "2:4", "--calib-samples", "4", "--blocksize", "32", "--true-sequential",
                 "--quantize-bits", "4", "--dtype", "fp32", "--no-quantize-head", "--accuracy-level", "0",
                 method="sparsegpt") == 0
    assert "sparsegpt + gptq" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["sparsegpt", "gptq"]
    assert report["calibration"] == {"source": "austen", "samples": 4, "seq_len": 64, "seed": 0}
    sparsegpt = report["passes"][0]
    assert sparsegpt["options"]["blocksize"] == 32 and sparsegpt["options"]["true_sequential"] is True
    assert sparsegpt["changes"]["calibration"] == {"windows": 4, "seq_len": 64, "true_sequential": True}
    assert sparsegpt["peak_rss_mb"] > 0 and sparsegpt["wall_s"] > 0 and report["onnx"]["summary"]["all_nm_valid"]
    assert not any(x.name.endswith(".checkpoint") for x in tmp_path.iterdir())  # removed once complete
    assert not any(".scratch" in x.name for x in [*tmp_path.iterdir(), *out.iterdir()])  # the grids' and codes' too
    assert report["recipe"]["quantize"]["method"] == "gptq"
    fp32, int4 = report["artifacts"]
    assert int4["method"] == "gptq" and int4["layers"] == 14 and int4["pruned_zeros_kept"] is True
    assert int4["clip_search"] is True and "act-order, ranges searched" in (out / "report.md").read_text()
    assert int4["pytorch_perplexity"] == report["perplexity"]["pruned"] and int4["vs_pytorch_rel"] < 1e-4
    assert int4["bytes"] < 0.6 * fp32["bytes"] and not int4["head"] and int4["accuracy_level"] == 0
    default = tmp_path / "default"
    assert prune(default, "--pattern", "2:4", "--calib-samples", "4", "--blocksize", "32", "--true-sequential",
                 "--quantize-bits", "4", "--dtype", "fp32", method="sparsegpt") == 0
    smaller = json.loads((default / "report.json").read_text())["artifacts"][1]
    assert smaller["head"] and smaller["accuracy_level"] == 4 and smaller["bytes"] < 0.8 * int4["bytes"]
    assert smaller["vs_pytorch_rel"] < 0.05 and smaller["pruned_zeros_kept"]


@pytest.mark.slow
def test_gptq_in_bf16_end_to_end(tmp_path):
    """A bf16 run quantizes with GPTQ without --dtype fp32: the float model stays bf16, the int4 file computes the
    exact grid values, within rounding of the PyTorch program's bf16 ones, and keeps the 2:4 zeros."""
    import onnx

    out = tmp_path / "run"
    assert prune(out, "--pattern", "2:4", "--calib-samples", "4", "--quantize-bits", "4", "--dtype", "bf16",
                 "--no-quantize-head", "--accuracy-level", "0", method="sparsegpt") == 0
    report = json.loads((out / "report.json").read_text())
    bf16, int4 = report["artifacts"]
    assert bf16["name"] == "bf16" and int4["name"] == "int4" and int4["layers"] == 14 and int4["pruned_zeros_kept"]
    assert 0 < int4["vs_pytorch_rel"] < 1e-3 and int4["bytes"] < 0.6 * bf16["bytes"]
    def stored(path):
        model = onnx.load(str(path), load_external_data=False)
        return {t.data_type for t in model.graph.initializer if "layers" in t.name and len(t.dims) >= 2}

    assert stored(out / "model.onnx") == {onnx.TensorProto.BFLOAT16}
    assert stored(out / "model.q4.onnx") == {onnx.TensorProto.UINT8}  # codes only: the bf16 block weights are gone


@pytest.mark.slow
def test_joint_sweep_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert prune(out, "--pattern", "2:4", "--calib-samples", "8", "--quantize-bits", "4", "--dtype", "fp32",
                 "--joint", "--no-quantize-sym", "--no-clip-search", "--no-quantize-head", "--accuracy-level", "0",
                 method="wanda") == 0
    report = json.loads((out / "report.json").read_text())
    (gptq,) = report["passes"]  # the wanda pass runs inside the sweep
    assert gptq["name"] == "gptq" and gptq["changes"]["joint"] == "wanda" and gptq["changes"]["sym"] is False
    assert gptq["changes"]["clip_search"] is False and report["artifacts"][1]["clip_search"] is False
    assert report["sparsity"]["pattern"] == "2:4" and report["onnx"]["summary"]["all_nm_valid"]
    assert report["artifacts"][1]["vs_pytorch_rel"] < 1e-4


@pytest.mark.parametrize("args, message", [
    (["--method", "sparsegpt", "--quantize-bits", "3"], "must be 4 or 8"),
    (["--method", "sparsegpt", "--quantize-bits", "4", "--group-size", "48"], "power of two"),
    (["--method", "sparsegpt", "--quantize-bits", "4", "--group-size", "128", "--dtype", "fp32"],
     "group size 128 does not divide the input width 64 of model.layers.0"),
    (["--method", "magnitude", "--quantize-bits", "4", "--joint"], "needs the gptq method"),
    (["--method", "magnitude", "--quantize-bits", "4", "--quantize-method", "gptq", "--joint"],
     "needs a sparsegpt or wanda pass"),
    (["--method", "magnitude", "--quantize-bits", "4", "--act-order"], "needs the gptq method"),
    (["--method", "magnitude", "--quantize-bits", "4", "--clip-search"], "clip_search .--clip-search. needs the gptq"),
    (["--method", "sparsegpt", "--pattern", "2:4", "--quantize-bits", "4", "--joint", "--act-order"],
     "act-order cannot be combined"),
    (["--method", "sparsegpt", "--act-order"], "--act-order set how to quantize, but nothing is quantized"),
    (["--method", "sparsegpt", "--pattern", "2:4", "--refit-steps", "5", "--quantize-bits", "4", "--joint"],
     "drop --refit-steps or --joint"),
    (["--method", "magnitude", "--fp16", "--dtype", "bf16"], "--fp16 starts from float32 weights.*add --dtype fp32$"),
    (["--method", "sparsegpt", "--quantize-bits", "8", "--dtype", "bf16"],
     "cannot tell the codes of 8-bit grids apart"),
])
def test_bad_quantization_input(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["-q", "prune", "--model", "tiny-llama", *args, "--eval-windows", "1", "--calib-samples", "2",
                 "--seq-len", "32", "--no-latency", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_round_to_nearest_runs_on_a_bf16_run(tmp_path):
    """Round to nearest reads the bf16 file's weights through their Casts: no --dtype fp32 (a float32 copy of a big
    model's file) is needed; the int4 file keeps the pruned zeros and is scored."""
    out = tmp_path / "out"
    assert main(["-q", "prune", "--model", "tiny-llama", "--method", "magnitude", "--pattern", "2:4", "--dtype", "bf16",
                 "--quantize-bits", "4", "--eval-windows", "1", "--seq-len", "32", "--no-latency",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    int4 = report["artifacts"][-1]
    assert int4["name"] == "int4" and int4["method"] == "rtn" and int4["pruned_zeros_kept"]
    assert report["execution"]["dtype"] == "bf16" and report["artifacts"][0]["name"] == "bf16"
    assert abs(int4["perplexity"] - report["perplexity"]["pruned"]) < 0.05 * report["perplexity"]["pruned"]


def test_quantization_method_defaults_to_gptq_when_the_run_calibrates():
    from nexus_export.run.recipe import Recipe, run_steps

    calibrated = Recipe.from_dict({"model": "tiny-llama", "passes": [{"sparsegpt": {"pattern": "2:4"}}],
                                   "quantize": {"bits": 4}})
    assert calibrated.quantize.method == "gptq" and calibrated.quantize.act_order is True
    assert calibrated.quantize.clip_search is True and run_steps(calibrated)[1].config.clip_search is True
    assert [s.name for s in run_steps(calibrated)] == ["sparsegpt", "gptq"]
    plain = Recipe.from_dict({"model": "tiny-llama", "passes": ["magnitude"], "quantize": {"bits": 4, "block_size": 64}})
    assert plain.quantize.method == "rtn" and plain.quantize.group_size == 64 and run_steps(plain) == plain.passes
    assert plain.quantize.act_order is False and plain.quantize.clip_search is False
    joint = Recipe.from_dict({"model": "tiny-llama", "passes": [{"sparsegpt": {"pattern": "2:4", "percdamp": 0.02}}],
                              "quantize": {"bits": 4, "joint": True}})
    (step,) = run_steps(joint)
    assert step.name == "gptq" and step.config.prune == {"method": "sparsegpt", "pattern": "2:4", "permute": False,
                                                         "layerwise": "uniform", "owl_m": 5.0, "owl_lambda": 0.08,
                                                         "refit_steps": 0}  # checked: a refit cannot join the sweep
    assert step.config.percdamp == 0.02 and step.config.act_order is False  # N:M groups follow the stored order
    assert step.config.clip_search is False  # a group's range is fitted before its N:M mask is final
    wanda = Recipe.from_dict({"model": "tiny-llama", "passes": [{"wanda": {"pattern": "2:4"}}],
                              "quantize": {"bits": 4, "joint": True}})
    assert run_steps(wanda)[0].config.act_order is True  # Wanda's mask is fixed before the sweep
    assert run_steps(wanda)[0].config.clip_search is True
    assert Recipe.from_dict(joint.to_dict()) == joint  # recipe.yaml round-trips


@pytest.mark.parametrize("args, message", [
    (["--remove", "1", "--strategy", "perplexity", "--rank-windows", "9", "--calib-samples", "4"],
     "--rank-windows 9 is more than the 4 calibration windows"),
    (["--remove", "1", "--iterative"], "belong to strategy perplexity"),
])
def test_bad_perplexity_ranking_input(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["-q", "prune", "--model", "tiny-llama", "--method", "shortgpt", *args, "--eval-windows", "1",
                 "--seq-len", "32", "--no-latency", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []
