"""Safetensors shards on disk: their headers, a check of every shard before work starts, one tensor read by offset.

A safetensors file is an 8-byte little-endian header length, a JSON header (per tensor: dtype, shape and the byte
range of its data) and the data. Reading one tensor is one ``readinto`` of its byte range into a fresh buffer: no
memory map, so the resident memory of a run is what it holds, not the file pages it once touched. Files are written
with the safetensors library; this module only reads.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from nexus_export.errors import UserError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes lie: file, byte range (absolute), dtype and shape."""

    path: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str | Path) -> dict[str, TensorLocation]:
    """Every tensor of one shard by key; a missing, truncated or malformed file is a UserError naming it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise UserError(f"{path} is not a safetensors file (only {len(head)} bytes); re-save or re-download it")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER or 8 + length > size:
                raise UserError(f"{path} is not a valid safetensors file (header of {length} bytes in a file of {size}); "
                                "it is truncated or corrupt: re-save or re-download it")
            raw = fh.read(length)
    except OSError as exc:
        raise UserError(f"cannot read the weights file {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"{path} is not a valid safetensors file (unreadable header); re-save or re-download it") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a valid safetensors file (header is not a mapping)")
    base = 8 + length
    out: dict[str, TensorLocation] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: tensor {key!r} has an unreadable entry in the header "
                            f"({str(info)[:80]}); the file is corrupt or uses an unsupported dtype") from None
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - start != expected or start < 0:
            raise UserError(f"{path}: tensor {key!r} claims {end - start} bytes but its shape {list(shape)} needs "
                            f"{expected}; the file is corrupt")
        if base + end > size:
            raise UserError(f"{path} is truncated: tensor {key!r} ends at byte {base + end} but the file has {size} "
                            "bytes; re-save or re-download it")
        out[key] = TensorLocation(path, key, dtype, shape, base + start, base + end)
    return out


CONVERT_CHUNK_BYTES = 16 * 2**20  # read at a time when a tensor is converted while it is read


def read_tensor(loc: TensorLocation, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor at ``loc``, read into its own memory; with ``dtype`` (a floating tensor converted) it is read in
    chunks of CONVERT_CHUNK_BYTES, each converted into the result, so a bf16 tensor read as float32 never has its
    bf16 copy in memory beside the float32 one (0.75 GiB for the embedding of a 128k-vocabulary 3B model)."""
    if dtype is None or dtype == loc.dtype or not loc.dtype.is_floating_point or loc.nbytes <= CONVERT_CHUNK_BYTES:
        tensor = _read_bytes(loc, loc.start, loc.nbytes).view(loc.dtype).reshape(loc.shape) if loc.nbytes else \
            torch.empty(loc.shape, dtype=loc.dtype)
        return tensor if dtype is None or not loc.dtype.is_floating_point else tensor.to(dtype)
    out = torch.empty(loc.shape, dtype=dtype)
    flat = out.view(-1)
    size = torch.empty((), dtype=loc.dtype).element_size()
    step = CONVERT_CHUNK_BYTES // size
    for first in range(0, flat.numel(), step):
        count = min(step, flat.numel() - first)
        flat[first:first + count] = _read_bytes(loc, loc.start + first * size, count * size).view(loc.dtype)
    return out


def _read_bytes(loc: TensorLocation, start: int, nbytes: int) -> torch.Tensor:
    """``nbytes`` of ``loc``'s file from ``start`` (absolute), as uint8; a short read names the truncated file."""
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    try:
        with open(loc.path, "rb") as fh:
            fh.seek(start)
            got = fh.readinto(memoryview(buffer.numpy()))
    except OSError as exc:
        raise UserError(f"cannot read tensor {loc.key!r} from {loc.path}: {exc.strerror or exc}") from None
    if got != nbytes:
        raise UserError(f"{loc.path} is truncated: tensor {loc.key!r} needs {loc.nbytes} bytes, read "
                        f"{got + start - loc.start}")
    return buffer


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors shards of a Hugging Face folder: those its index names (each must exist), or every
    ``*.safetensors`` when there is no index."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{index} is not a valid safetensors index (no weight_map); re-save the model") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise UserError(f"{folder} is missing weight shard(s) {', '.join(missing)} named in {index.name}; "
                            "copy or download them again")
        return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors"))


def index_checkpoint(files: list[Path]) -> dict[str, TensorLocation]:
    """Every tensor of every shard by key (headers read and checked); a key in two shards is an error."""
    out: dict[str, TensorLocation] = {}
    for path in files:
        for key, loc in read_header(path).items():
            if key in out:
                raise UserError(f"tensor {key!r} appears in both {out[key].path.name} and {path.name}; "
                                "the checkpoint is inconsistent")
            out[key] = loc
    return out
