"""Write a program back out as a Hugging Face folder (config + safetensors + tokenizer) that transformers loads.

Possible for passes that keep the architecture (masking, block removal): the config is the program's own (with the
new layer count), the weights are the program's. The folder is checked by loading it back and comparing logits.
Not possible after removing attention sublayers or changing widths: transformers has no such architecture.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import transformers

from .errors import UserError
from .naming import WRAPPER_PREFIX
from .program import Program

log = logging.getLogger(__name__)


def save_hf(program: Program, folder: str | Path, check_tokens: int = 16) -> float:
    """Save ``program`` as a Hugging Face model folder; return the max |logits diff| of the reloaded model."""
    folder = Path(folder)
    model = to_hf_model(program)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    if program.tokenizer is not None:
        program.tokenizer.save_pretrained(folder)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                                                 trust_remote_code=False).eval()
    vocab = int(getattr(program.config, "vocab_size", 2))
    ids = torch.randint(0, vocab, (1, check_tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((reloaded(input_ids=ids).logits - program.logits(ids)).abs().max())
    log.info("wrote Hugging Face folder %s (reloaded logits differ by %.2e)", folder, diff)
    return diff


def to_hf_model(program: Program) -> transformers.PreTrainedModel:
    """A transformers model built from the program's config and holding copies of the program's weights."""
    if program.config is None:
        raise UserError("this program has no Hugging Face config (it was not captured from a transformers model); "
                        "a Hugging Face folder cannot be written")
    if program.origin.get("attention_removed"):
        raise UserError("attention sublayers were removed from some blocks; transformers has no such architecture, "
                        "so --save-hf is not possible (the ONNX model is still written)")
    state = {name[len(WRAPPER_PREFIX):]: tensor.detach() for name, tensor in program.exported.state_dict.items()
             if name.startswith(WRAPPER_PREFIX)}
    model = transformers.AutoModelForCausalLM.from_config(program.config)
    _fill_tied(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not _tied(model, m)]
    if missing or unexpected:
        raise UserError(f"the program's weights do not fit a {type(model).__name__} built from its config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]}); the architecture changed")
    model.tie_weights()
    return model.eval()


def _fill_tied(model: torch.nn.Module, state: dict) -> None:
    """A tied model's capture keeps one name for the shared matrix (often the head's); give the embedding its copy."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    embedding = model.get_input_embeddings().weight
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is embedding]
    present = [n for n in names if n in state]
    if present:
        for n in names:
            state.setdefault(n, state[present[0]])


def _tied(model: torch.nn.Module, name: str) -> bool:
    """A missing key that tie_weights fills (the lm_head of a tied model)."""
    return bool(getattr(model.config, "tie_word_embeddings", False)) and name.endswith("lm_head.weight")
