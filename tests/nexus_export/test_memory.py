"""memory.trim gives freed heap pages back: the holes weight-sized tensors leave inside glibc's heap."""

import subprocess
import sys

import pytest

from nexus_export import memory

# In a fresh process, so that the allocator's state (its mmap threshold, the heap's layout) is the one described.
SCRIPT = """
import torch
from nexus_export import memory
mib = 2**20
torch.empty(20 * mib // 4).fill_(1)  # freeing a 20 MiB mmapped block raises glibc's mmap threshold past 10 MiB
tensors = [torch.ones(10 * mib // 4) for _ in range(40)]  # now carved from the heap, every page touched
del tensors[:-1]  # 390 MiB of holes below the one still alive at the top: free() cannot shrink the heap
before = memory.current_rss_mb()
memory.trim() if "trim" in __import__("sys").argv else None
print(before - memory.current_rss_mb(), float(tensors[0].sum()) == 10 * mib // 4)
"""


@pytest.mark.skipif(getattr(memory._libc(), "malloc_trim", None) is None, reason="the C library has no malloc_trim")
def test_trim_returns_holes_in_the_heap():
    def freed(*args):
        out = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, check=True)
        mib, intact = out.stdout.split()
        assert intact == "True"
        return float(mib)

    assert freed() < 50  # without trim the holes stay resident
    assert freed("trim") > 300


FREEZE = """
import gc, weakref
import torch
from nexus_export import memory
memory.freeze_imports()
frozen = gc.get_freeze_count()
memory.freeze_imports()  # once per process: the second call freezes nothing new
class Node:
    pass
a, b = Node(), Node()
a.other, b.other, a.weight = b, a, torch.ones(1000)  # a cycle that only the collector frees
alive = weakref.ref(a.weight)
del a, b
memory.release()
print(frozen > 10000, gc.get_freeze_count() == frozen, alive() is None)
"""


def test_frozen_imports_leave_later_cycles_collectable():
    """The command line freezes what its imports created; what a run creates afterwards is still collected."""
    out = subprocess.run([sys.executable, "-c", FREEZE], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True"]


MAPPED = """
import sys
import torch
from nexus_export import memory
if "map" in sys.argv:
    memory.map_large_allocations()
mib = 2**20
base = memory.current_rss_mb()
torch.empty(20 * mib // 4).fill_(1)  # would raise glibc's threshold past 10 MiB
tensors = [torch.ones(10 * mib // 4) for _ in range(40)]
del tensors[:-1]  # no trim: only memory maps of their own give these back on free
print(memory.current_rss_mb() - base < 60, float(tensors[0].sum()) == 10 * mib // 4)
"""


@pytest.mark.skipif(getattr(memory._libc(), "mallopt", None) is None, reason="the C library has no mallopt")
def test_large_allocations_mapped_are_returned_on_free():
    def small(*args):
        out = subprocess.run([sys.executable, "-c", MAPPED, *args], capture_output=True, text=True, check=True)
        low, intact = out.stdout.split()
        assert intact == "True"
        return low == "True"

    assert not small()  # glibc's own threshold keeps the 390 MiB of holes resident
    assert small("map")
