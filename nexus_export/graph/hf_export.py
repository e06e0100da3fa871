"""Write a program back out as a Hugging Face folder (config + safetensors shards + tokenizer) that transformers loads.

Possible for passes that keep the architecture (masking, block removal): the config is the program's own (with the
new layer count), the weights come from the store, shard by shard (at most ``SHARD_BYTES`` in memory), under the
names transformers expects (a tied embedding under the embedding's name). When the model fits the memory budget the
folder is checked by loading it back with transformers and comparing logits.
Not possible after removing attention sublayers or changing widths: transformers has no such architecture.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from nexus_export.errors import UserError
from nexus_export.graph.program import Program
from nexus_export.naming import WRAPPER_PREFIX
from nexus_export.outdir import file_mode

log = logging.getLogger(__name__)

SHARD_BYTES = 2 * 2**30
def hf_names(program: Program) -> dict[str, str]:
    """Program parameter name -> the key transformers expects in the checkpoint."""
    _check(program)
    structure = program.structure
    names = {}
    for param in program.weight_names():
        names[param] = param[len(WRAPPER_PREFIX):] if param.startswith(WRAPPER_PREFIX) else param
    if structure.tied_embedding:
        for module, param in structure.embeddings.items():
            if structure.lm_head and param == structure.linears[structure.lm_head].weight:
                names[param] = module + ".weight"  # transformers ties the head to the embedding
    return names


def save_hf(program: Program, folder: str | Path, dtype: torch.dtype | None = None, check: bool = True,
            check_tokens: int = 16) -> float | None:
    """Save ``program`` as a Hugging Face model folder (weights in ``dtype``, else as stored); return the max |logits
    diff| of the reloaded model, or None when ``check`` is off (a model larger than the memory budget)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = hf_names(program)
    shards: list[dict[str, str]] = [{}]
    size = 0
    for param in names:
        nbytes = program.store.nbytes(param, dtype)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][param] = names[param]
        size += nbytes
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))] \
        if len(shards) > 1 else ["model.safetensors"]
    weight_map, total = {}, 0
    for shard, filename in zip(shards, files):
        tensors = {key: program.parameter(param, dtype).contiguous() for param, key in shard.items()}
        save_file(tensors, str(folder / filename), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({key: filename for key in tensors})
        del tensors
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    stored = dtype or program.main_dtype()
    config = program.config
    previous = getattr(config, "dtype", None)
    config.dtype = str(stored).removeprefix("torch.")  # transformers' name: float32, float16, bfloat16
    try:
        config.save_pretrained(folder)
    finally:
        config.dtype = previous
    if program.tokenizer is not None:
        program.tokenizer.save_pretrained(folder)
    mode = file_mode()
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, mode)
    if not check:
        log.info("wrote Hugging Face folder %s (%d shard(s)); not reloaded: larger than the memory budget", folder,
                 len(files))
        return None
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                                                 trust_remote_code=False, dtype=torch.float32).eval()
    vocab = int(getattr(program.config, "vocab_size", 2))
    ids = torch.randint(0, vocab, (1, check_tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((reloaded(input_ids=ids).logits - program.logits(ids)).abs().max())
    log.info("wrote Hugging Face folder %s (reloaded logits differ by %.2e)", folder, diff)
    return diff


def to_hf_model(program: Program) -> transformers.PreTrainedModel:
    """A transformers model built from the program's config and holding copies of the program's weights."""
    names = hf_names(program)
    model = transformers.AutoModelForCausalLM.from_config(program.config)
    state = {key: program.parameter(param) for param, key in names.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not _tied(model, m)]
    if missing or unexpected:
        raise UserError(f"the program's weights do not fit a {type(model).__name__} built from its config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]}); the architecture changed")
    model.tie_weights()
    return model.eval()


def _check(program: Program) -> None:
    if program.config is None:
        raise UserError("this program has no Hugging Face config (it was not captured from a transformers model); "
                        "a Hugging Face folder cannot be written")
    gone = [kind for kind in ("attention", "mlp") if program.origin.get(f"{kind}_removed")]
    if gone:
        raise UserError(f"{' and '.join(gone)} sublayers were removed from some blocks; transformers has no such "
                        "architecture, so --save-hf is not possible (the ONNX model is still written)")
    if program.origin.get("sliced_widths"):
        raise UserError("a sliced model (slicegpt) has shortcut matrices and per-block widths that no transformers "
                        "class holds, so --save-hf is not possible (the ONNX model is still written)")


def _tied(model: torch.nn.Module, name: str) -> bool:
    """A missing key that tie_weights fills (the lm_head of a tied model)."""
    return bool(getattr(model.config, "tie_word_embeddings", False)) and name.endswith("lm_head.weight")
