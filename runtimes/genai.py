"""onnxruntime-genai: the folder it loads as it is, and generation through it.

A folder onnxruntime-genai loads holds ``genai_config.json`` beside the key/value-cache ONNX model and the tokenizer
files (``tokenizer.json``, ``tokenizer_config.json``). ``write_config`` writes that config from the cache model's own
inputs (layers, key/value heads, head size: what remains after pruning) and the model's Hugging Face config
(query heads, width, vocabulary, context) and tokens (BOS, EOS, padding). The model type is ``decoder``, the generic
decoder-only type: our graph has no runtime-specific operators, and the past and present names are given in full.
``GenaiDecoder`` runs such a folder one token at a time, with the same interface as the onnxruntime decoder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx

from nexus_export.errors import UserError

log = logging.getLogger(__name__)

CONFIG = "genai_config.json"
EXTRA = "pip install 'nexus-export[genai]' (onnxruntime-genai)"


def available() -> tuple[bool, str]:
    """Whether onnxruntime-genai can be imported here, and its version or what is missing."""
    try:
        import onnxruntime_genai
    except ImportError as error:
        return False, f"onnxruntime-genai is not installed ({error}); {EXTRA}"
    return True, f"onnxruntime-genai {getattr(onnxruntime_genai, '__version__', '?')}"


def require() -> Any:
    """The onnxruntime_genai module, or a UserError naming the extra that brings it."""
    ok, why = available()
    if not ok:
        raise UserError(f"--runtime genai needs onnxruntime-genai: {why}")
    import onnxruntime_genai

    return onnxruntime_genai


def cache_facts(model_path: Path) -> dict:
    """Layers, key/value heads and head size of a key/value-cache ONNX model, read from its past inputs."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    pasts = [value for value in graph.input if value.name.startswith("past_key_values.") and
             value.name.endswith(".key")]
    if not pasts:
        raise UserError(f"{model_path} has no past_key_values inputs: it is not a key/value-cache model")
    dims = [d.dim_value for d in pasts[0].type.tensor_type.shape.dim]
    return {"layers": len(pasts), "kv_heads": dims[1], "head_size": dims[3],
            "positions": any(value.name == "position_ids" for value in graph.input)}


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def write_config(folder: Path, model_file: str, hf_config: Any, tokenizer: Any, generation: Any = None) -> Path:
    """Write ``folder/genai_config.json`` for the cache model ``model_file`` in ``folder``."""
    facts = cache_facts(folder / model_file)
    text = hf_config.get_text_config(decoder=True) if hasattr(hf_config, "get_text_config") else hf_config
    heads = int(getattr(text, "num_attention_heads", 0) or facts["kv_heads"])
    context = int(getattr(text, "max_position_embeddings", 0) or getattr(text, "n_positions", 0)
                  or getattr(tokenizer, "model_max_length", 0) or 2048)
    eos = _token_ids(getattr(generation, "eos_token_id", None)) or _token_ids(getattr(text, "eos_token_id", None)) \
        or _token_ids(getattr(tokenizer, "eos_token_id", None))
    bos = _token_ids(getattr(tokenizer, "bos_token_id", None)) or _token_ids(getattr(text, "bos_token_id", None))
    pad = _token_ids(getattr(tokenizer, "pad_token_id", None)) or _token_ids(getattr(text, "pad_token_id", None)) \
        or eos[:1]
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    if facts["positions"]:
        inputs["position_ids"] = "position_ids"
    config = {
        "model": {
            "type": "decoder",
            "bos_token_id": bos[0] if bos else (eos[0] if eos else 0),
            "eos_token_id": eos if len(eos) > 1 else (eos[0] if eos else 0),
            "pad_token_id": pad[0] if pad else 0,
            "context_length": context,
            "vocab_size": int(getattr(text, "vocab_size", 0)),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": facts["head_size"],
                "hidden_size": int(getattr(text, "hidden_size", 0) or heads * facts["head_size"]),
                "num_attention_heads": heads,
                "num_hidden_layers": facts["layers"],
                "num_key_value_heads": facts["kv_heads"],
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 50, "top_p": 1.0},
    }
    path = folder / CONFIG
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


class GenaiDecoder:
    """One sequence through onnxruntime-genai (a folder with genai_config.json), one token per step. The search
    itself stays ours (greedy or sampled in runtimes/generation.py): each step reads genai's logits."""

    def __init__(self, folder: Path, max_length: int):
        og = require()
        if not (Path(folder) / CONFIG).is_file():
            raise UserError(f"{folder} has no {CONFIG}: it was written before generation support, or with "
                            "--lower logits; run the pruning again (the default --lower both writes it)")
        try:
            self.model = og.Model(str(folder))
        except Exception as exc:  # genai raises its own RuntimeError for folders it cannot load
            raise UserError(f"onnxruntime-genai cannot load {folder}: {str(exc).splitlines()[0][:300]}") from None
        self.og = og
        self.max_length = max_length
        self.generator = None

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length, do_sample=False)
        self.generator = self.og.Generator(self.model, params)
        self.generator.append_tokens(list(ids))
        return self._last()

    def step(self, token: int) -> np.ndarray:
        self.generator.append_tokens([int(token)])
        return self._last()

    def _last(self) -> np.ndarray:
        return np.asarray(self.generator.get_logits())[0, -1]


class GenaiRuntime:
    """onnxruntime-genai as a generation runtime (registered as ``genai``): a folder with genai_config.json in, a
    decoder out."""

    name = "genai"

    @staticmethod
    def available() -> tuple[bool, str]:
        return available()

    @staticmethod
    def require() -> None:
        require()

    @staticmethod
    def decoder(folder: Path, context: int | None = None) -> GenaiDecoder:
        return GenaiDecoder(Path(folder), context or 4096)
