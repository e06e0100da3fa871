"""One run over several processes with torch.distributed, as torchrun launches them.

``torchrun --nproc-per-node N -m nexus_export prune ...`` starts N copies of the command line; each reads RANK,
WORLD_SIZE and LOCAL_RANK from its environment and joins one process group (gloo on the CPU, nccl on CUDA). A run
without torchrun has a world of one and takes none of these paths.

What is spread, and how the results come back together:
- calibration and evaluation windows: each rank runs a contiguous share (whole batches, so every rank forms the
  same per-batch products a single process would) and the sums (token counts, sums of squares, X^T X, NLL) are added
  with all_reduce, so every rank holds the statistics of all windows;
- per-layer math: the linears of a block are dealt out by cost, each rank solves its own and broadcasts the tensors it
  wrote, so every rank goes on with the same block;
- output: rank 0 alone writes the output folder, the checkpoints and the report.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from nexus_export.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0  # how long a collective waits for a rank before the run fails


@dataclass(frozen=True)
class World:
    """This process's place in the run: a world of one without torchrun."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def writer(self) -> bool:
        """Whether this process writes output (rank 0, or the only process)."""
        return self.rank == 0


_WORLD = World()


def world() -> World:
    return _WORLD


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def process_device(device: torch.device) -> torch.device:
    """The device of this process: with several processes on CUDA, the GPU of its local rank."""
    if launched() and device.type == "cuda" and device.index is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        # every rank of the node checks the node, not only the ranks without a GPU: a rank that stopped alone left
        # the others waiting in their first collective, deaf to torchrun's SIGTERM, until it killed them
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", local + 1))
        if max(processes, local + 1) > torch.cuda.device_count():
            raise UserError(f"{max(processes, local + 1)} processes on this node and {torch.cuda.device_count()} "
                            "GPUs: launch at most one process per GPU (--nproc-per-node)")
        return torch.device("cuda", local)
    return device


def init(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """Join the process group torchrun prepared (a no-op without it); gloo for the CPU, nccl for CUDA."""
    global _WORLD
    if not launched():
        _WORLD = World()
        return _WORLD
    if dist.is_initialized():
        return _WORLD
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    except Exception as exc:  # the store or peers were not reachable in time
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise UserError(f"could not join the process group at {where} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]}); check --rdzv-endpoint and that every node was started")
    _WORLD = World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), backend)
    log.info("rank %d of %d (%s)", _WORLD.rank, _WORLD.size, backend)
    return _WORLD


def shutdown(done: bool = True) -> None:
    """Leave the process group at the end of a run. ``done``: every rank got here (they meet first, so no rank leaves
    while another still talks to it; after a failure each leaves at once)."""
    global _WORLD
    if dist.is_initialized():
        if done:
            dist.barrier()
        dist.destroy_process_group()
    _WORLD = World()


def prefix() -> str:
    """``rank R of N: `` in a process torchrun started as one of several (for messages), else empty."""
    if not launched():
        return ""
    return f"rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')}: "


# ---------------------------------------------------------------------------------------------------- agreement

def check_same(what: str, value: str) -> None:
    """Every rank must have been started with the same ``value`` (a recipe, a model): UserError naming the ranks
    that differ from rank 0."""
    if not _WORLD.active:
        return
    digest = hashlib.sha256(value.encode("utf-8")).hexdigest()
    digests: list = [None] * _WORLD.size
    dist.all_gather_object(digests, digest)
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise UserError(f"ranks {odd} were started with a different {what} than rank 0; launch every rank with the "
                        "same command")


# ---------------------------------------------------------------------------------------------------- sharing work

def share(count: int, unit: int) -> range:
    """This rank's contiguous range of ``count`` items, cut at multiples of ``unit`` where there are enough units."""
    size, rank = _WORLD.size, _WORLD.rank
    if size == 1:
        return range(count)
    if count < size:
        raise UserError(f"{count} calibration or evaluation windows cannot be shared by {size} processes; use at "
                        f"least {size} windows or fewer processes")
    units = -(-count // unit)
    if units >= size:
        lo, hi = units * rank // size * unit, units * (rank + 1) // size * unit
    else:
        lo, hi = count * rank // size, count * (rank + 1) // size
    return range(min(lo, count), min(hi, count))


def local(rows: torch.Tensor, unit: int) -> torch.Tensor:
    """This process's contiguous share of ``rows`` (windows, or their saved streams), cut as ``share`` says; all of
    them in a single process."""
    mine = share(len(rows), unit)
    return rows[mine.start:mine.stop]


def sum_(*tensors: torch.Tensor) -> None:
    """Add each tensor over all ranks, in place."""
    if _WORLD.active:
        for t in tensors:
            dist.all_reduce(t)


def _wire() -> torch.device:
    """Where tensors must be for a collective: the process's GPU with nccl, the CPU with gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if _WORLD.backend == "nccl" else torch.device("cpu")


def _send(t: torch.Tensor, src: int) -> torch.Tensor:
    """``t`` (rank ``src``'s values, any dtype, sent as bytes) on every rank, on the CPU."""
    if not t.numel():
        return t
    wire = t.to(_wire()).contiguous()
    dist.broadcast(wire.reshape(-1).view(torch.uint8), src=src)
    return wire.cpu()


def sum_float(*values: float) -> list[float]:
    """Sums of Python numbers over all ranks (float64)."""
    if not _WORLD.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_wire())
    dist.all_reduce(t)
    return t.tolist()


def owners(costs: list[float]) -> list[int]:
    """A rank for each job: the most expensive first, each to the rank with the least work so far."""
    load = [0.0] * _WORLD.size
    owner = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: -costs[j]):
        r = min(range(_WORLD.size), key=lambda r: (load[r], r))
        owner[j] = r
        load[r] += costs[j]
    return owner


def broadcast_tensors(tensors: dict[str, torch.Tensor] | None, src: int) -> dict[str, torch.Tensor]:
    """Rank ``src``'s named tensors on every rank (CPU, any dtype: sent as bytes)."""
    if not _WORLD.active:
        return tensors or {}
    meta = [[(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in (tensors or {}).items()]]
    dist.broadcast_object_list(meta, src=src)
    out = {}
    for name, shape, dtype in meta[0]:
        mine = tensors[name].detach() if _WORLD.rank == src else torch.empty(shape, dtype=getattr(torch, dtype))
        out[name] = _send(mine, src)
    return out


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not _WORLD.active:
        return [obj]
    out: list = [None] * _WORLD.size
    dist.all_gather_object(out, obj)
    return out


def gather_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Every rank's list of CPU tensors, concatenated in rank order, on rank 0 (None elsewhere)."""
    if not _WORLD.active:
        return tensors
    lists = gather_objects([(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in tensors])
    out: list[torch.Tensor] = []
    for src, metas in enumerate(lists):
        for i, (shape, dtype) in enumerate(metas):
            mine = tensors[i].detach() if src == _WORLD.rank else torch.empty(shape, dtype=getattr(torch, dtype))
            sent = _send(mine, src)
            if _WORLD.rank == 0:  # the others take part in the broadcast and drop what they received
                out.append(sent)
    return out if _WORLD.rank == 0 else None
