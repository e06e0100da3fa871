"""Checkpoints that ship only pickled ``pytorch_model*.bin`` files, converted once to safetensors by explicit opt-in.

Unpickling runs whatever code a file names, so such a folder is refused unless the user asks for the conversion
(``--convert-pickled``). The conversion reads each file with PyTorch's restricted loader (``weights_only=True``:
tensors and plain containers only, no code runs), writes the tensors as safetensors shards into the cache
(``$NEXUS_EXPORT_CACHE/converted/<folder fingerprint>``) beside copies of the folder's config and tokenizer files,
and is announced on stderr; a later run on the same, unchanged folder reads the converted copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from nexus_export.errors import UserError

log = logging.getLogger(__name__)

PICKLED = (".bin", ".pt", ".pth", ".ckpt")
MARKER = "nexus-converted.json"
FLAG = "--convert-pickled"


def pickled_files(folder: Path) -> list[Path]:
    """The pickled weight files of a folder: those its ``pytorch_model.bin.index.json`` names, else every
    ``pytorch_model*.bin``."""
    index = folder / "pytorch_model.bin.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{index} is not a valid index (no weight_map); re-save the model") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise UserError(f"{folder} is missing weight file(s) {', '.join(missing)} named in {index.name}")
        return [folder / n for n in names]
    return sorted(folder.glob("pytorch_model*.bin"))


def fingerprint(files: list[Path]) -> str:
    """The identity of the source files (names, sizes, modification times)."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:24]


def converted_folder(folder: Path, cache: Path) -> Path:
    """A safetensors copy of ``folder`` (pickled weights only) in ``cache``: made now, or the one an earlier run made
    from the same files."""
    files = pickled_files(folder)
    if not files:
        raise UserError(f"{folder} has no safetensors and no pytorch_model*.bin weights to convert")
    target = cache / "converted" / fingerprint(files)
    if (target / MARKER).is_file():
        log.info("reading %s: the safetensors copy of %s made earlier with %s", target, folder, FLAG)
        return target
    log.warning("%s: converting %d pickled weight file(s) to safetensors with PyTorch's weights-only loader (no "
                "code runs), once, into %s", folder, len(files), target)
    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        _convert(files, partial)
        for path in folder.iterdir():  # config, tokenizer, generation config: everything but weights
            if path.is_file() and path.suffix not in PICKLED and path.name != "pytorch_model.bin.index.json":
                shutil.copy2(path, partial / path.name)
        (partial / MARKER).write_text(json.dumps({"source": str(folder.resolve()), "files": [p.name for p in files],
                                                  "converted": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.rename(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.warning("converted %s in %.1f s", folder, time.perf_counter() - start)
    return target


def _convert(files: list[Path], out: Path) -> None:
    from safetensors.torch import save_file

    names = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))] \
        if len(files) > 1 else ["model.safetensors"]
    weight_map = {}
    for path, name in zip(files, names):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # the restricted unpickler's refusal names what it would not load
            raise UserError(f"{path} cannot be read with PyTorch's weights-only loader ({str(exc).splitlines()[0]}); "
                            "it holds more than tensors, and nexus-export never runs the full unpickler") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UserError(f"{path} is not a state dict of tensors; nexus-export cannot convert it")
        seen: dict[int, str] = {}
        tensors = {}
        for key, value in state.items():  # safetensors stores no shared memory: a tied tensor is stored once
            ptr = value.untyped_storage().data_ptr()
            if ptr in seen and value.data_ptr() == state[seen[ptr]].data_ptr():
                continue
            seen.setdefault(ptr, key)
            tensors[key] = value.contiguous()
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        del state, tensors
    if len(names) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
