"""A cache of dense perplexities, so that a second run on the same model and windows does not evaluate it again.

The key is (the model, the evaluation protocol): every weight's identity (its place in the checkpoint and the file's
size and modification time; the whole content's hash for weights held in memory), the captured graph's code (a
config change such as a rope or norm setting changes it), the exact token windows (source, count, length and BOS are
all in them), what the caller adds (runtime, batch size, tasks), the compute dtype, the device type, and the versions
of torch, transformers and nexus-export. Entries are small JSON files under
``$NEXUS_EXPORT_EVAL_CACHE`` (default ``$NEXUS_EXPORT_CACHE/evaluations``), written atomically.

Each entry proves itself: it records the key it was measured under and a sha256 of its content (the key and the
result, as canonical JSON). An entry whose key or checksum does not match (edited numbers, a file copied under
another name, garbage) is ignored with one warning line and the value measured again; the caller says so in its
report (``Lookup.rejected``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from nexus_export import __version__
from nexus_export.graph.capture import COMPUTE_DTYPE
from nexus_export.graph.program import Program
from nexus_export.models.zoo import cache_root

log = logging.getLogger(__name__)

PROTOCOL = 2  # bump when the way perplexity is computed changes: older entries are then never read


def cache_folder() -> Path:
    """Where entries live: ``$NEXUS_EXPORT_EVAL_CACHE``, default ``$NEXUS_EXPORT_CACHE/evaluations``."""
    env = os.environ.get("NEXUS_EXPORT_EVAL_CACHE")
    return Path(env).expanduser() if env else cache_root() / "evaluations"


def weights_fingerprint(program: Program) -> str:
    """The identity of every weight the program holds, in one hash."""
    digest = hashlib.sha256()
    for name in sorted(program.store.names()):
        digest.update(f"{name}={program.store.identity(name, exact=True)};".encode())
    return digest.hexdigest()


def key(program: Program, parts: list, device: str, windows: torch.Tensor | None = None) -> str:
    """The cache key of one dense evaluation: ``parts`` (JSON-able: the runtime and its settings), on ``windows`` if
    the evaluation reads them."""
    digest = hashlib.sha256()
    protocol = [PROTOCOL, parts, str(COMPUTE_DTYPE), torch.device(device).type, torch.__version__,
                transformers.__version__, __version__]
    digest.update(json.dumps(protocol, default=str).encode())
    digest.update(program.exported.graph_module.code.encode())
    if windows is not None:
        digest.update(json.dumps(list(windows.shape)).encode())
        digest.update(windows.numpy().tobytes())
    digest.update(weights_fingerprint(program).encode())
    return digest.hexdigest()[:40]


@dataclass(frozen=True)
class Lookup:
    """What the cache holds for a key: the result, or None; ``rejected`` says why an entry that was there is not used."""

    result: dict | None
    rejected: str | None = None


def _checksum(entry: str, result: dict) -> str:
    return hashlib.sha256(json.dumps({"key": entry, "result": result}, sort_keys=True).encode()).hexdigest()


def load(entry: str) -> Lookup:
    """The cached result for ``entry`` ({"perplexity", "tokens", ...}) if an entry for it is there and proves itself."""
    path = cache_folder() / f"{entry}.json"
    try:
        text = path.read_text()
    except OSError:
        return Lookup(None)
    try:
        data = json.loads(text)
        valid = isinstance(data, dict) and isinstance(data.get("result"), dict)
        why = None if valid else "not an entry of this version"
        if valid and data.get("key") != entry:
            why = f"it was measured under another key ({str(data.get('key'))[:12]}...)"
        elif valid and data.get("sha256") != _checksum(entry, data["result"]):
            why = "its content does not match its checksum (changed after it was written)"
    except ValueError:
        why = "it is not valid JSON"
    if why is not None:
        log.warning("evaluation cache entry %s is ignored: %s; measuring again", path, why)
        return Lookup(None, why)
    return Lookup(data["result"])


def save(entry: str, result: dict) -> None:
    """Keep ``result`` for ``entry`` with its key and checksum; a cache that cannot be written is a warning, never a
    failed run."""
    folder = cache_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{entry}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"key": entry, "sha256": _checksum(entry, result), "result": result}))
        tmp.replace(folder / f"{entry}.json")
    except OSError as exc:
        log.warning("could not write the evaluation cache in %s (%s); the next run evaluates again", folder, exc)
