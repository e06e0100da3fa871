"""The calibration engine shared by every data-driven pass.

The calibration windows walk the program block by block (runner.BlockRunner: one block's weights on the device at a
time), so block k+1 sees the outputs of the already-pruned block k, and memory holds one block's weights and the
windows' activations. Statistics of each linear input are accumulated streaming in float64 on the device: token count,
per-column sum of squares (Wanda) and, when asked for, X^T X (SparseGPT's Hessian); q, k and v share one input.
Every finished block is checkpointed, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError
from .memory import release
from .program import Program
from .progress import Progress
from .runner import BlockRunner
from .structure import Linear

log = logging.getLogger(__name__)


class InputStats:
    """Streaming statistics of one linear input X [tokens, in_features]."""

    def __init__(self, in_features: int, hessian: bool, device: torch.device | str = "cpu"):
        self.tokens = 0
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64, device=device) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.sq_sum.device, torch.float32)
        self.tokens += x.shape[0]
        self.sq_sum += (x * x).sum(dim=0, dtype=torch.float64)
        if self.xtx is not None:
            self.xtx += (x.t() @ x).double()

    def column_norms(self) -> torch.Tensor:
        """||X_j||_2 over all calibration tokens (Wanda's activation norm)."""
        return self.sq_sum.sqrt()

    def hessian(self) -> torch.Tensor:
        """H = (2/n) X^T X, float64 (SparseGPT's Hessian)."""
        if self.xtx is None:
            raise RuntimeError("the Hessian was not collected; ask for hessian=True")
        return self.xtx * (2.0 / max(self.tokens, 1))


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
            if not torch.isfinite(out[1 + j]).all():
                names = [lin.name for lin in linears if index[lin.name] == j]
                raise UserError(f"NaN or Inf in the input of {', '.join(names)} (block {k}) during calibration; "
                                "check the model's weights and dtype (fp16 overflow?) or the calibration text")
            stats.add(out[1 + j])

    runner.run(k, visit, [1 + j for j in by_input])
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


class Checkpoint:
    """After each finished block: that block's weights, the stream entering the next block, and per-layer notes.

    Files are replaced atomically and ``state.json`` is written last, so an interrupted run always leaves a consistent
    checkpoint. ``fingerprint`` ties it to one model, pass, options and calibration set.
    """

    def __init__(self, folder: Path, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint

    def _write(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self.folder / f".{name}.tmp"
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.folder / name)

    def save(self, k: int, program: Program, linears: list[Linear], streams: list[torch.Tensor], notes: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write(f"block_{k}.safetensors", {lin.weight: program.parameter(lin.weight) for lin in linears})
        self._write("streams.safetensors", {str(i): t.cpu() for i, t in enumerate(streams)})
        state = {"fingerprint": self.fingerprint, "done": k, "notes": notes}
        tmp = self.folder / ".state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.folder / "state.json")

    def restore(self, program: Program, runner: BlockRunner) -> tuple[int, dict]:
        """Load the finished blocks' weights and the saved stream; return (next block, notes). (0, {}) if none."""
        path = self.folder / "state.json"
        if not path.is_file():
            log.info("no checkpoint in %s; starting from block 0", self.folder)
            return 0, {}
        state = json.loads(path.read_text())
        if state.get("fingerprint") != self.fingerprint:
            raise UserError(f"the checkpoint in {self.folder} is from a different model, pass or calibration set; "
                            "run without --resume to start over")
        for k in range(state["done"] + 1):
            for name, tensor in load_file(str(self.folder / f"block_{k}.safetensors")).items():
                program.set_parameter(name, tensor)
        streams = load_file(str(self.folder / "streams.safetensors"))
        runner.set_streams([streams[str(i)].to(runner.device) for i in range(len(streams))])
        log.info("resumed from %s: blocks 0-%d already done", self.folder, state["done"])
        return state["done"] + 1, state.get("notes", {})

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def calibrate_blocks(program: Program, windows: torch.Tensor,
                     prune_stage: Callable[[int, list[Linear], dict[str, InputStats]], dict],
                     hessian: bool, true_sequential: bool = False, batch_size: int = 8, what: str = "calibration",
                     checkpoint: Checkpoint | None = None, resume: bool = False) -> dict:
    """For each block in order: collect statistics of each stage's inputs, let ``prune_stage`` prune it (it returns
    per-layer notes for the report), then move on with the pruned block's outputs. Returns the notes of every layer."""
    runner = BlockRunner(program, windows, batch_size)
    n_blocks = len(program.structure.blocks)
    start, notes = 0, {}
    if checkpoint is not None:
        if resume:
            start, notes = checkpoint.restore(program, runner)
        else:
            checkpoint.clear()
    progress = Progress(what, n_blocks, "blocks", every_s=10.0)
    for k in range(start, n_blocks):
        block_linears = []
        for stage in stages(program, k, true_sequential):
            if stage:
                notes.update(prune_stage(k, stage, collect(runner, k, stage, hessian)) or {})
                block_linears.extend(stage)
        runner.step(k)
        if checkpoint is not None:
            checkpoint.save(k, program, block_linears, runner.streams(), notes)
        release()  # the block's statistics and temporaries are gone: give their pages back while edits accumulate
        progress.update(k + 1)
    return notes
