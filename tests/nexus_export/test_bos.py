"""The BOS convention: which models get a BOS token at the start of every window, windows that keep their length, and
a BOS family's perplexity equal to plain transformers on the same windows."""

import json

import pytest
import torch
from conftest import make_tiny
from tokenizers import processors

from nexus_export.cli import main
from nexus_export.data import calibration_windows, choose_bos, evaluation_windows
from nexus_export.data.windows import _stream
from nexus_export.errors import UserError
from nexus_export.metrics import next_token_nll, perplexity
from nexus_export.models.zoo import byte_level_tokenizer

FAST = ["--eval-windows", "2", "--seq-len", "64", "--no-latency", "--onnx-eval", "off"]


def adding_tokenizer():
    """The byte-level tokenizer with a ``<bos>`` token (id 257) that every encoding starts with, as Gemma's does."""
    tok = byte_level_tokenizer(512)
    tok.add_special_tokens({"bos_token": "<bos>"})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    return tok


def without_bos():
    tok = byte_level_tokenizer(512)
    tok.bos_token = None
    return tok


def test_auto_follows_the_tokenizer_and_the_family():
    plain = byte_level_tokenizer(512)  # has a BOS token (<|endoftext|>) but does not add it, like SmolLM2's
    assert choose_bos(plain, "llama").token_id is None
    family = choose_bos(plain, "gemma2")
    assert (family.token_id, family.reason) == (256, "gemma2 models are trained with it")
    adds = choose_bos(adding_tokenizer(), "llama")
    assert (adds.token_id, adds.token, adds.reason) == (257, "<bos>", "the tokenizer adds it to every encoding")
    assert choose_bos(adding_tokenizer(), "gemma", "never").token_id is None
    assert choose_bos(plain, "llama", "always").token_id == 256


def test_always_without_a_bos_token_and_an_unknown_mode_are_refused():
    with pytest.raises(UserError, match="--bos always: the tokenizer has no BOS token"):
        choose_bos(without_bos(), "llama", "always")
    with pytest.raises(UserError, match=r"bos \(--bos\) must be one of auto, always, never, got 'sometimes'"):
        choose_bos(byte_level_tokenizer(512), "llama", "sometimes")


def test_windows_with_a_bos_keep_their_length():
    tok = byte_level_tokenizer(512)
    stream = _stream(tok, "austen", "evaluation")
    windows = evaluation_windows(tok, "austen", 3, 16, bos=256)
    assert windows.shape == (3, 16) and windows[:, 0].tolist() == [256] * 3
    assert torch.equal(windows[:, 1:].reshape(-1), stream[:45])  # disjoint: 15 tokens of text each, in order
    assert torch.equal(evaluation_windows(tok, "austen", 3, 16), stream[:48].reshape(3, 16))  # unchanged without
    calib = calibration_windows(tok, "austen", 4, 16, 0, bos=256)
    assert calib.shape == (4, 16) and calib[:, 0].tolist() == [256] * 4 and bool((calib[:, 1:] != 256).all())
    with pytest.raises(UserError, match="leaves no room for text after the BOS token"):
        evaluation_windows(tok, "austen", 2, 1, bos=256)


@pytest.fixture(scope="module")
def gemma_folders(tmp_path_factory):
    """A tiny Gemma saved with a tokenizer that adds a BOS, and the same model with a tokenizer that has none."""
    model = make_tiny("gemma")
    folders = {}
    for label, tok in (("adds", adding_tokenizer()), ("none", without_bos())):
        folder = tmp_path_factory.mktemp(label)
        model.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
        folders[label] = folder
    return folders


@pytest.mark.slow
def test_a_bos_family_scores_what_transformers_scores_with_a_bos(tmp_path, gemma_folders):
    out = tmp_path / "run"
    assert main(["-q", "prune", "--model", str(gemma_folders["adds"]), "--method", "magnitude", "--sparsity", "0.5",
                 *FAST, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["bos"] == {"mode": "auto", "token_id": 257, "token": "<bos>",
                             "reason": "the tokenizer adds it to every encoding"}
    assert report["recipe"]["bos"] == "auto"
    assert "Every window starts with the BOS token <bos> (id 257" in (out / "report.md").read_text()
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(gemma_folders["adds"]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(gemma_folders["adds"])
    windows = evaluation_windows(tok, "austen", 2, 64, bos=tok.bos_token_id)
    with torch.no_grad():
        nll, tokens = next_token_nll(model(input_ids=windows).logits, windows)
    assert tokens == report["perplexity"]["tokens"] == 2 * 63
    assert report["perplexity"]["dense"] == pytest.approx(perplexity(nll, tokens), rel=1e-3)


@pytest.mark.slow
def test_bos_always_without_a_bos_token_stops_before_any_output(tmp_path, gemma_folders, capsys):
    out = tmp_path / "run"
    assert main(["prune", "--model", str(gemma_folders["none"]), "--method", "magnitude", "--bos", "always", *FAST,
                 "--out", str(out)]) == 2
    assert "--bos always: the tokenizer has no BOS token" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_the_recipe_carries_bos_and_refuses_other_values():
    from nexus_export.run.recipe import Recipe

    recipe = Recipe.from_dict({"model": "tiny-llama", "passes": [], "bos": "never"})
    assert recipe.bos == "never" and Recipe.from_dict(recipe.to_dict()).bos == "never"
    assert Recipe.from_dict({"model": "tiny-llama"}).bos == "auto"
    with pytest.raises(UserError, match=r"bos \(--bos\) must be one of auto, always, never, got True"):
        Recipe.from_dict({"model": "tiny-llama", "bos": True})  # YAML reads an unquoted yes as true


@pytest.mark.slow
def test_the_python_api_prepends_the_bos_as_the_cli_does():
    from nexus_export.api.pruning import evaluate_perplexity

    model, tok = make_tiny("gemma"), byte_level_tokenizer(512)  # gemma: a BOS by family, though the tokenizer adds none
    windows = evaluation_windows(tok, "austen", 2, 32, bos=tok.bos_token_id)
    with torch.no_grad():
        nll, tokens = next_token_nll(model(input_ids=windows).logits, windows)
    assert evaluate_perplexity(model, "austen", tok, windows=2, seq_len=32) == pytest.approx(perplexity(nll, tokens),
                                                                                             rel=1e-5)
    without = evaluate_perplexity(model, "austen", tok, windows=2, seq_len=32, bos="never")
    assert without != pytest.approx(perplexity(nll, tokens), rel=1e-5)
