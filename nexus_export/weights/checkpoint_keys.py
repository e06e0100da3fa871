"""Which checkpoint tensor each parameter of a model reads, and whether the checkpoint fits the model its config builds.

Checkpoints keep the tensor names they were saved under: transformers renames some of them when it loads (GPT-NeoX's
head is stored as ``embed_out.weight`` and becomes ``lm_head.weight``), and ``save_pretrained`` writes them back
under the old names. ``parameter_keys`` applies the mapping transformers itself declares for the class being built
(``get_model_conversion_mapping``: its renamings, then the base-model prefix added or stripped), never a table of
our own; a conversion that merges or splits tensors (stacked experts) is refused by name. ``check_checkpoint``
then compares every tensor the model needs with the shard headers, shape and kind of dtype, before any work: a
config that disagrees with its weights is named with both shapes and the config values behind the expected one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from nexus_export.errors import UserError
from nexus_export.weights.shards import TensorLocation

log = logging.getLogger(__name__)


def _conversions(model: torch.nn.Module) -> tuple[list, list]:
    """transformers' renamings and converters for ``model`` ([] where this transformers has none)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # an older transformers: keys are the model's own names
        return [], []
    transforms = get_model_conversion_mapping(model)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def renamed_keys(model: torch.nn.Module, keys: list[str]) -> dict[str, str]:
    """checkpoint key -> the model key transformers loads it as (keys no transform touches map to themselves)."""
    renamings, converters = _conversions(model)
    if not renamings and not converters:
        return {key: key for key in keys}
    from transformers.core_model_loading import rename_source_key

    state = dict(model.state_dict(keep_vars=True))
    prefix = getattr(model, "base_model_prefix", None)
    out = {}
    for key in keys:
        new, converter = rename_source_key(key, renamings, converters, prefix, state)
        if converter is not None:
            raise UserError(f"the checkpoint's tensor {key!r} is converted by transformers into {new!r} together with "
                            f"other tensors ({converter}); nexus-export reads tensors one by one and cannot build it: "
                            "load the model with transformers and save_pretrained it once more")
        out[key] = new
    return out


def parameter_keys(model: torch.nn.Module, index: dict[str, TensorLocation]) -> dict[str, str]:
    """Every parameter and persistent buffer name of ``model`` (tied names included) -> the checkpoint key it reads,
    for those the checkpoint holds; the base-model prefix may be present on one side only."""
    by_model_key: dict[str, str] = {}
    for key, new in renamed_keys(model, list(index)).items():
        by_model_key.setdefault(new, key)
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in model.named_buffers(remove_duplicate=False)]
    out = {}
    for name in names:
        other = name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else f"{prefix}.{name}"
        for candidate in (name, other):
            if candidate in by_model_key:
                out[name] = by_model_key[candidate]
                break
    return out


def check_checkpoint(model: torch.nn.Module, index: dict[str, TensorLocation], folder: Path) -> dict[str, str]:
    """``parameter_keys`` after checking that every parameter (or a tied twin) is in the checkpoint with the shape
    the config implies and a floating dtype where the parameter is floating; the first mismatch is a UserError naming
    the tensor, both shapes and the config values behind the expected one. Buffers the config computes (rotary
    frequencies) may be absent."""
    keys = parameter_keys(model, index)
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    missing = []
    for names in by_id.values():
        found = next((n for n in names if n in keys), None)
        if found is None:
            missing.append(names[0])
            continue
        for name in names:
            keys.setdefault(name, keys[found])
    if missing:
        raise UserError(f"the weights in {folder} lack {len(missing)} tensor(s) the model needs "
                        f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}), even under the names "
                        "transformers maps them from; the checkpoint does not match its config.json or a shard is "
                        "missing")
    params = dict(model.named_parameters(remove_duplicate=False))
    config = _config_values(folder)
    for name, p in params.items():
        loc = index[keys[name]]
        if tuple(loc.shape) != tuple(p.shape):
            raise UserError(f"{folder}: tensor {loc.key} has shape {list(loc.shape)} but config.json implies "
                            f"{list(p.shape)} for {name}{_behind(p.shape, config)}; the config does not match its "
                            "weights: fix config.json or use the weights it was saved with")
        if p.is_floating_point() and not loc.dtype.is_floating_point:
            raise UserError(f"{folder}: tensor {loc.key} is {loc.dtype} but {name} is a floating-point weight; the "
                            "checkpoint is not the one this config.json describes")
    return keys


def _config_values(folder: Path) -> dict[str, int]:
    """The whole-number settings of config.json (and its text config), by key."""
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    values = {}
    for section in (data, data.get("text_config") or {}):
        if isinstance(section, dict):
            values.update({k: v for k, v in section.items() if isinstance(v, int) and not isinstance(v, bool)})
    return values


def _behind(shape: Any, config: dict[str, int]) -> str:
    """`` (hidden_size=576, intermediate_size=1536 in config.json)``: the settings equal to a dim of ``shape``."""
    dims = set(int(d) for d in shape)
    named = [f"{k}={v}" for k, v in config.items() if v in dims and v > 1]
    return f" ({', '.join(named[:4])} in config.json)" if named else ""
