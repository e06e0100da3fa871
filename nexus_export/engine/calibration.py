"""The calibration engine shared by every data-driven pass.

The calibration windows walk the program block by block (runner.BlockRunner: one block's weights on the device at a
time), so block k+1 sees the outputs of the already-pruned block k, and memory holds one block's weights and the
windows' activations. Statistics of each linear input are accumulated streaming in float64 on the device: token count,
per-column sum of squares (Wanda) and, when asked for, X^T X (SparseGPT's Hessian); q, k and v share one input.
Every finished block is checkpointed, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from nexus_export import distributed
from nexus_export.errors import UserError
from nexus_export.graph.program import Program
from nexus_export.graph.runner import BlockRunner
from nexus_export.graph.structure import Linear
from nexus_export.memory import trim
from nexus_export.progress import Progress

log = logging.getLogger(__name__)

# Inputs wider than this get the lean Hessian: X^T X accumulated in float32 in place (addmm_, as the references
# accumulate; no per-batch [in, in] temporaries) and factored in place, in blocks (passes/shared/obs.py).
# At 28,672 inputs (a 70B down projection) the float64 matrix alone was 6.6 GB and each batch added 3.3 + 6.6 GB of
# temporaries. Narrower inputs (every input up to 8B's 14,336-wide down projection) keep float64 accumulation and
# torch's factoring, so their results are what they were. Measured against each other on SmolLM2-135M by
# bench/hessian_precision.py (docs/results.md): the lean path moves SparseGPT 2:4's perplexity as much as rescaling
# the Hessian by 1 + 2^-20 does (rounding alone), no more.
LEAN_HESSIAN_WIDTH = 16384


def hessian_dtype(in_features: int) -> torch.dtype:
    """The dtype X^T X of an input this wide is accumulated in (see LEAN_HESSIAN_WIDTH)."""
    return torch.float32 if in_features > LEAN_HESSIAN_WIDTH else torch.float64


class InputStats:
    """Streaming statistics of one linear input X [tokens, in_features].

    ``derived`` holds what a pass computes once from these statistics and reuses for every linear reading the same
    input (SparseGPT's factored Hessian for q, k and v); ``free`` drops everything once the last of them is done."""

    def __init__(self, in_features: int, hessian: bool, device: torch.device | str = "cpu"):
        self.tokens = 0
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.xtx = (torch.zeros(in_features, in_features, dtype=hessian_dtype(in_features), device=device)
                    if hessian else None)
        self.derived: dict = {}
        self._scaled = False

    def add(self, x: torch.Tensor) -> None:
        if self._scaled:
            raise RuntimeError("statistics cannot grow after hessian() was read")
        x = x.reshape(-1, x.shape[-1]).to(self.sq_sum.device, torch.float32)
        self.tokens += x.shape[0]
        self.sq_sum += (x * x).sum(dim=0, dtype=torch.float64)
        if self.xtx is not None:
            if self.xtx.dtype == x.dtype:  # the lean Hessian: accumulated where it lives, no [in, in] temporary
                self.xtx.addmm_(x.t(), x)
            else:  # float64: a sum of each batch's float32 product
                self.xtx += (x.t() @ x).to(self.xtx.dtype)

    def reduce(self) -> None:
        """Sum the statistics over every process of a distributed run (each ran its share of the windows)."""
        if not distributed.world().active:
            return
        tokens = torch.tensor([self.tokens], dtype=torch.float64, device=self.sq_sum.device)
        distributed.sum_(tokens, self.sq_sum, *([self.xtx] if self.xtx is not None else []))
        self.tokens = int(tokens.item())

    def finite(self) -> bool:
        """False when a NaN or Inf reached the input (it shows in the sum of squares): one check per input and
        block instead of one per batch."""
        return bool(torch.isfinite(self.sq_sum).all())

    def column_norms(self) -> torch.Tensor:
        """||X_j||_2 over all calibration tokens (Wanda's activation norm)."""
        return self.sq_sum.sqrt()

    def hessian(self) -> torch.Tensor:
        """H = (2/n) X^T X in ``hessian_dtype(in_features)`` (SparseGPT's Hessian). Scaled in place on the first
        call (a second [in, in] matrix is 3.3 GB for the MLP input of a 70B model), so read it once all windows are in."""
        if self.xtx is None:
            raise RuntimeError("the Hessian was not collected (ask for hessian=True) or was handed over (take_hessian)")
        if not self._scaled:
            self.xtx.mul_(2.0 / max(self.tokens, 1))
            self._scaled = True
        return self.xtx

    def take_hessian(self) -> torch.Tensor:
        """The Hessian (as ``hessian``), handed over: these statistics let go of it, so the caller may overwrite it
        (factor it in its own memory) and ``hessian`` refuses from now on."""
        hessian = self.hessian()
        self.xtx = None
        return hessian

    def free(self) -> None:
        """Drop the Hessian and everything derived from it (the last linear reading this input is done)."""
        self.xtx = None
        self.derived.clear()


@torch.no_grad()
def collect(runner: BlockRunner, k: int, linears: list[Linear], hessian: bool) -> dict[str, InputStats]:
    """Statistics of the inputs of ``linears`` (all in block k) over every calibration window."""
    index = runner.graphs.linear_inputs[k]
    missing = [lin.name for lin in linears if lin.name not in index]
    if missing:
        raise UserError(f"no input found in the graph of block {k} for {missing}")
    by_input: dict[int, InputStats] = {}
    for lin in linears:
        by_input.setdefault(index[lin.name], InputStats(lin.in_features, hessian, runner.device))

    def visit(i: int, stream_in: torch.Tensor, out: tuple) -> None:
        for j, stats in by_input.items():
            stats.add(out[1 + j])

    runner.run(k, visit, [1 + j for j in by_input])
    for stats in by_input.values():  # the windows of every rank (a no-op in a single process)
        stats.reduce()
    for j, stats in by_input.items():
        if not stats.finite():
            names = [lin.name for lin in linears if index[lin.name] == j]
            raise UserError(f"NaN or Inf in the input of {', '.join(names)} (block {k}) during calibration; "
                            "check the model's weights and dtype (fp16 overflow?) or the calibration text")
    return {lin.name: by_input[index[lin.name]] for lin in linears}


def stages(program: Program, k: int, true_sequential: bool) -> list[list[Linear]]:
    """The linears of block k in pruning order: one stage, or (true sequential) readers/writers sublayer by sublayer."""
    lins = [lin for lin in program.structure.in_blocks() if lin.block == k]
    if not true_sequential:
        return [lins]
    out = []
    for sub in program.structure.sublayers:
        if sub.block == k:
            out.append([program.linear(n) for n in sub.readers])
            out.append([program.linear(n) for n in sub.writers])
    return out


@dataclass
class Resumed:
    """What a checkpoint holds: the next unit to do, the notes so far, the files of saved tensors (one per finished
    unit, read one at a time by ``tensors``), the stream entering the next unit (if saved)."""

    next: int
    notes: dict
    files: list[Path]
    streams: list[torch.Tensor]

    def local_streams(self, unit: int) -> list[torch.Tensor]:
        """The saved streams of this process's share of the windows (all of them in a single process): a checkpoint
        holds every window's stream, so a run may resume with another number of processes."""
        if not distributed.world().active:
            return self.streams
        return [distributed.local(torch.cat(self.streams), unit)]  # the fingerprint ties it to these windows

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every saved tensor, one unit's file at a time (a resumed run never holds all of them at once)."""
        for path in self.files:
            yield from _read(path).items()


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # missing, truncated or not safetensors: the checkpoint cannot be used
        raise UserError(f"the checkpoint file {path} cannot be read ({type(exc).__name__}); run without --resume "
                        "to start over") from None


class Checkpoint:
    """After each finished unit of a long pass (a block, a batch): the tensors that unit produced, the stream entering
    the next one, and the notes so far.

    Every file is written under a temporary name and renamed into place; the stream goes to a file named after its
    unit, and ``state.json`` (which names it) is replaced last, so a run killed at any moment leaves the previous or
    the new consistent state. ``fingerprint`` ties it to one model, pass, options and calibration set.
    """

    def __init__(self, folder: Path, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint

    def _write(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self.folder / f".{name}.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.folder / name)

    def block_file(self, k: int) -> Path:
        """Where unit ``k``'s tensors are saved."""
        return self.folder / f"block_{k}.safetensors"

    def save(self, k: int, tensors: dict[str, torch.Tensor], streams: list[torch.Tensor] | None, notes: dict) -> None:
        """Unit ``k`` is done: keep its ``tensors``, the ``streams`` (None: none to keep) and the ``notes``. In a
        distributed run every rank calls this with its share of the streams; rank 0 writes them all."""
        if streams is not None:
            streams = distributed.gather_tensors(streams)
        if not distributed.world().writer:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write(self.block_file(k).name, tensors)
        stream_file = None
        if streams is not None:
            stream_file = f"streams_{k}.safetensors"
            self._write(stream_file, {str(i): t for i, t in enumerate(streams)})
        state = {"fingerprint": self.fingerprint, "done": k, "notes": notes, "streams": stream_file}
        tmp = self.folder / ".state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.folder / "state.json")
        for old in self.folder.glob("streams_*.safetensors"):  # earlier units' streams: no longer named by the state
            if old.name != stream_file:
                old.unlink(missing_ok=True)

    def load(self) -> Resumed | None:
        """The saved progress, or None when there is none; a checkpoint of another run, or a damaged one, is a
        UserError."""
        path = self.folder / "state.json"
        if not path.is_file():
            log.info("no checkpoint in %s; starting from the beginning", self.folder)
            return None
        try:
            state = json.loads(path.read_text())
            legacy = "streams.safetensors" if (self.folder / "streams.safetensors").is_file() else None
            done, notes = int(state["done"]), dict(state.get("notes") or {})
            stream_file = state.get("streams", legacy)  # checkpoints of earlier versions kept one streams file
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"the checkpoint in {self.folder} is damaged; run without --resume to start over") from None
        if state.get("fingerprint") != self.fingerprint:
            raise UserError(f"the checkpoint in {self.folder} is from a different model, pass or calibration set; "
                            "run without --resume to start over")
        files = [self.block_file(k) for k in range(done + 1)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"the checkpoint in {self.folder} lacks {', '.join(missing[:3])}; run without --resume to "
                            "start over")
        streams = _read(self.folder / stream_file) if stream_file else {}
        log.info("resuming from %s: units 0-%d already done", self.folder, done)
        return Resumed(done + 1, notes, files, [streams[str(i)] for i in range(len(streams))])

    def clear(self) -> None:
        if distributed.world().writer:
            shutil.rmtree(self.folder, ignore_errors=True)


def open_checkpoint(ctx, program: Program, what: str, options: dict, windows: torch.Tensor
                    ) -> tuple[Checkpoint | None, Resumed | None]:
    """The pass's checkpoint (None when the context gives no folder) and, with ``ctx.resume``, what it holds; without
    ``resume`` an old checkpoint is cleared."""
    if ctx is None or ctx.checkpoint_dir is None:
        return None, None
    checkpoint = Checkpoint(ctx.checkpoint_dir, fingerprint(program, what, options, windows))
    if ctx.resume:
        return checkpoint, checkpoint.load()
    checkpoint.clear()
    return checkpoint, None


def fingerprint(program: Program, what: str, options: dict, windows: torch.Tensor) -> str:
    """Identity of a calibrated run for checkpoints: model, pass, options, calibration windows, starting weights."""
    digest = hashlib.sha256()
    digest.update(json.dumps([program.name, what, options], sort_keys=True, default=str).encode())
    digest.update(windows.numpy().tobytes())
    for lin in program.structure.in_blocks():  # a cheap signature of the weights the pass starts from
        digest.update(program.store.identity(lin.weight).encode())
    return digest.hexdigest()[:32]


def calibrate_blocks(program: Program, windows: torch.Tensor,
                     prune_stage: Callable[[int, list[Linear], dict[str, InputStats]], dict],
                     hessian: bool, true_sequential: bool = False, batch_size: int = 8, what: str = "calibration",
                     checkpoint: Checkpoint | None = None, resumed: Resumed | None = None) -> dict:
    """For each block in order: collect statistics of each stage's inputs, let ``prune_stage`` prune it (it returns
    per-layer notes for the report), then move on with the pruned block's outputs. Returns the notes of every layer.
    Each finished block goes into ``checkpoint``; ``resumed`` continues after the blocks it holds."""
    runner = BlockRunner(program, distributed.local(windows, batch_size), batch_size)
    n_blocks = len(program.structure.blocks)
    start, notes = 0, {}
    if resumed is not None:
        for name, tensor in resumed.tensors():
            program.set_parameter(name, tensor)
        runner.set_streams([s.to(runner.device) for s in resumed.local_streams(batch_size)])
        start, notes = resumed.next, resumed.notes
    progress = Progress(what, n_blocks, "blocks", every_s=10.0)
    for k in range(start, n_blocks):
        block_linears = []
        for stage in stages(program, k, true_sequential):
            if stage:
                notes.update(prune_stage(k, stage, collect(runner, k, stage, hessian)) or {})
                block_linears.extend(stage)
        runner.step(k)
        if checkpoint is not None:
            names = [n for lin in block_linears for n in (lin.weight, *program.store.companions(lin.weight))]
            weights = {name: program.parameter(name) for name in names}
            checkpoint.save(k, weights, runner.streams(), notes)
            if distributed.world().writer:  # the block's weights are read from the checkpoint from now on
                program.store.adopt(checkpoint.block_file(k))
        trim()  # the block's statistics and temporaries are gone: give their pages back while edits accumulate
        progress.update(k + 1)
    return notes
