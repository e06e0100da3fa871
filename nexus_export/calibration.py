"""The calibration engine shared by every data-driven pass.

The program's graph is cut at block boundaries: a *prefix* graph computes, from the token ids, the residual stream
entering block 0 and every side value the blocks read (attention mask, rotary tables, sizes); each *block* graph maps
(stream, side values) to the stream leaving the block, and also returns the input activation of every linear in the
block, once per distinct input node (q, k and v share one). Blocks run one after another over all calibration
windows, so block k+1 sees the outputs of the already-pruned block k, and memory holds one block's activations.

Statistics are accumulated streaming in float64: token count, per-column sum of squares (Wanda) and, when asked for,
X^T X (SparseGPT's Hessian).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import fx

from .errors import UserError
from .program import Program
from .progress import Progress
from .structure import Linear, ancestors, block_boundaries, op_name

log = logging.getLogger(__name__)

LINEAR_INPUT_ARG = {"linear": 0, "addmm": 1, "mm": 0}


class InputStats:
    """Streaming statistics of one linear input X [tokens, in_features]."""

    def __init__(self, in_features: int, hessian: bool):
        self.tokens = 0
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64)
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
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


@dataclass
class BlockGraphs:
    """The program cut at block boundaries (see module docstring)."""

    prefix: fx.GraphModule
    blocks: list[fx.GraphModule]
    side_index: list[list[int]]  # per block: which prefix side outputs it takes, in its placeholder order
    linear_inputs: list[dict[str, int]] = field(default_factory=list)  # per block: linear name -> extra output index
    residuals: list[dict[str, int]] = field(default_factory=list)  # per block: sublayer kind -> output index of the
    # stream right after that sublayer's residual add
    suffix: fx.GraphModule | None = None  # (stream after the last block, *its side values) -> logits
    suffix_side_index: list[int] = field(default_factory=list)


def _copy(root: fx.GraphModule, nodes: Iterable[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node]) -> fx.GraphModule:
    """A GraphModule of ``nodes`` (in order) with ``inputs`` as placeholders and a tuple of ``outputs``; the weights
    they read (get_attr) are shared with ``root``, not copied."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(inputs):
        env[node] = graph.placeholder(f"in_{i}_{node.name}")

    def lookup(arg: fx.Node) -> fx.Node:
        if arg not in env and arg.op == "get_attr":
            env[arg] = graph.get_attr(arg.target)
        return env[arg]

    for node in nodes:
        if node not in env:
            env[node] = graph.node_copy(node, lookup)
    graph.output(tuple(env[o] for o in outputs))
    graph.lint()
    return fx.GraphModule(root, graph)


def cut_blocks(program: Program) -> BlockGraphs:
    """Partition the program's graph into a prefix, one graph per decoder block, and a suffix."""
    gm = program.module()
    order = list(gm.graph.nodes)
    bounds = block_boundaries(order, program.structure, is_weight=lambda n: n.op == "get_attr")
    all_sides: list[fx.Node] = []
    for n in (n for side in bounds.sides for n in side):
        if n not in all_sides:
            all_sides.append(n)
    suffix_nodes, suffix_sides = _suffix_region(order, bounds)
    all_sides += [n for n in suffix_sides if n not in all_sides]
    output_node = next(n for n in order if n.op == "output")
    logits = output_node.args[0][0] if isinstance(output_node.args[0], (tuple, list)) else output_node.args[0]
    suffix = _copy(gm, [n for n in order if n in suffix_nodes], [bounds.outputs[-1], *suffix_sides], [logits])

    wanted = [bounds.streams[0], *all_sides]
    needed = set(wanted).union(*(ancestors(n) for n in wanted))
    placeholders = [n for n in order if n.op == "placeholder"]
    prefix = _copy(gm, [n for n in order if n in needed and n.op != "placeholder"], placeholders, wanted)

    by_name = {n.name: n for n in order}
    residual_of_block: list[dict[str, fx.Node]] = [{} for _ in bounds.members]
    for sub, add_name in zip(program.structure.sublayers, program.structure.residual_adds):
        residual_of_block[sub.block][sub.kind] = by_name[add_name]
    weight_to_linear = {lin.weight: lin for lin in program.structure.in_blocks()}
    graphs = BlockGraphs(prefix=prefix, blocks=[], side_index=[], suffix=suffix,
                         suffix_side_index=[all_sides.index(n) for n in suffix_sides])
    for k, nodes in enumerate(bounds.members):
        extra, lin_inputs = _linear_inputs(nodes, weight_to_linear)
        residual = {}
        for kind, node in residual_of_block[k].items():
            extra.append(node)
            residual[kind] = len(extra)  # index into the block outputs, where 0 is the stream leaving it
        graphs.blocks.append(_copy(gm, nodes, [bounds.streams[k], *bounds.sides[k]], [bounds.outputs[k], *extra]))
        graphs.side_index.append([all_sides.index(n) for n in bounds.sides[k]])
        graphs.linear_inputs.append(lin_inputs)
        graphs.residuals.append(residual)
    return graphs


def _suffix_region(order: list[fx.Node], bounds) -> tuple[set[fx.Node], list[fx.Node]]:
    """The nodes after the last block that produce the logits (final norm, lm_head), and the values they read from
    before the blocks (besides the last block's output)."""
    output_node = next(n for n in order if n.op == "output")
    before_blocks = ancestors(bounds.streams[0]) | {bounds.streams[0]}
    in_blocks = set().union(*bounds.members)
    region, todo = set(), list(output_node.all_input_nodes)
    while todo:
        cur = todo.pop()
        if cur in region or cur is bounds.outputs[-1] or cur in in_blocks or cur in before_blocks \
                or cur.op == "placeholder":
            continue
        region.add(cur)
        todo.extend(cur.all_input_nodes)
    sides: list[fx.Node] = []
    for node in region:
        for inp in node.all_input_nodes:
            if inp not in region and inp is not bounds.outputs[-1] and inp.op != "get_attr" and inp not in sides:
                sides.append(inp)
    return region, sides


def _linear_inputs(nodes: list[fx.Node], weight_to_linear: dict) -> tuple[list[fx.Node], dict[str, int]]:
    """The distinct input activations of a block's linears (q, k and v share one) and each linear's index among them."""
    extra: list[fx.Node] = []
    index: dict[str, int] = {}
    for node in nodes:
        op = op_name(node)
        if op not in LINEAR_INPUT_ARG or len(node.args) < 2:
            continue
        weight = node.args[-1] if op in ("addmm", "mm") else node.args[1]
        lin = weight_to_linear.get(getattr(weight, "target", None)) if isinstance(weight, fx.Node) else None
        if lin is None:
            continue
        x = node.args[LINEAR_INPUT_ARG[op]]
        if x not in extra:
            extra.append(x)
        index[lin.name] = extra.index(x)
    return extra, index


@dataclass
class CalibrationState:
    """Activations between blocks: the stream entering the current block and the prefix's side values, per batch."""

    streams: list[torch.Tensor]
    sides: list[tuple]


class Calibrator:
    """Run calibration windows block by block; passes prune each block between statistics and its outputs."""

    def __init__(self, program: Program, windows: torch.Tensor, batch_size: int = 8):
        self.program = program
        self.graphs = cut_blocks(program)
        self.batch_size = batch_size
        with torch.no_grad():
            streams, sides = [], []
            for start in range(0, len(windows), batch_size):
                ids = windows[start:start + batch_size]
                out = self.graphs.prefix(ids, torch.ones_like(ids))
                streams.append(out[0])
                sides.append(tuple(out[1:]))
        self.state = CalibrationState(streams, sides)

    def block_inputs(self, k: int, i: int, stream: torch.Tensor | None = None) -> tuple:
        """Block k's inputs for batch i: the current stream (or ``stream``) and batch i's side values."""
        stream = self.state.streams[i] if stream is None else stream
        side = self.state.sides[i]
        return (stream, *(side[j] for j in self.graphs.side_index[k]))

    def block_output(self, k: int, index: int) -> fx.GraphModule:
        """Block k's graph cut down to what its output ``index`` needs (e.g. the stream after the attention sublayer,
        without the MLP after it): returns a 1-tuple, called like the whole block."""
        whole = self.graphs.blocks[k]
        graph = copy.deepcopy(whole.graph)
        output = next(n for n in graph.nodes if n.op == "output")
        output.args = ((output.args[0][index],),)
        graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
        return fx.GraphModule(whole, graph)

    @torch.no_grad()
    def collect(self, k: int, linears: list[Linear], hessian: bool) -> dict[str, InputStats]:
        """Statistics of the inputs of ``linears`` (all in block k) over every calibration window."""
        index = self.graphs.linear_inputs[k]
        missing = [lin.name for lin in linears if lin.name not in index]
        if missing:
            raise UserError(f"no input found in the graph of block {k} for {missing}")
        by_input: dict[int, InputStats] = {}
        for lin in linears:
            by_input.setdefault(index[lin.name], InputStats(lin.in_features, hessian))
        block = self.graphs.blocks[k]
        for i in range(len(self.state.streams)):
            out = block(*self.block_inputs(k, i))
            for j, stats in by_input.items():
                if not torch.isfinite(out[1 + j]).all():
                    names = [lin.name for lin in linears if index[lin.name] == j]
                    raise UserError(f"NaN or Inf in the input of {', '.join(names)} (block {k}) during calibration; "
                                    "check the model's weights and dtype (fp16 overflow?) or the calibration text")
                stats.add(out[1 + j])
        return {lin.name: by_input[index[lin.name]] for lin in linears}

    @torch.no_grad()
    def step(self, k: int, visit: Callable[[torch.Tensor, tuple], None] | None = None) -> None:
        """Run block k on every batch, call ``visit(stream_in, outputs)`` (outputs[0] is the stream leaving the
        block; ``graphs.residuals[k]`` indexes the stream after each sublayer), and move the stream on."""
        block = self.graphs.blocks[k]
        streams = []
        for i in range(len(self.state.streams)):
            out = block(*self.block_inputs(k, i))
            if visit is not None:
                visit(self.state.streams[i], out)
            streams.append(out[0])
        self.state.streams = streams
        if not all(torch.isfinite(s).all() for s in self.state.streams):
            raise UserError(f"NaN or Inf in the output of block {k} ({self.program.structure.blocks[k]}) during "
                            "calibration; the pruned weights of that block broke the model")

    def advance(self, k: int) -> None:
        """Replace the stream by block k's outputs (computed with its current, possibly pruned, weights)."""
        self.step(k)

    def logits(self, stream: torch.Tensor, i: int) -> torch.Tensor:
        """The suffix (final norm, lm_head) applied to the stream leaving the last block, for batch i."""
        side = self.state.sides[i]
        return self.graphs.suffix(stream, *(side[j] for j in self.graphs.suffix_side_index))[0]


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
        self._write(f"block_{k}.safetensors", {lin.name: program.weight(lin.name) for lin in linears})
        self._write("streams.safetensors", {str(i): t for i, t in enumerate(streams)})
        state = {"fingerprint": self.fingerprint, "done": k, "notes": notes}
        tmp = self.folder / ".state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.folder / "state.json")

    def restore(self, program: Program, calibrator: "Calibrator") -> tuple[int, dict]:
        """Load the finished blocks' weights and the saved stream; return (next block, notes). (0, {}) if none."""
        path = self.folder / "state.json"
        if not path.is_file():
            log.info("no checkpoint in %s; starting from block 0", self.folder)
            return 0, {}
        state = json.loads(path.read_text())
        if state.get("fingerprint") != self.fingerprint:
            raise UserError(f"the checkpoint in {self.folder} is from a different model, pass or calibration set; "
                            "run without --resume to start over")
        with torch.no_grad():
            for k in range(state["done"] + 1):
                for name, tensor in load_file(str(self.folder / f"block_{k}.safetensors")).items():
                    program.weight(name).copy_(tensor)
        streams = load_file(str(self.folder / "streams.safetensors"))
        calibrator.state.streams = [streams[str(i)] for i in range(len(streams))]
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
    calibrator = Calibrator(program, windows, batch_size)
    n_blocks = len(program.structure.blocks)
    start, notes = 0, {}
    if checkpoint is not None:
        if resume:
            start, notes = checkpoint.restore(program, calibrator)
        else:
            checkpoint.clear()
    progress = Progress(what, n_blocks, "blocks", every_s=10.0)
    for k in range(start, n_blocks):
        block_linears = []
        for stage in stages(program, k, true_sequential):
            if stage:
                notes.update(prune_stage(k, stage, calibrator.collect(k, stage, hessian)) or {})
                block_linears.extend(stage)
        calibrator.advance(k)
        if checkpoint is not None:
            checkpoint.save(k, program, block_linears, calibrator.state.streams, notes)
        progress.update(k + 1)
    return notes
