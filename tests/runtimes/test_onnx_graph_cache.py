"""The exported-graph cache on disk: a graph read back lowers to the same files as one exported afresh."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict

import onnx
import pytest
import torch
from conftest import tiny_program

import runtimes.onnx_export as onnx_export
from runtimes import onnx_graph_cache


def _files(folder):
    return {name: (folder / name).read_bytes() for name in ("model.onnx", "model.kv.onnx", "model.onnx.data")}


@pytest.mark.slow
def test_a_stored_graph_lowers_to_the_files_a_fresh_export_writes(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NEXUS_EXPORT_GRAPH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(onnx_export, "_EXPORTS", OrderedDict())  # as in a new process
    fresh = onnx_export.lower_to_onnx(tiny_program("llama"), tmp_path / "fresh" / "model.onnx", dtype=torch.float16)
    entries = sorted((tmp_path / "cache").iterdir())
    assert len(entries) == 2 and all(p.suffix == ".onnx" for p in entries)  # the cache model and the full one
    assert max(p.stat().st_size for p in entries) < 1_000_000  # graphs only: the weights are not in an entry

    monkeypatch.setattr(onnx_export, "_EXPORTS", OrderedDict())  # the next process
    with caplog.at_level(logging.INFO, logger="runtimes.onnx_export"):
        again = onnx_export.lower_to_onnx(tiny_program("llama"), tmp_path / "again" / "model.onnx",
                                          dtype=torch.float16)
    assert sum("read from" in r.message for r in caplog.records) == 2
    assert not any("nodes, opset" in r.message for r in caplog.records)  # torch's exporter did not run
    assert _files(fresh.parent) == _files(again.parent)


def test_a_corrupt_entry_is_exported_again_and_old_entries_go(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NEXUS_EXPORT_GRAPH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(onnx_export, "_EXPORTS", OrderedDict())
    exported = tiny_program("llama", layers=1).exported
    model = onnx_export.export_graph(exported, 18)
    (entry,) = (tmp_path / "cache").iterdir()
    entry.write_bytes(b"not a model")
    monkeypatch.setattr(onnx_export, "_EXPORTS", OrderedDict())
    with caplog.at_level(logging.INFO):
        again = onnx_export.export_graph(exported, 18)
    assert any("unreadable" in r.message for r in caplog.records)
    assert any("nodes, opset" in r.message for r in caplog.records)  # exported afresh ...
    assert len(again.graph) == len(model.graph)
    assert onnx.load(str(entry), load_external_data=False).graph.node  # ... and stored again, readable

    monkeypatch.setattr(onnx_graph_cache, "KEEP", 1)
    onnx_graph_cache.save("another", again)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["another.onnx"]  # the newest entry stays


def test_trimming_skips_entries_another_process_removed_meanwhile(tmp_path, monkeypatch):
    """Test workers share one folder: an entry that vanishes between the listing and its date is not an error."""
    monkeypatch.setattr(onnx_graph_cache, "KEEP", 1)
    (tmp_path / "old.onnx").write_bytes(b"a")
    (tmp_path / "new.onnx").write_bytes(b"b")
    os.utime(tmp_path / "old.onnx", (1, 1))
    (tmp_path / "gone.onnx").symlink_to(tmp_path / "missing")  # listed, but its stat fails like a removed file's
    onnx_graph_cache._trim(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gone.onnx", "new.onnx"]
