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
