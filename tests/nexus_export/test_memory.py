"""memory: trim gives freed heap pages back, imports frozen, large tensors mapped, torch's last trace let go, short
rises in memory counted and placed."""

import gc
import subprocess
import sys
import time
import weakref

import pytest
import torch

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


def heap_script(script: str, *args: str) -> str:
    """Run ``script`` in a fresh process; its first printed word (the surviving tensor must be intact)."""
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True)
    value, intact = out.stdout.split()
    assert intact == "True"
    return value


@pytest.mark.slow
@pytest.mark.skipif(getattr(memory._libc(), "malloc_trim", None) is None, reason="the C library has no malloc_trim")
def test_trim_returns_holes_in_the_heap():
    assert float(heap_script(SCRIPT)) < 50  # without trim the holes stay resident
    assert float(heap_script(SCRIPT, "trim")) > 300


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


@pytest.mark.slow
@pytest.mark.skipif(getattr(memory._libc(), "mallopt", None) is None, reason="the C library has no mallopt")
def test_large_allocations_mapped_are_returned_on_free():
    assert heap_script(MAPPED) == "False"  # glibc's own threshold keeps the 390 MiB of holes resident
    assert heap_script(MAPPED, "map") == "True"


LAST_TRACE = """
import gc, weakref
import torch
import transformers
from torch.fx.experimental import proxy_tensor
from nexus_export import memory
from nexus_export.graph.capture import capture

class Double(torch.nn.Module):
    def forward(self, x):
        return x * 2

exported = torch.export.export(Double(), (torch.ones(2),))  # torch's own export, without ours around it
traced = weakref.ref(next(iter(proxy_tensor._FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT.values())).graph)
del exported
gc.collect()
kept = traced() is not None  # torch's map still holds the trace's nodes, and through them its graph
memory.forget_last_trace()
gc.collect()
config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=100)
capture(transformers.LlamaForCausalLM(config).eval())
print(kept, traced() is None, len(proxy_tensor._FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT) == 0)
"""


@pytest.mark.slow
def test_the_last_traced_graph_is_let_go():
    """torch keeps the last trace's graph alive through a module-level map; forget_last_trace clears it, and the
    capture (like every trace of ours) leaves it empty."""
    out = subprocess.run([sys.executable, "-c", LAST_TRACE], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True"]


SPIKE = """
import sys, time
from nexus_export.memory import RssSampler

def rise_and_fall():
    data = b"\\x01" * (300 * 2**20)  # 300 MiB written and freed between two samples
    del data

def after_it():
    time.sleep(0.6)  # where the main thread is when the sampler next looks

interval = float(sys.argv[1])
with RssSampler(interval_s=interval) as rss:
    time.sleep(0.1)  # the first sample is taken
    rise_and_fall()
    after_it()
print(round(rss.peak_mb), round(rss.spike_mb), rss.spike_at)
"""


@pytest.mark.parametrize("interval", [0.4, 30.0])
def test_a_rise_between_two_samples_counts_and_is_placed(interval):
    """300 MiB rise and fall between two samples: the stage's peak still has them (the kernel's peak rose), and the
    spike says where the main thread was when the next sample noticed it, or that only the block's end did."""
    out = subprocess.run([sys.executable, "-c", SPIKE, str(interval)], capture_output=True, text=True, check=True)
    peak, spike, where = out.stdout.split(maxsplit=2)
    assert int(peak) >= 300 and 256 < int(spike) <= int(peak)
    if interval < 1:
        assert "after_it" in where and "rise_and_fall" not in where
    else:
        assert where.strip() == "None"


EARLIER_PEAK = """
import time
from nexus_export.memory import RssSampler
data = b"\\x01" * (400 * 2**20)  # the process's peak, reached before the block
del data
with RssSampler(interval_s=0.01) as rss:
    time.sleep(0.05)
print(round(rss.peak_mb), round(rss.spike_mb), rss.spike_at)
"""


def test_a_peak_reached_before_the_block_is_not_the_blocks():
    """The kernel's peak lies 400 MiB above the block's samples, but it did not rise during the block: no spike, and
    the block's peak is what it sampled."""
    out = subprocess.run([sys.executable, "-c", EARLIER_PEAK], capture_output=True, text=True, check=True).stdout
    peak, spike, where = out.split()
    assert 0 < int(peak) < 200 and int(spike) == 0 and where == "None"


INHERITED = """
import resource, subprocess, sys
data = b"\\x01" * (400 * 2**20)  # this process's peak: 400 MiB more than the child will ever use
del data
child = ("from nexus_export import memory; import resource; "
         "print(memory.peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout)
"""


def test_the_peak_is_this_programs_own_not_the_spawners():
    """Linux starts a spawned program's ru_maxrss at its spawner's peak; peak_rss_mb reads the program's own."""
    out = subprocess.run([sys.executable, "-c", INHERITED], capture_output=True, text=True, check=True).stdout
    own, ru_maxrss = (float(v) for v in out.split())
    assert ru_maxrss > 400 and own < 200


def test_release_collects_at_most_a_tenth_of_the_time(monkeypatch):
    """A full collection right after one that took 10 s waits until 90 s have passed since; then it runs."""
    class Node:
        pass

    def cycle():
        a, b = Node(), Node()
        a.other, b.other, a.weight = b, a, torch.ones(10)
        return weakref.ref(a.weight)

    gc.disable()  # only release() collects here
    try:
        now = time.perf_counter()
        monkeypatch.setitem(memory._collected, "end", now)
        monkeypatch.setitem(memory._collected, "cost", 10.0)
        alive = cycle()
        memory.release()
        assert alive() is not None  # 10 s of collecting ended just now: not yet
        monkeypatch.setitem(memory._collected, "end", now - 91.0)
        memory.release()
        assert alive() is None and memory._collected["cost"] < 10.0
    finally:
        gc.enable()
