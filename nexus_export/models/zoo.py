"""The model zoo: load a model and its tokenizer by zoo name, from a local Hugging Face folder, or wrap a loaded one.

Zoo entries are data: one YAML file per model in the package's ``nexus_export/models/`` folder (package data, so
an installed nexus-export has its zoo), with ``name``, ``description``,
``kind`` and what that kind needs. Kinds:

- ``random``: a seeded random model built from a transformers config class, with a byte-level tokenizer built in
  memory. No download, instant; used by tests and quick demos.
- ``gguf``: a pretrained model shipped as a GGUF file inside an installed Python package. The first load dequantizes
  it with transformers (slow) and caches float32 safetensors under ``$NEXUS_EXPORT_CACHE/models/<name>``
  (default ``~/.cache/nexus-export``); later loads read the cache, never the network.

Two ways in: ``open_model`` (the pipeline) builds a folder's model on the meta device from its config and leaves the
weights in the safetensors shards, whose headers are read and checked (``LoadedModel.files``): nothing of the size of
the model is read. ``load_model`` (Python users) gives a float32 transformers model with its weights in memory, in
eval mode. Pickled checkpoints are never loaded.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from nexus_export.errors import UserError
from nexus_export.graph.capture import parameters_on_meta
from nexus_export.outdir import sha256_file
from nexus_export.weights.checkpoint_keys import check_checkpoint
from nexus_export.weights.pickled import FLAG, PICKLED, converted_folder, pickled_files
from nexus_export.weights.shards import checkpoint_files, index_checkpoint

log = logging.getLogger(__name__)

KINDS = ("random", "gguf")
ENDOFTEXT = "<|endoftext|>"
_ORIGIN_FILE = "nexus-origin.json"


@dataclass
class LoadedModel:
    """A model ready for capture, in eval mode, with its tokenizer and a record of where its weights came from.

    ``files`` is empty when the model holds its weights in memory; otherwise the model was built on the meta device and
    ``files`` are its safetensors shards (``index``: the tensor each parameter and stored buffer of the model reads,
    by the model's own names: transformers' key mapping applied, shapes checked against the config)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    name: str
    origin: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    index: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- zoo entries


def models_dir() -> Path:
    """The package's ``models/`` folder, which holds one YAML file per zoo model."""
    return Path(__file__).resolve().parent


def zoo_entries() -> dict[str, dict[str, Any]]:
    """Every zoo entry by name, read and checked from ``models/*.yaml``."""
    entries: dict[str, dict[str, Any]] = {}
    for path in sorted(models_dir().glob("*.yaml")):
        entry = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(entry, dict) or entry.get("name") != path.stem:
            raise UserError(f"zoo file {path} must be a mapping whose 'name' is {path.stem!r}; fix the file")
        missing = [key for key in ("description", "kind") if key not in entry]
        if missing:
            raise UserError(f"zoo file {path} lacks {', '.join(missing)}; add them")
        if entry["kind"] not in KINDS:
            raise UserError(f"zoo file {path} has kind {entry['kind']!r}; expected one of {', '.join(KINDS)}")
        entries[entry["name"]] = entry
    return entries


def zoo_names() -> list[str]:
    """The names of the zoo models, sorted."""
    return sorted(zoo_entries())


# ---------------------------------------------------------------------------------------------------- public API


def open_model(name_or_path: str | os.PathLike, convert_pickled: bool = False) -> LoadedModel:
    """A zoo model or local Hugging Face folder, ready for capture without reading its weights: a folder's model is
    built on the meta device and its shards' headers are checked (a truncated or missing shard is a UserError naming
    it); a random zoo model is built in memory. A folder with only pickled weights is refused unless
    ``convert_pickled`` (then read from its safetensors copy in the cache, see pickled.py)."""
    name = os.fspath(name_or_path)
    entries = zoo_entries()
    if name in entries:
        entry = entries[name]
        if entry["kind"] == "random":
            return _finish(_build_random(entry))
        cached, origin = _gguf_cache(entry)
        loaded = _open_folder(cached, entry["name"], origin)
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise UserError(
                f"unknown model {name!r}: expected a zoo name ({', '.join(sorted(entries))}) "
                "or the path of a local Hugging Face model folder (config.json + *.safetensors + tokenizer files)"
            )
        origin = {"kind": "local", "path": str(path.resolve())}
        if path.is_dir() and not checkpoint_files(path) and pickled_files(path) and convert_pickled:
            converted = converted_folder(path, cache_root())
            origin.update(converted_from_pickle=str(converted))
            path = converted
        loaded = _open_folder(path, Path(origin["path"]).name, origin)
    loaded.model.eval()
    return loaded


def load_model(name_or_path: str | os.PathLike) -> LoadedModel:
    """Load a zoo model by name, or a local Hugging Face folder, with its weights in memory (float32, eval mode)."""
    loaded = open_model(name_or_path)
    if loaded.files:
        folder = loaded.files[0].parent
        start = time.perf_counter()
        try:
            loaded.model = transformers.AutoModelForCausalLM.from_pretrained(
                folder, use_safetensors=True, local_files_only=True, trust_remote_code=False, dtype=torch.float32
            )
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"could not load a causal language model from {folder}: {exc}") from exc
        loaded.files, loaded.index = [], {}
        log.info("loaded %s from %s in %.1f s", loaded.name, folder, time.perf_counter() - start)
    return _finish(loaded)


def wrap_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None, name: str | None = None
) -> LoadedModel:
    """Wrap an already-loaded transformers model (cast to float32 and put in eval mode, in place).

    Without a tokenizer, one is read from the model's own local folder when it came from one; otherwise the
    tokenizer stays None and text-based calibration or evaluation needs one passed in later.
    """
    if not isinstance(model, PreTrainedModel):
        raise UserError(
            f"expected a transformers PreTrainedModel, got {type(model).__name__}; "
            "load it with transformers (e.g. AutoModelForCausalLM) or pass a zoo name or a local model folder"
        )
    source = _source_folder(model)
    if tokenizer is None:
        tokenizer = tokenizer_for(model)
    origin = {"kind": "object", "class": type(model).__name__, "name_or_path": source}
    return _finish(LoadedModel(model, tokenizer, name or source or type(model).__name__, origin))


def _source_folder(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "") or ""


def tokenizer_for(model: torch.nn.Module) -> PreTrainedTokenizerBase | None:
    """The tokenizer of a model loaded from a local folder (read from that folder), else None. No side effects."""
    source = _source_folder(model)
    if not source or not Path(source).is_dir():
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        log.warning("no tokenizer could be read from %s (%s); continuing without one", source, exc)
        return None


def cache_root() -> Path:
    """Where converted models are cached: ``$NEXUS_EXPORT_CACHE``, default ``~/.cache/nexus-export``."""
    return Path(os.environ.get("NEXUS_EXPORT_CACHE") or Path.home() / ".cache" / "nexus-export").expanduser()


def byte_level_tokenizer(model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per byte (ids 0-255 are the bytes) plus ``<|endoftext|>`` (id 256); no download.

    Byte-level BPE without merges: every UTF-8 byte of the text becomes one token, and decoding restores the text.
    """
    symbols = _byte_symbols()
    vocab = {symbols[b]: b for b in range(256)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([ENDOFTEXT])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        model_max_length=model_max_length,
        name_or_path="byte-level",
    )


# ---------------------------------------------------------------------------------------------------- kinds


def _finish(loaded: LoadedModel) -> LoadedModel:
    """Float32 and eval mode, whatever the source."""
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in loaded.model.parameters()):
        log.info("casting %s to float32", loaded.name)
        loaded.model.float()
    loaded.model.eval()
    return loaded


def _byte_symbols() -> list[str]:
    """The printable character that byte-level tokenizers use for each byte value 0-255.

    Bytes that are printable Latin-1 characters stand for themselves; the others are mapped, in order, to the
    characters from U+0100 on, so that no symbol is whitespace or a control character.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    symbols = []
    extra = 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(0x100 + extra))
            extra += 1
    assert set(symbols) == set(pre_tokenizers.ByteLevel.alphabet())
    return symbols


def _transformers_class(entry: dict[str, Any], key: str, base: type) -> type:
    """A class named in a zoo entry, looked up in transformers and checked against its expected base class."""
    cls = getattr(transformers, str(entry.get(key, "")), None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise UserError(
            f"zoo model {entry['name']!r}: {key} {entry.get(key)!r} is not a transformers {base.__name__}; "
            "fix nexus_export/models/" + entry["name"] + ".yaml"
        )
    return cls


def _build_random(entry: dict[str, Any]) -> LoadedModel:
    """A seeded random model from a transformers config; the global torch RNG is left as it was."""
    config_class = _transformers_class(entry, "config_class", transformers.PretrainedConfig)
    model_class = _transformers_class(entry, "model_class", PreTrainedModel)
    options = dict(entry.get("config") or {})
    defaults = config_class()
    unknown = sorted(key for key in options if not hasattr(defaults, key))
    if unknown:
        raise UserError(f"zoo model {entry['name']!r}: unknown {config_class.__name__} options {unknown}")
    tokenizer = byte_level_tokenizer(options.get("max_position_embeddings", 1024))
    token = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config = config_class(
        vocab_size=len(tokenizer), bos_token_id=token, eos_token_id=token, pad_token_id=token, **options
    )
    seed = int(entry.get("seed", 0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    origin = {"kind": "random", "zoo": entry["name"], "seed": seed, "config": config_class.__name__, **options}
    return LoadedModel(model, tokenizer, entry["name"], origin)


def _open_folder(folder: Path, name: str, origin: dict[str, Any]) -> LoadedModel:
    """A Hugging Face folder: the model built on the meta device from config.json, its shards indexed and checked,
    and its tokenizer; no network, no remote code, no pickles."""
    if not folder.is_dir():
        raise UserError(f"{folder} is a file; expected a Hugging Face model folder (config.json + *.safetensors)")
    if not (folder / "config.json").is_file():
        raise UserError(
            f"{folder} has no config.json, so it is not a Hugging Face model folder; save one with save_pretrained"
        )
    files = checkpoint_files(folder)
    if not files:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED)
        if pickled:
            raise UserError(f"{folder} has only pickled weights ({', '.join(pickled[:3])}), which are never unpickled "
                            f"as they are; add {FLAG} to convert them once to safetensors with PyTorch's weights-only "
                            "loader (no code runs)")
        raise UserError(f"{folder} has no weights; expected *.safetensors (or pytorch_model*.bin with {FLAG})")
    index = index_checkpoint(files)
    _refuse_or_note_custom_code(folder)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        with parameters_on_meta():
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                                  trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"could not build a causal language model from {folder / 'config.json'}: {exc}") from exc
    # every tensor the model needs, under the name transformers maps it from, with the shape the config implies
    index = {name: index[key] for name, key in check_checkpoint(model, index, folder).items()}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(
            f"could not load a tokenizer from {folder} ({exc}); save the tokenizer into the folder with save_pretrained"
        ) from exc
    generation = folder / "generation_config.json"
    if generation.is_file():
        try:
            model.generation_config = transformers.GenerationConfig.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError):
            log.warning("ignoring the unreadable %s", generation)
    return LoadedModel(model, tokenizer, name, origin, files=files, index=index)


def _refuse_or_note_custom_code(folder: Path) -> None:
    """A config that asks for custom code (auto_map) is never executed: one warning line says the model is built as
    the stock transformers class of its model_type; an unknown model_type is refused."""
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{folder / 'config.json'} is not valid JSON; re-save the model") from None
    model_type = data.get("model_type")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    known = model_type in CONFIG_MAPPING_NAMES
    if data.get("auto_map") or data.get("trust_remote_code"):
        if not known:
            raise UserError(f"{folder / 'config.json'} asks for custom code (auto_map) and its model_type "
                            f"{model_type!r} is not a transformers architecture; nexus-export never runs a model's own "
                            "code: use a model whose type transformers implements")
        log.warning("%s asks for custom code (auto_map); it is never run: the model is built as the stock "
                    "transformers class of its model_type %r", folder / "config.json", model_type)
    elif model_type is not None and not known:
        raise UserError(f"{folder / 'config.json'} has model_type {model_type!r}, which this transformers "
                        f"({transformers.__version__}) does not implement; use a supported architecture")


# ---------------------------------------------------------------------------------------------------- gguf


def _gguf_path(entry: dict[str, Any]) -> Path:
    """The GGUF file inside its installed package (found without importing the package)."""
    spec = importlib.util.find_spec(entry["package"])
    if spec is None or not spec.submodule_search_locations:
        commands = " && ".join(entry.get("install") or [f"pip install {entry['package']}"])
        raise UserError(f"zoo model {entry['name']!r} needs the package {entry['package']}: install it with {commands}")
    for location in spec.submodule_search_locations:
        path = Path(location) / entry["gguf_file"]
        if path.is_file():
            return path
    raise UserError(
        f"package {entry['package']} is installed but holds no {entry['gguf_file']}; "
        f"reinstall it with {' && '.join(entry.get('install') or [])}"
    )


def _gguf_cache(entry: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The safetensors cache folder of a GGUF model (converted now if missing or outdated) and its origin record."""
    gguf = _gguf_path(entry)
    cached = cache_root() / "models" / entry["name"]
    origin = _cached_origin(cached)
    from_cache = True
    if origin is None or origin.get("gguf_bytes") != gguf.stat().st_size:
        _convert_gguf(entry, gguf, cached)
        origin = _cached_origin(cached)
        from_cache = False
    return cached, {**origin, "cache": str(cached), "from_cache": from_cache}


def _cached_origin(cached: Path) -> dict[str, Any] | None:
    """The origin record of a complete cache folder, or None when there is no usable cache."""
    marker = cached / _ORIGIN_FILE
    if not (marker.is_file() and (cached / "config.json").is_file() and any(cached.glob("*.safetensors"))):
        return None
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _convert_gguf(entry: dict[str, Any], gguf: Path, cached: Path) -> None:
    """Dequantize a GGUF to float32 safetensors + tokenizer files, in a temporary folder renamed when complete."""
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise UserError(
                f"loading {entry['name']!r} from GGUF needs the package {module}: pip install gguf accelerate"
            )
    log.info("first load of %s: dequantizing %s (takes a while; cached afterwards)", entry["name"], gguf)
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = _without_quantization_marker(model)
    log.info("dequantized %s in %.1f s; writing the cache %s", entry["name"], time.perf_counter() - start, cached)
    origin = {
        "kind": "gguf",
        "zoo": entry["name"],
        "package": entry.get("distribution", entry["package"]),
        "package_version": _package_version(entry),
        "gguf_file": gguf.name,
        "gguf_bytes": gguf.stat().st_size,
        "gguf_sha256": sha256_file(gguf),
    }
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{cached.name}.partial-", dir=cached.parent))
    try:
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        (partial / _ORIGIN_FILE).write_text(json.dumps(origin, indent=2) + "\n", encoding="utf-8")
        if cached.exists():  # an incomplete or outdated cache
            shutil.rmtree(cached)
        os.rename(partial, cached)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("cached %s in %s (%.1f s in all)", entry["name"], cached, time.perf_counter() - start)


def _without_quantization_marker(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a plain model of the same class.

    transformers dequantizes GGUF tensors to ordinary float Linear/Embedding weights but still marks the model as
    GGUF-quantized, and refuses to save a model so marked; a fresh model built from the config without the mark
    can be saved.
    """
    config = copy.copy(model.config)  # the attribute below is deleted from this copy only
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.random.fork_rng(devices=[]):  # the throwaway initialization must not move the global RNG
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.tie_weights()
    return plain.to(torch.float32)


def _package_version(entry: dict[str, Any]) -> str | None:
    """The installed version of the package that ships a GGUF, when its metadata is there."""
    try:
        return importlib.metadata.version(entry.get("distribution", entry["package"]))
    except importlib.metadata.PackageNotFoundError:
        return None

