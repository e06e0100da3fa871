"""A cache of dense perplexities, so that a second run on the same model and windows does not evaluate it again.

The key is (the model, the evaluation protocol): every weight's identity (its place in the checkpoint and the file's
size and modification time; the whole content's hash for weights held in memory), the captured graph's code (a
config change such as a rope or norm setting changes it), the exact token windows (source, count, length and BOS are
all in them), what the caller adds (runtime, batch size, tasks), the compute dtype, the device type, and the versions
of torch, transformers and nexus-export. Entries are small JSON files under
``$NEXUS_EXPORT_EVAL_CACHE`` (default ``$NEXUS_EXPORT_CACHE/evaluations``), written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
import transformers

from . import __version__
from .program import COMPUTE_DTYPE, Program
from .zoo import cache_root

log = logging.getLogger(__name__)

PROTOCOL = 1  # bump when the way perplexity is computed changes: older entries are then never read


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


def load(entry: str) -> dict | None:
    """The cached result for ``entry`` ({"perplexity", "tokens", ...}), or None."""
    path = cache_folder() / f"{entry}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def save(entry: str, result: dict) -> None:
    """Keep ``result`` for ``entry``; a cache that cannot be written is a warning, never a failed run."""
    folder = cache_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{entry}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(result))
        tmp.replace(folder / f"{entry}.json")
    except OSError as exc:
        log.warning("could not write the evaluation cache in %s (%s); the next run evaluates again", folder, exc)
