"""TEAL's greedy allocation of activation sparsity inside a block: which inputs take more zeros, which fewer.

Uniform allocation zeroes the same fraction of every input. The greedy one starts a block with nothing zeroed and
raises the block's average sparsity (weighted by each input's width) one step at a time, each step taken by the
input whose raise costs the least block-output error (squared distance from the block's own output with nothing
zeroed, on a few calibration windows), until the average reaches the target. Every block then zeroes the same share of its input entries as
the uniform allocation does, spread where it hurts least.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import fx

from nexus_export.graph.blocks import Part

aten = torch.ops.aten
MAX_LEVEL = 0.95  # no input is thresholded past this


def thresholded_block(part: Part, inputs: list[int]) -> Part:
    """``part`` (a block graph returning the stream and its linear inputs) with ``where(|x| >= t_i, x, 0)`` in front
    of the linears reading each of ``inputs`` (indices among the linear inputs), the thresholds t_i taken as trailing
    0-dim tensor arguments."""
    graph = fx.Graph()
    output = graph.graph_copy(part.module.graph, {})
    graph.output(output)
    out_node = graph.output_node()
    values = list(out_node.args[0])
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    limits = []
    for i in range(len(inputs)):
        with graph.inserting_after(last):
            last = graph.placeholder(f"threshold_{i}")
        limits.append(last)
    for j, limit in zip(inputs, limits):
        x = values[1 + j]
        readers = [user for user in x.users if user is not out_node]
        with graph.inserting_after(x):
            size = graph.call_function(aten.abs.default, (x,))
        with graph.inserting_after(size):
            large = graph.call_function(aten.ge.Tensor, (size, limit))
        with graph.inserting_after(large):
            kept = graph.call_function(aten.where.ScalarOther, (large, x, 0.0))
        for user in readers:
            user.replace_input_with(x, kept)
    graph.lint()
    return part.with_graph(graph)


def greedy_levels(block_error: Callable[[list[float]], float], widths: list[int], target: float,
                  step: float = 0.05) -> list[float]:
    """The sparsity of each input (of the given ``widths``) whose width-weighted mean is ``target``, chosen greedily:
    each round raises the mean by ``step`` (the last round by what is left) through the one input whose raise gives
    the lowest ``block_error(levels)`` (a narrow input's level rises more for the same step of the mean); no input goes
    past MAX_LEVEL."""
    levels = [0.0] * len(widths)
    total = float(sum(widths))

    def mean(ls: list[float]) -> float:
        return sum(w * level for w, level in zip(widths, ls)) / total

    while mean(levels) < target - 1e-9:
        best: tuple[float, list[float]] | None = None
        for i, width in enumerate(widths):
            room = min(step, target - mean(levels)) * total / width
            room = min(room, MAX_LEVEL - levels[i])
            if room <= 1e-9:
                continue
            trial = list(levels)
            trial[i] += room
            error = block_error(trial)
            if best is None or error < best[0]:
                best = (error, trial)
        if best is None:  # every input at MAX_LEVEL: the target cannot be reached
            break
        levels = best[1]
    return [round(level, 9) for level in levels]  # sums of steps carry float error (0.05 x 10 = 0.49999999999999994)
