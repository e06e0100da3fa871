"""The weight store: tensors from shards by offset, produced tensors within a budget, forks that share."""

import pytest
import torch
from safetensors.torch import save_file

from nexus_export.errors import UserError
from nexus_export.weights.shards import index_checkpoint
from nexus_export.weights.store import WeightStore, parse_bytes


@pytest.fixture
def shard(tmp_path):
    tensors = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path / "model.safetensors", tensors


def store_of(path, **kw) -> WeightStore:
    store = WeightStore(**kw)
    for key, loc in index_checkpoint([path]).items():
        store.add_location(key, loc)
    return store


def test_reads_by_offset_in_the_asked_dtype(shard):
    path, tensors = shard
    store = store_of(path)
    assert torch.equal(store.get("a"), tensors["a"])
    assert store.get("b").dtype == torch.bfloat16
    assert store.get("b", torch.float32).dtype == torch.float32
    assert store.shape("a") == (3, 4) and store.stored_dtype("b") == torch.bfloat16
    assert store.total_bytes() == 12 * 4 + 5 * 2



def test_rows_read_only_their_bytes(tmp_path):
    table = torch.randn(7, 5).to(torch.bfloat16)
    save_file({"emb": table, "after": torch.ones(3)}, str(tmp_path / "m.safetensors"))
    store = store_of(tmp_path / "m.safetensors")
    assert torch.equal(store.rows("emb", 2, 3), table[2:5])
    assert torch.equal(store.rows("emb", 6, 1, torch.float32), table[6:].float())
    store.set("emb", table.float() * 2)  # a produced tensor, in memory
    assert torch.equal(store.rows("emb", 0, 2, torch.float32), (table[:2].float() * 2).to(torch.bfloat16).float())


def test_adopted_tensors_are_read_from_their_file_and_never_spill(tmp_path):
    store = WeightStore(budget=2**20, scratch=tmp_path / "scratch")
    store.set("w", torch.randn(64, 64))
    store.set("other", torch.randn(8, 8))
    save_file({"w": store.get("w")}, str(tmp_path / "block_0.safetensors"))  # a checkpoint of what the store holds
    expected = store.get("w").clone()
    store.adopt(tmp_path / "block_0.safetensors")
    assert store.resident_bytes() == 8 * 8 * 4  # only "other" is held
    assert torch.equal(store.get("w"), expected)
    store.spill()
    assert store.spilled_bytes == 8 * 8 * 4  # "w" is not written again

def test_set_keeps_the_store_dtype_and_the_checkpoint_is_untouched(shard):
    path, tensors = shard
    store = store_of(path, dtype=torch.bfloat16)
    store.set("a", torch.zeros(3, 4))
    assert store.get("a").dtype == torch.bfloat16 and float(store.get("a").abs().sum()) == 0
    assert torch.equal(store_of(path).get("a"), tensors["a"])


def test_past_the_budget_produced_tensors_spill_to_scratch(shard, tmp_path):
    path, _ = shard
    store = store_of(path, budget=100, scratch=tmp_path / "scratch")
    store.set("x", torch.full((10,), 2.0))  # 40 bytes: kept in memory
    assert store.resident_bytes() == 40 and not (tmp_path / "scratch").exists()
    store.set("y", torch.full((20,), 3.0))  # 120 bytes in all: both spilled
    assert store.resident_bytes() == 0 and store.spilled_bytes == 120
    assert len(list((tmp_path / "scratch").glob("spill-*.safetensors"))) == 1
    assert torch.equal(store.get("y"), torch.full((20,), 3.0)) and torch.equal(store.get("x"), torch.full((10,), 2.0))


def test_a_spill_writes_files_of_bounded_size(shard, tmp_path, monkeypatch):
    """Each spill file is serialized in memory before it is written: many small files keep that copy small."""
    import nexus_export.weights.store as store_module

    monkeypatch.setattr(store_module, "SPILL_FILE_BYTES", 50)
    path, _ = shard
    store = store_of(path, budget=100, scratch=tmp_path / "scratch")
    for i in range(5):
        store.set(f"t{i}", torch.full((10,), float(i)))  # 40 bytes each: the third pushes the store past 100
    files = sorted((tmp_path / "scratch").glob("spill-*.safetensors"))
    # t2 brought 120 bytes: the oldest spilled down to 50 (t0+t1, one file); t4 the same again (t2+t3, one more)
    assert len(files) == 2 and store.resident_bytes() == 40 and store.spilled_bytes == 160
    assert [float(store.get(f"t{i}")[0]) for i in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_a_fork_shares_tensors_and_keeps_its_own_changes(shard):
    path, tensors = shard
    store = store_of(path)
    store.set("c", torch.ones(2))
    fork = store.fork()
    fork.set("a", torch.zeros(3, 4))
    fork.drop("b")
    fork.rename({"c": "d"})
    assert torch.equal(store.get("a"), tensors["a"]) and "b" in store and "c" in store
    assert float(fork.get("a").sum()) == 0 and "b" not in fork and torch.equal(fork.get("d"), torch.ones(2))
    fork.alias("e", "d")
    assert torch.equal(fork.get("e"), fork.get("d")) and fork.resident_bytes() == 48 + 8  # an alias: no copy


def test_write_through_changes_the_callers_tensor_in_place():
    weight = torch.ones(2, 2)
    store = WeightStore(write_through=True)
    store.add_tensor("w", weight)
    store.set("w", torch.zeros(2, 2))
    assert float(weight.sum()) == 0 and store.resident_bytes() == 0
    other = WeightStore()
    other.add_tensor("w", weight)
    other.set("w", torch.full((2, 2), 5.0))
    assert float(weight.sum()) == 0  # without write-through the caller's tensor is never changed


def test_memory_sizes():
    assert parse_bytes("8GiB") == 8 * 2**30 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("2G") == 2 * 2**30
    assert parse_bytes("1e9") == 10**9 and parse_bytes(4096) == 4096
    for bad in ("lots", "-1GiB", "0", ""):
        with pytest.raises(UserError, match="not a positive size"):
            parse_bytes(bad)


def test_a_spill_by_a_fork_frees_a_shared_edit_for_both(shard, tmp_path):
    """An edit made before the fork lives once: when the fork spills it (over the budget), the parent reads it from
    the spill file too, and neither holds it in memory any more."""
    path, _ = shard
    store = store_of(path, budget=100, scratch=tmp_path / "scratch")
    store.set("x", torch.full((20,), 2.0))  # 80 bytes, in memory
    fork = store.fork()
    fork.set("y", torch.full((10,), 3.0))  # 120 bytes in all: x, the oldest, spilled; y kept
    assert fork.resident_bytes() == 40 and store.resident_bytes() == 40 and store.spilled_bytes == 80
    assert store._entries["x"] is fork._entries["x"] and store._entries["x"].tensor is None
    assert torch.equal(store.get("x"), torch.full((20,), 2.0)) and "y" not in store
    store.set("x", torch.ones(20))  # a later change in either store is its own
    assert torch.equal(fork.get("x"), torch.full((20,), 2.0))


def test_a_store_and_its_forks_share_one_budget_and_spill_the_oldest_first(shard, tmp_path):
    """Two forks of one store, each under the budget alone, are over it together: the oldest edit goes, whichever
    store made it; an edit no store names any more is not counted."""
    path, _ = shard
    store = store_of(path, budget=100, scratch=tmp_path / "scratch")
    left, right = store.fork(), store.fork()
    left.set("p", torch.full((3, 4), 1.0))  # 48 bytes (float32: new names)
    right.set("q", torch.full((10,), 2.0))  # 40 bytes: 88 in all, kept
    assert store.resident_bytes() == 88 and store.spilled_bytes == 0
    right.set("r", torch.full((5,), 3.0))  # 20 more: 108 > 100; the oldest spilled until <= 50 are left: p, q
    assert store.spilled_bytes == 88 and left._entries["p"].tensor is None and right._entries["q"].tensor is None
    assert right._entries["r"].tensor is not None and left.resident_bytes() == 20
    assert torch.equal(left.get("p"), torch.full((3, 4), 1.0)) and torch.equal(right.get("q"), torch.full((10,), 2.0))
    right.set("r", torch.zeros(2))  # the old r: named by no store any more, so no longer counted
    assert store.resident_bytes() == 8


def test_make_room_spills_the_oldest_edits_until_the_coming_bytes_fit(shard, tmp_path):
    path, _ = shard
    store = store_of(path, budget=100, scratch=tmp_path / "scratch")
    store.set("p", torch.full((10,), 1.0))  # 40 bytes, the oldest
    store.set("q", torch.full((10,), 2.0))  # 40 more: 80 resident
    store.make_room(20)  # 80 + 20 fit: nothing moves
    assert store.spilled_bytes == 0 and store.resident_bytes() == 80
    store.make_room(50)  # 80 + 50 do not: p goes, q stays
    assert store.spilled_bytes == 40 and store._entries["p"].tensor is None and store._entries["q"].tensor is not None
    assert torch.equal(store.get("p"), torch.full((10,), 1.0))
    store.make_room(500)  # more than the budget: everything goes
    assert store.resident_bytes() == 0 and torch.equal(store.get("q"), torch.full((10,), 2.0))
