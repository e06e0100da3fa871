"""Exported ONNX graphs kept on disk, so that a graph torch's exporter produced once is not exported again by the
next process (the demo's second run, a sweep's next point under torchrun, the test suite's workers).

The export depends only on the program's graph, not on its weights' values (onnx_export.graph_key), and takes seconds
for a tiny model and tens of seconds for a 135M one, while reading the stored graph back takes a fraction of that.
An entry is the exporter's model with its weights left out: their initializers hold meta tensors (nothing to
store), so each is written as an external-data reference to nothing (its shape and dtype kept) and restored as a meta
tensor on reading. The per-node metadata (stack traces, module paths), which lowering clears anyway, is left out too
(a tiny two-block model's entry: 53 kB without it). The key adds what the export's output depends on besides the
graph: torch's, onnxscript's and onnx_ir's versions and the source of the modules that run the export.

Folder: ``$NEXUS_EXPORT_GRAPH_CACHE``, default ``$NEXUS_EXPORT_CACHE/onnx-graphs``; the newest ``KEEP`` entries stay.
Entries are written to a temporary file and renamed into place, so concurrent processes never read half an entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxscript
import torch
from onnx_ir.passes import common

from nexus_export.models.zoo import cache_root

log = logging.getLogger(__name__)

KEEP = 64  # entries (graphs only, no weights)
META_KEY = "nexus_export.meta_initializers"  # JSON {name: torch dtype} of the initializers stored without data
PLACEHOLDER = "no-data"  # their external-data location: kept shape and dtype, nothing to read


def folder() -> Path:
    """Where entries live: ``$NEXUS_EXPORT_GRAPH_CACHE``, default ``$NEXUS_EXPORT_CACHE/onnx-graphs``."""
    env = os.environ.get("NEXUS_EXPORT_GRAPH_CACHE")
    return Path(env).expanduser() if env else cache_root() / "onnx-graphs"


def entry_key(graph_key: str, exporter_sources: list[Path]) -> str:
    """``graph_key`` with the versions and the exporting modules' sources that the exported graph depends on."""
    digest = hashlib.sha256()
    for part in (graph_key, torch.__version__, onnxscript.__version__, ir.__version__):
        digest.update(part.encode())
    for source in exporter_sources:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:40]


def load(key: str) -> ir.Model | None:
    """The stored graph of ``key`` with its meta initializers restored, or None (missing or unreadable)."""
    path = folder() / f"{key}.onnx"
    try:
        proto = onnx.load(str(path), load_external_data=False)
        model = ir.serde.deserialize_model(proto)
        meta = json.loads(model.metadata_props.pop(META_KEY, "{}"))
    except FileNotFoundError:
        return None
    except Exception as exc:  # a corrupt entry is exported again, never fatal
        log.warning("onnx graph cache: %s unreadable (%s); exporting again", path, exc)
        return None
    for name, dtype in meta.items():
        value = model.graph.initializers[name]
        shape = [int(d) for d in value.shape]
        value.const_value = ir.tensor_adapters.TorchTensor(
            torch.empty(shape, dtype=getattr(torch, dtype), device="meta"), name=name)
    try:
        os.utime(path)  # recently used: kept when older entries go
    except OSError:  # another process trimmed it meanwhile: the graph read is still good
        pass
    return model


def save(key: str, model: ir.Model) -> None:
    """Store ``model`` (not changed) under ``key``; a failure to write is logged, never fatal."""
    meta = {}
    stored = model.clone()
    for name, value in stored.graph.initializers.items():
        raw = getattr(value.const_value, "raw", None)  # the exporter's TorchTensor wraps the parameter
        if isinstance(raw, torch.Tensor) and raw.device.type == "meta":
            meta[name] = str(raw.dtype).removeprefix("torch.")
            value.const_value = ir.ExternalTensor(PLACEHOLDER, 0, 0, value.dtype, shape=value.shape, name=name)
    stored.metadata_props[META_KEY] = json.dumps(meta)
    common.ClearMetadataAndDocStringPass()(stored)
    target = folder()
    partial = None
    try:
        target.mkdir(parents=True, exist_ok=True)
        proto = ir.serde.serialize_model(stored)
        with tempfile.NamedTemporaryFile(dir=target, suffix=".partial", delete=False) as f:
            partial = Path(f.name)
            f.write(proto.SerializeToString())
        os.replace(partial, target / f"{key}.onnx")
    except Exception as exc:  # a cache that cannot be written costs the next run an export, never this run
        log.warning("onnx graph cache: cannot store an entry in %s (%s)", target, exc)
        if partial is not None:
            partial.unlink(missing_ok=True)
        return
    _trim(target)


def _trim(target: Path) -> None:
    """Keep the newest ``KEEP`` entries; other processes may be trimming or writing the same folder meanwhile."""
    dated = []
    for entry in target.glob("*.onnx"):
        try:
            dated.append((entry.stat().st_mtime, entry))
        except OSError:  # removed by another process between the listing and the stat
            continue
    dated.sort(reverse=True)
    for _, old in dated[KEEP:]:
        old.unlink(missing_ok=True)
