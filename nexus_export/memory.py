"""Memory of this process: resident set size now, its peak, and the highest value seen while a block of code runs.

The kernel's peak (``VmHWM``) covers the whole process life; a stage's own peak comes from sampling the current RSS
on a background thread (every 50 ms), and from the kernel's peak when it rose during the stage (a rise shorter than a
sample interval shows only there), so a report can say which stage needed the memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import resource
import sys
import threading
import time


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB: ``VmHWM`` (Linux /proc), the peak of this program's own
    memory. ``ru_maxrss`` (the fallback elsewhere) starts at the peak of the process that spawned this one: Linux
    carries the old image's peak over at exec, so a run started by a benchmark that had just built a 3B checkpoint
    reported 6.50 GiB where it used 3.55."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    """Resident set size now, in MiB (Linux /proc; falls back to the process peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def available_bytes() -> int | None:
    """Memory the kernel says new work can take without swapping (``MemAvailable``), in bytes; None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


COLLECT_SHARE = 0.1  # release() spends at most about this share of the wall time in full collections
_collected = {"end": -float("inf"), "cost": 0.0}  # when the last full collection of release() ended, what it took


def release() -> None:
    """Give memory that Python and torch freed back to the operating system (glibc keeps freed heap pages otherwise,
    so the resident size of a long run only grows); the trim is a no-op where the C library has no ``malloc_trim``.

    The full collection before it scans every live object, about 0.2 s in a process that has run a few tiny models
    (16% of the CLI tests' time when every stage ended with one), so it runs only when the previous one ended at least
    (1 / COLLECT_SHARE - 1) of its durations ago: a stage of a big model, which lasts minutes, always ends with one;
    a tiny model's stages of a fraction of a second share one."""
    now = time.perf_counter()
    if now - _collected["end"] >= _collected["cost"] * (1 / COLLECT_SHARE - 1):
        gc.collect()
        _collected["end"] = time.perf_counter()
        _collected["cost"] = _collected["end"] - now
    trim()


def forget_last_trace() -> None:
    """Clear the map torch's tracer keeps from the fake tensors of its last trace to that trace's graph nodes (for
    export's fake tensor leak check; emptied only when the next trace starts). Through it the last graph traced
    stayed alive, erased nodes and fake values included: after lowering SmolLM2-135M, the ONNX exporter's decomposed
    graph with 31,061 nodes, beside the onnxruntime session. Called after each of the project's traces (capture,
    retrace, ONNX export)."""
    proxy_tensor = sys.modules.get("torch.fx.experimental.proxy_tensor")
    traced = getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", None)
    if isinstance(traced, dict):
        traced.clear()


_FROZEN = False


def freeze_imports() -> None:
    """Collect, then move every object alive now (the modules torch, transformers and onnx imported) to the
    collector's permanent generation, once per process: the full collection that ends every stage (``release``) then
    scans only what the run created since (measured on tiny-llama: 0.33 s -> 0.15 s a collection, a stage ends with
    one). For processes the command line owns: a cycle among the frozen objects is never collected afterwards."""
    global _FROZEN
    if not _FROZEN:
        gc.collect()
        gc.freeze()
        _FROZEN = True


MMAP_THRESHOLD = 4 * 2**20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def map_large_allocations(nbytes: int = MMAP_THRESHOLD) -> None:
    """Give every allocation of ``nbytes`` or more its own memory map, so freeing it returns the pages at once.

    glibc starts at 128 KiB but raises the threshold (up to 32 MiB) each time a mapped block is freed; after that,
    weight- and activation-sized tensors are carved from the heap, which fragments and keeps the high-water mark of a
    long run. A fixed threshold turns that off. Measured by bench/scale.py: ShortGPT on the 1.1B-wide 11-block
    checkpoint peaked at 1.15 GiB without and 0.94 GiB with it. Process-wide, so the command line calls it, not the
    library; a no-op where the C library has no ``mallopt``."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, int(nbytes))


def trim() -> None:
    """Return the free pages inside the C heap to the operating system (``malloc_trim``), without a garbage
    collection: cheap (well under a millisecond), so it can follow every freed weight. Needed because glibc raises its
    mmap threshold after freeing a large block, so later weight-sized tensors live in the heap and the holes they leave
    are never given back: a magnitude pass over a 44-block 1.1B-wide checkpoint peaked at 2.49 GiB that way, 1.88 GiB
    with this after every spill and every matrix."""
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library, looked up once (find_library runs ldconfig, and trim() runs after every block and weight)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


class RssSampler:
    """Highest RSS while the ``with`` block runs: the current RSS sampled every ``interval_s`` by a background thread,
    and the kernel's own peak (``peak_rss_mb``) when that rose meanwhile, which also counts what rose and fell between
    two samples. When the kernel's peak passes every sample by more than ``spike_mb``, the rise is kept as
    ``spike_mb`` (how far above the samples) and ``spike_at`` (where the main thread was when the sampler noticed it,
    innermost frames last; None when only the end of the block noticed): a report can then say which stage made the
    process's peak even when no sample saw it, and roughly where."""

    def __init__(self, interval_s: float = 0.05, spike_mb: float = 256.0):
        self.interval_s = interval_s
        self.spike_threshold_mb = spike_mb
        self.peak_mb = 0.0  # highest sample so far; after the block, the highest RSS by either measure
        self.spike_mb = 0.0
        self.spike_at: str | None = None
        self._kernel_at_start = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._main = threading.main_thread().ident

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, current_rss_mb())
            if self.spike_at is None and self._spike() > self.spike_threshold_mb:
                self.spike_at = _where(sys._current_frames().get(self._main))
            self._stop.wait(self.interval_s)

    def _spike(self) -> float:
        """How far the kernel's peak, if it rose during the block, lies above every sample (0 when it did not)."""
        kernel = peak_rss_mb()
        return kernel - self.peak_mb if kernel > self._kernel_at_start else 0.0

    def __enter__(self) -> "RssSampler":
        self._kernel_at_start = peak_rss_mb()
        self.peak_mb = current_rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, current_rss_mb())
        spike = self._spike()
        if spike > self.spike_threshold_mb:
            self.spike_mb = spike
        else:
            self.spike_at = None
        self.peak_mb += max(spike, 0.0)


def _where(frame, depth: int = 4) -> str | None:
    """The innermost ``depth`` frames of a stack, outermost first, as ``file:line function`` joined by " > "."""
    frames = []
    while frame is not None and len(frames) < depth:
        frames.append(f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name}")
        frame = frame.f_back
    return " > ".join(reversed(frames)) if frames else None
