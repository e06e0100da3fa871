"""How sparse the inputs of a program's linears are on given windows: the exact zeros each linear reads.

An activation-sparsity pass promises a fraction of zeros in the inputs it thresholds; this measures what the model
really reads, on any windows (the evaluation windows for the report), and what that saves: a zero in the input of a
linear with O outputs is O multiply-adds a sparse kernel could skip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nexus_export.graph.program import Program
from nexus_export.graph.runner import BlockRunner
from nexus_export.progress import Progress


@dataclass
class InputSparsity:
    """One distinct linear input in one block: the linears reading it, its zeros and values counted."""

    block: int
    linears: list[str]
    zeros: int = 0
    values: int = 0
    outputs: int = 0  # summed out_features of the linears reading it: multiply-adds per input value

    @property
    def sparsity(self) -> float:
        return self.zeros / self.values if self.values else 0.0


@torch.no_grad()
def input_sparsity(program: Program, windows: torch.Tensor, batch_size: int = 8) -> list[InputSparsity]:
    """Exact zeros in the input of every linear in the decoder blocks over ``windows``, per distinct input."""
    runner = BlockRunner(program, windows, batch_size)
    linears = {lin.name: lin for lin in program.structure.in_blocks()}
    found: list[InputSparsity] = []
    progress = Progress("activation sparsity", len(program.structure.blocks), "blocks")
    for k in range(len(program.structure.blocks)):
        groups: dict[int, InputSparsity] = {}
        for name, j in runner.graphs.linear_inputs[k].items():
            entry = groups.setdefault(j, InputSparsity(k, []))
            entry.linears.append(name)
            entry.outputs += linears[name].out_features

        def count(stream_in: torch.Tensor, out: tuple) -> None:
            for j, entry in groups.items():
                x = out[1 + j]
                entry.zeros += int((x == 0).sum())
                entry.values += x.numel()

        runner.step(k, count, [0, *(1 + j for j in groups)])
        found.extend(groups.values())
        progress.update(k + 1)
    return found


def summarize_inputs(inputs: list[InputSparsity]) -> dict:
    """Per input (named by its first linear) and overall: the mean sparsity over input values, and the share of the
    blocks' linear multiply-adds whose input is zero (what a sparse kernel would skip)."""
    values = sum(e.values for e in inputs)
    macs = sum(e.values * e.outputs for e in inputs)
    return {
        "sparsity": sum(e.zeros for e in inputs) / values if values else 0.0,
        "skippable_macs": sum(e.zeros * e.outputs for e in inputs) / macs if macs else 0.0,
        "per_input": {e.linears[0]: {"block": e.block, "linears": e.linears, "sparsity": round(e.sparsity, 6)}
                      for e in inputs},
    }
