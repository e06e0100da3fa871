"""Checkpoints as users have them: every family saved with transformers' own save_pretrained (older tensor names
included, as GPT-NeoX's embed_out) prunes from the folder end to end, and a config that disagrees with its weights
is refused before any work, naming the tensor, both shapes and the config values behind the expected one."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHS, BLOCK_FORMS, archs, make_tiny
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nexus_export.cli import main
from nexus_export.errors import UserError
from nexus_export.graph.program import Program
from nexus_export.models.zoo import byte_level_tokenizer, open_model

FAST = ["--eval-windows", "2", "--seq-len", "32", "--calib-samples", "2", "--no-latency", "--no-decode-speed"]


def saved(arch: str, folder, layers: int = 3):
    model = make_tiny(arch, layers=layers)
    model.save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return model


def keys_of(folder) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("arch", archs(*ARCHS, *BLOCK_FORMS))
def test_every_family_reads_its_saved_folder_to_the_same_logits(arch, tmp_path):
    """What the folder adds to a family's pruning is reading it: its tensor names (GPT-NeoX's head is saved as
    embed_out.weight), ties and dtypes. Every pass on every family, from the model in memory, is
    tests/nexus_export/models/test_architectures.py's; two families run the whole chain from a folder below."""
    model = saved(arch, tmp_path / "saved")
    if arch == "gpt_neox":
        assert "embed_out.weight" in keys_of(tmp_path / "saved")  # transformers writes the old name back
    program = Program.from_loaded(open_model(tmp_path / "saved"))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(program.logits(ids), model(ids).logits, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_a_saved_folder_prunes_end_to_end_with_every_method(arch, tmp_path):
    """LLaMA and GPT-NeoX (a parallel block whose head is saved under an older name): ShortGPT, SliceGPT and
    SparseGPT 2:4 in one recipe on the folder, lowered to both ONNX models, then magnitude 2:4 from the CLI."""
    folder = tmp_path / "saved"
    saved(arch, folder)
    passes = ["- shortgpt: {remove: 1}", "- slicegpt: {slicing: 0.25, round_to: 4}", "- sparsegpt: {pattern: '2:4'}"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {folder}\npasses:\n  " + "\n  ".join(passes) + "\n"
                      "calibration: {samples: 2, seq_len: 32}\n"
                      "evaluation: {windows: 2, seq_len: 32, latency: false, decode_speed: false}\n")
    assert main(["-q", "run", str(recipe), "--out", str(tmp_path / "chain")]) == 0
    report = json.loads((tmp_path / "chain" / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == [line.split(":")[0][2:] for line in passes]
    assert report["sparsity"]["pattern"] == "2:4" and report["onnx"]["summary"]["all_nm_valid"]
    assert report["parity"]["max_abs_diff"] < 1e-3 and (tmp_path / "chain" / "model.kv.onnx").is_file()
    assert main(["-q", "prune", "--model", str(folder), "--method", "magnitude", "--pattern", "2:4", *FAST,
                 "--out", str(tmp_path / "magnitude")]) == 0


def test_a_config_that_disagrees_with_its_weights_is_refused_before_any_work(tmp_path, capsys):
    folder = tmp_path / "wide"
    saved("llama", folder, layers=2)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"tensor model\.embed_tokens\.weight has shape \[300, 64\] but config\.json "
                                        r"implies \[300, 128\] for model\.embed_tokens\.weight \(hidden_size=128"):
        open_model(folder)
    out = tmp_path / "run"
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["-q", "prune", "--model", str(folder), "--method", "magnitude", *FAST, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "implies [300, 128]" in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_tensor_missing_under_every_name_is_named(tmp_path):
    folder = tmp_path / "holes"
    saved("llama", folder, layers=2)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"lack 1 tensor\(s\) the model needs \(model\.layers\.1\.mlp\.up_proj\.weight\)"):
        open_model(folder)


def test_an_integer_tensor_where_a_weight_belongs_is_refused(tmp_path):
    folder = tmp_path / "ints"
    saved("llama", folder, layers=2)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"tensor model\.norm\.weight is torch\.int32 but model\.norm\.weight is a "
                                        "floating-point weight"):
        open_model(folder)


class _Payload:
    """A pickle that would create a file when unpickled by the unrestricted loader."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def bin_only(folder, model=None):
    model = model or make_tiny("llama", layers=2)
    model.config.save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return model


@pytest.mark.slow
def test_pickled_weights_need_the_opt_in_and_are_converted_once(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("NEXUS_EXPORT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "bin"
    folder.mkdir()
    model = bin_only(folder)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["-q", "prune", "--model", str(folder), "--method", "magnitude", *FAST, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "only pickled weights (pytorch_model.bin)" in err and "add --convert-pickled" in err and not out.exists()
    with caplog.at_level("WARNING"):
        assert main(["-q", "prune", "--model", str(folder), "--method", "magnitude", "--convert-pickled", *FAST,
                     "--out", str(out)]) == 0
    assert any("converting 1 pickled weight file(s) to safetensors" in r.message for r in caplog.records)
    (converted,) = (tmp_path / "cache" / "converted").iterdir()
    assert (converted / "model.safetensors").is_file() and (converted / "config.json").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["origin"]["converted_from_pickle"] == str(converted)
    program = Program.from_loaded(open_model(folder, convert_pickled=True))  # the converted copy, read again
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(program.logits(ids), model(ids).logits, atol=1e-5)
    assert len(list((tmp_path / "cache" / "converted").iterdir())) == 1  # reused, not converted twice


def test_a_pickle_that_runs_code_is_refused_and_its_code_never_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXUS_EXPORT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "evil"
    folder.mkdir()
    bin_only(folder)
    marker = tmp_path / "ran"
    torch.save({"model.norm.weight": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="weights-only loader"):
        open_model(folder, convert_pickled=True)
    assert not marker.exists() and not list((tmp_path / "cache" / "converted").glob("*/model.safetensors"))


def test_a_config_asking_for_custom_code_is_built_as_the_stock_class(tmp_path, caplog):
    folder = tmp_path / "remote"
    saved("llama", folder, layers=2)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    with caplog.at_level("WARNING"):
        loaded = open_model(folder)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    warnings = [r.message for r in caplog.records if "custom code" in r.message]
    assert len(warnings) == 1 and "built as the stock transformers class of its model_type 'llama'" in warnings[0]
    config["model_type"] = "evil"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="model_type 'evil' is not a transformers architecture"):
        open_model(folder)
