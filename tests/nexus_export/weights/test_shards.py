"""Safetensors shards: headers checked before any work, truncated or corrupt files named, tensors read by offset."""

import json

import pytest
import torch
from safetensors.torch import save_file

from nexus_export.errors import UserError
from nexus_export.weights.shards import checkpoint_files, index_checkpoint, read_header, read_tensor


def write(path, tensors):
    save_file(tensors, str(path))
    return path


def test_read_by_offset_matches_what_was_written(tmp_path):
    tensors = {"w": torch.randn(4, 6), "h": torch.randn(3).to(torch.bfloat16), "i": torch.arange(5)}
    header = read_header(write(tmp_path / "m.safetensors", tensors))
    for key, value in tensors.items():
        assert torch.equal(read_tensor(header[key]), value)


@pytest.mark.parametrize("chunk_bytes", [6, 2**20])
def test_read_and_convert_in_chunks(tmp_path, monkeypatch, chunk_bytes):
    """A bf16 tensor read as float32 in chunks of 3 values (not dividing its 35) or whole: exactly ``.float()``;
    integers are never converted."""
    from nexus_export.weights import shards

    monkeypatch.setattr(shards, "CONVERT_CHUNK_BYTES", chunk_bytes)
    tensors = {"b": torch.randn(5, 7).to(torch.bfloat16), "i": torch.arange(5)}
    header = read_header(write(tmp_path / "m.safetensors", tensors))
    got = read_tensor(header["b"], torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, tensors["b"].float())
    assert torch.equal(read_tensor(header["b"], torch.bfloat16), tensors["b"])
    assert read_tensor(header["i"], torch.float32).dtype == torch.int64


def test_truncated_random_and_empty_files_are_named(tmp_path):
    path = write(tmp_path / "m.safetensors", {"w": torch.randn(64, 64)})
    data = path.read_bytes()
    cases = {"truncated": data[: len(data) - 100], "random": bytes(range(256)) * 4, "empty": b""}
    for name, content in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(UserError, match=name):
            read_header(bad)


def test_an_index_naming_a_missing_shard_is_refused(tmp_path):
    write(tmp_path / "model-00001-of-00002.safetensors", {"a": torch.ones(2)})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(UserError, match="missing weight shard.*model-00002-of-00002"):
        checkpoint_files(tmp_path)


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    a = write(tmp_path / "a.safetensors", {"x": torch.ones(2)})
    b = write(tmp_path / "b.safetensors", {"x": torch.ones(2)})
    with pytest.raises(UserError, match="appears in both"):
        index_checkpoint([a, b])
