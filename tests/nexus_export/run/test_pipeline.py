"""The pipeline at any scale: checkpoints in their own dtype, the memory budget, spilling, onnxruntime evaluation
when it fits, and the time and memory of every stage in the report."""

import json

import onnx
import pytest
import torch
from conftest import make_tiny

from nexus_export.cli import main

FAST = ["--eval-windows", "2", "--seq-len", "64", "--no-latency"]


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    """tiny-llama's shape saved as a bf16 Hugging Face folder with the byte-level tokenizer."""
    from nexus_export.models.zoo import byte_level_tokenizer

    folder = tmp_path_factory.mktemp("bf16")
    model = make_tiny("llama")
    model.config.vocab_size = 300
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    byte_level_tokenizer(512).save_pretrained(folder)
    return folder


def prune(out, model, *extra, method="magnitude", decode=False):
    """A CLI run on the fast protocol; the decode-speed stage (which lowers the dense model too) only when asked."""
    return main(["-q", "prune", "--model", str(model), "--method", method, "--pattern", "2:4", *FAST, *extra,
                 *([] if decode else ["--no-decode-speed"]), "--out", str(out)])


def report_of(out):
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_a_bf16_checkpoint_stays_bf16_and_a_small_budget_changes_nothing(tmp_path, bf16_folder, capsys):
    out = tmp_path / "run"
    assert prune(out, bf16_folder, decode=True) == 0
    report = report_of(out)
    assert report["execution"] == {"device": "cpu", "dtype": "bf16", "compute_dtype": "fp32",
                                   "memory_budget_bytes": 2 * 2**30, "world_size": 1, "backend": None}
    assert report["model"]["checkpoint_bytes"] == report["model"]["params_dense"] * 2
    stages = [row["stage"] for row in report["stages"]]
    assert stages == ["load", "capture", "eval_dense", "pass:magnitude", "eval_pruned", "lower", "lower_dense",
                      "check_onnx", "onnxruntime", "generation"]
    rows = {row["stage"]: row for row in report["stages"]}
    assert all(row["peak_rss_mb"] > 100 for row in rows.values())  # the process holds torch: never under 100 MiB
    assert all(report["timings"][f"{name}_s"] == row["wall_s"] for name, row in rows.items())
    rounding = 0.005 * (len(rows) + 1)  # every figure is rounded to 0.01 s
    assert sum(row["wall_s"] for row in rows.values()) <= report["timings"]["total_s"] + rounding
    assert rows["capture"]["wall_s"] > 0 and rows["lower"]["wall_s"] > 0.1  # (a graph captured before is reused)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    dtypes = {t.name: t.data_type for t in model.graph.initializer}
    assert dtypes["lm.model.layers.0.mlp.down_proj.weight"] == onnx.TensorProto.BFLOAT16
    assert report["parity"]["perplexity_rel"] < 1e-3  # the same bf16 weights on both sides (the parity windows)
    assert "| pass:magnitude |" in (out / "report.md").read_text()

    # a budget below the model: edits spill to a scratch file (removed at the end) and change nothing; onnxruntime,
    # which would hold the whole model, is skipped with the reason (--onnx-eval auto)
    capsys.readouterr()
    assert prune(tmp_path / "b", bf16_folder, "--memory-budget", "160KiB") == 0
    b = report_of(tmp_path / "b")
    assert b["perplexity"]["pruned"] == report["perplexity"]["pruned"]
    assert (out / "model.onnx.data").read_bytes() == (tmp_path / "b" / "model.onnx.data").read_bytes()
    assert b["perplexity"]["onnx"] is None and "more than the memory budget" in b["perplexity"]["onnx_eval"]
    assert b["parity"]["max_abs_diff"] is None and "onnxruntime not run" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "run"]  # no scratch folder left


@pytest.mark.slow
def test_dtype_flag_changes_the_output_dtype(tmp_path, bf16_folder):
    out = tmp_path / "run"
    assert prune(out, bf16_folder, "--dtype", "fp32") == 0
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {t.data_type for t in model.graph.initializer if t.name.endswith("proj.weight")} == {onnx.TensorProto.FLOAT}
    assert report_of(out)["execution"]["dtype"] == "fp32"


@pytest.mark.parametrize("args, message", [
    (["--memory-budget", "1KiB"], "--memory-budget 1KiB is smaller than one decoder block of this model in bfloat16 "
                                  "(72KiB); use --memory-budget 72KiB or more"),  # its edits are kept in bf16
    (["--memory-budget", "200KiB", "--onnx-eval", "on"], "onnxruntime would hold 439KiB of float32 weights, more "
                                                         "than the memory budget of 200KiB"),
    (["--memory-budget", "lots"], "not a positive size"),
    (["--device", "tpu"], "unknown device"),
    (["--dtype", "fp8"], "invalid choice"),
])
def test_bad_scale_input(tmp_path, bf16_folder, capsys, args, message):
    assert prune(tmp_path / "out", bf16_folder, *args) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    assert prune(tmp_path / "out", "tiny-llama", "--device", "cuda") == 2
    assert "sees no CUDA GPU" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_truncated_shard_is_named_before_any_work(tmp_path, bf16_folder, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    for f in bf16_folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert prune(tmp_path / "out", folder) == 2
    err = capsys.readouterr().err
    assert "model.safetensors is truncated" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_no_passes_and_variants_without_onnxruntime_evaluation(tmp_path):
    """A recipe without passes exports the dense model; --onnx-eval off still writes the quantized variant (its
    perplexity unmeasured) and ships it as the deployable model."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-llama\npasses: []\nquantize: {bits: 4, block_size: 32}\n"
                      "evaluation: {windows: 2, seq_len: 64, latency: false, onnx: 'off'}\n")
    assert main(["-q", "run", str(recipe), "--out", str(tmp_path / "o")]) == 0
    report = report_of(tmp_path / "o")
    assert report["passes"] == [] and report["sparsity"]["overall"] == 0.0
    assert [(a["name"], a["perplexity"]) for a in report["artifacts"]] == [("fp32", None), ("int4", None)]
    assert report["deploy"]["variant"] == "int4" and (tmp_path / "o" / "model.q4.onnx").is_file()
    stages = [row["stage"] for row in report["stages"]]
    assert stages[-2:] == ["check_onnx", "write_variants"]  # the int4 file's writing has its own peak and time


def test_the_automatic_budget_follows_the_block_within_free_memory():
    """auto: 2 GiB while a block fits in it; a wider block gets its own size (rounded up to 64 MiB), capped by free
    memory but never below one block; a block larger than the free memory is refused before any work."""
    from nexus_export.errors import UserError
    from nexus_export.run.pipeline import auto_budget

    GiB, MiB = 2**30, 2**20
    assert auto_budget(300 * MiB, available=20 * GiB) == 2 * GiB
    assert auto_budget(3264 * MiB + 1, available=20 * GiB) == 3264 * MiB + 64 * MiB  # a 70B-wide block in float32
    assert auto_budget(300 * MiB, available=GiB) == GiB  # 2 GiB does not fit: what is free
    with pytest.raises(UserError, match="needs 1632MiB in bfloat16 and this machine has 1024MiB free"):
        auto_budget(1632 * MiB, "bfloat16", available=GiB)


def test_the_budget_holds_a_block_as_its_edits_are_kept(bf16_folder):
    """A pass's edits of a bf16 checkpoint are kept in bf16 (the block runs one linear at a time in float32, outside
    the budget), so the budget's need is the block in bf16, or in the output dtype when --dtype sets one."""
    from nexus_export.graph.program import Program
    from nexus_export.models.zoo import open_model
    from nexus_export.run.pipeline import _block_need

    linears = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)  # bytes of one block's q, o; k, v; gate, up, down in bf16
    bf16 = Program.from_loaded(open_model(str(bf16_folder)))
    assert _block_need(bf16) == (linears, "bfloat16")
    as_fp32 = Program.from_loaded(open_model(str(bf16_folder)), store_dtype=torch.float32)
    assert _block_need(as_fp32) == (2 * linears, "float32")


def test_the_store_takes_a_new_budget_and_spills_to_it(tmp_path):
    from nexus_export.weights.store import WeightStore

    store = WeightStore(budget=2**20, scratch=tmp_path)
    for i in range(3):
        store.set(f"w{i}", torch.full((256, 256), float(i)))  # 256 KiB each
    assert store.resident_bytes() == 3 * 2**18
    store.budget = 2**18
    assert store.budget == 2**18 and store.resident_bytes() <= 2**18
    assert [float(store.get(f"w{i}")[0, 0]) for i in range(3)] == [0.0, 1.0, 2.0]  # spilled ones read back


def test_outputs_larger_than_the_free_disk_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import collections

    import nexus_export.run.pipeline as pipeline

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**10, 2**10))
    assert prune(tmp_path / "out", "tiny-llama", "--fp16") == 2
    err = capsys.readouterr().err
    assert "the outputs need about" in err and "model.onnx.data" in err and "model.fp16.onnx.data" in err
    assert "1KiB free; free space there or choose another --out" in err
    assert list(tmp_path.iterdir()) == []
    for method, kept in (("wanda", True), ("magnitude", False)):  # Wanda keeps each finished block for --resume
        assert prune(tmp_path / "out", "tiny-llama", "--method", method) == 2
        err = capsys.readouterr().err
        assert ("resume checkpoints (until the run ends)" in err) is kept
        assert ("scratch (a pass's edits, spilled before lowering)" in err) is not kept  # magnitude's stay in memory
    assert prune(tmp_path / "out", "tiny-llama", "--method", "wanda", "--quantize-bits", "4") == 2
    err = capsys.readouterr().err
    assert "model.q4.onnx.data" in err and "its codes' scratch copy while it is written" in err
    assert "GPTQ's grids, until the int4 file is written" in err  # wanda calibrates: GPTQ by default
    monkeypatch.setattr(pipeline, "LEAN_HESSIAN_WIDTH", 0)  # every input wide: its Hessian is factored in place
    for method, copied in (("sparsegpt", True), ("wanda", False)):
        assert prune(tmp_path / "out", "tiny-llama", "--method", method) == 2
        assert ("a Hessian's copy while it is factored in place" in capsys.readouterr().err) is copied


def test_a_pass_s_edits_are_spilled_before_lowering(tmp_path, monkeypatch, bf16_folder):
    """The lowering's working set never sits beside a pass's edits: before it starts, every edit magnitude left in
    memory (a checkpoint folder's weights are read from disk, so the edits are the store's own) is written to the
    scratch file, none stays resident, and the run completes from there."""
    from nexus_export.weights.store import WeightStore

    real, emptied = WeightStore.spill, []

    def spy(self, keep=0):
        real(self, keep)
        if keep == 0:
            emptied.append((self.resident_bytes(), self.spilled_bytes))

    monkeypatch.setattr(WeightStore, "spill", spy)
    assert prune(tmp_path / "out", str(bf16_folder), "--sparsity", "0.5") == 0
    block = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128  # q, o; k, v; gate, up, down
    assert emptied == [(0, 2 * block * 2)]  # both blocks' linears in bf16, all written out before the lowering
