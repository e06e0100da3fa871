"""memory.trim gives freed heap pages back: the holes weight-sized tensors leave inside glibc's heap."""

import pytest
import torch

from nexus_export import memory


@pytest.mark.skipif(getattr(memory._libc(), "malloc_trim", None) is None, reason="the C library has no malloc_trim")
def test_trim_returns_holes_in_the_heap():
    mib = 2**20
    torch.empty(20 * mib // 4).fill_(1)  # freeing a 20 MiB mmapped block raises glibc's mmap threshold past 10 MiB
    tensors = [torch.ones(10 * mib // 4) for _ in range(40)]  # now carved from the heap, every page touched
    del tensors[:-1]  # 390 MiB of holes below the one still alive at the top: free() cannot shrink the heap
    before = memory.current_rss_mb()
    memory.trim()
    after = memory.current_rss_mb()
    assert before - after > 300, (before, after)
    assert float(tensors[0].sum()) == 10 * mib // 4
