"""Activation sparsity: zero the small entries of the hidden states entering chosen linears (TEAL, Liu et al. 2024;
WINA, weight-informed, 2025).

Before -> after: the graph gains ``where(|x| >= t, x, 0)`` in front of each chosen linear input (q, k and v read one
input and share one threshold, as do gate and up); no weight changes. Each t is placed on the calibration windows so
that the target fraction of that input's scores lies below it, on the activations of the model as given (TEAL
calibrates on the dense model the same way). The score of an entry x_i is |x_i| (criterion ``magnitude``, TEAL) or
|x_i| * c_i (``wina``), c_i the norm of the weight column x_i multiplies (over every linear reading the input): an
entry that moves the output little is zeroed first. WINA's t becomes one limit per column, t / c_i, kept as a float32
parameter of the block. The ONNX model carries the thresholds as constants (Abs, GreaterOrEqual, Where).
Invariant: sparsity 0 leaves the program as it is. Speed needs a kernel that skips the zeroed inputs' weight rows;
onnxruntime has none, so this pass saves multiply-adds only on paper (the report says how many).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import fx

from nexus_export.engine.pass_base import Pass, PassConfig, PassContext, option
from nexus_export.errors import UserError
from nexus_export.graph.graph_edit import add_parameter, call, copy_program, rebuild
from nexus_export.graph.program import Program
from nexus_export.graph.runner import BlockRunner
from nexus_export.graph.structure import LINEAR_INPUT_ARG, op_name
from nexus_export.progress import Progress
from passes.shared.activation_greedy import MAX_LEVEL, greedy_levels, thresholded_block

log = logging.getLogger(__name__)

aten = torch.ops.aten
IN_BLOCK_ROLES = ("attn_in", "attn_out", "mlp_in", "mlp_out")
SAMPLE_VALUES = 1 << 24  # values of one input kept to place its threshold (a seeded random sample beyond that)
MIN_SIDE = 64  # calibration values a threshold needs on each side of it


@dataclass(frozen=True)
class ActivationConfig(PassConfig):
    sparsity: float = option(0.4, "then zero this fraction of the hidden states entering the linears, by calibrated "
                                  "thresholds (with --method activation: that pass alone)")
    roles: list | None = option(None, "roles whose linear inputs get thresholds, e.g. mlp_in,mlp_out (default: all "
                                      "four)")
    batch_size: int = option(8, "calibration windows per forward through a block", flag=False)
    criterion: str = option("magnitude", "what a threshold compares: magnitude (|x_i|, TEAL; default) or wina "
                                         "(|x_i| times the norm of the weight column x_i multiplies)",
                            choices=("magnitude", "wina"))
    allocation: str = option("uniform", "uniform: the target in every input (default); greedy: per block, more where "
                                        "it hurts less", choices=("uniform", "greedy"))
    greedy_windows: int = option(4, "calibration windows the greedy search measures block errors on", flag=False)
    greedy_step: float = option(0.05, "how much one greedy round raises the block's mean sparsity", flag=False)

    def validate(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise UserError(f"activation sparsity must be in [0, 1), e.g. 0.4; got {self.sparsity}")
        if self.sparsity > MAX_LEVEL:
            raise UserError(f"activation sparsity {self.sparsity} is more than any input is thresholded to "
                            f"({MAX_LEVEL}); choose at most {MAX_LEVEL}")
        if self.criterion not in ("magnitude", "wina"):
            raise UserError(f"activation criterion must be magnitude or wina, got {self.criterion!r}")
        if self.allocation not in ("uniform", "greedy"):
            raise UserError(f"activation allocation must be uniform or greedy, got {self.allocation!r}")
        if self.greedy_windows < 1 or not 0.0 < self.greedy_step <= 0.5:
            raise UserError(f"greedy_windows must be positive and greedy_step in (0, 0.5], got {self.greedy_windows} "
                            f"and {self.greedy_step}")
        roles = self.chosen_roles()
        unknown = [r for r in roles if r not in IN_BLOCK_ROLES]
        if unknown or not roles:
            raise UserError(f"activation roles {unknown or roles} are not roles of linears in the blocks; choose from "
                            f"{', '.join(IN_BLOCK_ROLES)}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be positive, got {self.batch_size}")

    def chosen_roles(self) -> list[str]:
        return list(IN_BLOCK_ROLES) if self.roles is None else [str(r) for r in self.roles]


@dataclass
class Threshold:
    """One input of one block: the linears reading it, its threshold and the share of calibration values below it."""

    block: int
    linears: list[str]
    value: float
    calibration_sparsity: float
    columns: torch.Tensor | None = None  # wina: the column norms c_i; x_i is kept where |x_i| * c_i >= value

    def limits(self) -> torch.Tensor | float:
        """What |x| is compared with: the value, or per column (see column_limits)."""
        return self.value if self.columns is None else column_limits(self.value, self.columns)


def column_limits(value: float, columns: torch.Tensor) -> torch.Tensor:
    """WINA's limits on |x_i|: value / c_i (0 stays 0; a dead column's limit is huge, so its entries, which move
    nothing, are zeroed)."""
    return value / columns.clamp_min(torch.finfo(torch.float32).tiny)


class ActivationPass(Pass):
    name = "activation"
    config_class = ActivationConfig
    flag_prefix = "activation-"  # it runs alone or after another method: --activation-sparsity, ...
    needs_calibration = True
    sparsifies_activations = True

    def hf_refusal(self) -> str | None:
        return "no Hugging Face class applies activation thresholds in front of its linears"

    def nudged(self, program: Program, factor: float) -> Program:
        return nudged(program, factor)

    def with_threshold(self, program: Program, threshold: float) -> Program:
        """``program`` with one fixed ``threshold`` in front of every input of the chosen roles (no calibration: the
        seed's global threshold)."""
        return insert_thresholds(program, [Threshold(block, names, float(threshold), 0.0)
                                           for block, names in input_groups(program, self.config.chosen_roles())])

    def check(self, program: Program) -> None:
        have = {lin.role for lin in program.structure.in_blocks()}
        missing = [r for r in self.config.chosen_roles() if r not in have]
        if missing:
            raise UserError(f"activation: the model has no {', '.join(missing)} linears; its blocks have "
                            f"{', '.join(r for r in IN_BLOCK_ROLES if r in have)}")

    def check_calibration(self, program: Program, windows: torch.Tensor | None) -> None:
        """Enough calibration values to place every threshold with MIN_SIDE values on each side of it."""
        cfg: ActivationConfig = self.config
        if windows is None or len(windows) == 0:
            raise UserError("activation needs calibration data to place its thresholds; give calibration settings "
                            "(source, samples, seq_len)")
        side = min(cfg.sparsity, 1.0 - cfg.sparsity)
        if side == 0:
            return
        narrowest = min((lin.in_features for lin in program.structure.in_blocks() if lin.role in cfg.chosen_roles()),
                        default=1)
        needed = math.ceil(MIN_SIDE / (side * narrowest))
        if windows.numel() < needed:
            raise UserError(f"activation sparsity {cfg.sparsity}: {windows.numel()} calibration tokens are too few to "
                            f"place a threshold; at least {needed} are needed (raise --calib-samples or --seq-len)")

    def apply(self, program: Program, ctx: PassContext) -> tuple[Program, dict]:
        cfg: ActivationConfig = self.config
        self.check_calibration(program, ctx.calibration_windows)
        changes = {"target_sparsity": cfg.sparsity, "roles": cfg.chosen_roles(), "criterion": cfg.criterion,
                   "allocation": cfg.allocation,
                   "inputs": 0, "calibration_sparsity": 0.0, "thresholds": {}}
        if cfg.sparsity == 0:
            return program, changes
        thresholds = place_thresholds(program, ctx.calibration_windows, cfg.sparsity, cfg.chosen_roles(),
                                      cfg.batch_size, cfg.allocation, cfg.greedy_windows, cfg.greedy_step,
                                      cfg.criterion)
        edited = insert_thresholds(program, thresholds)
        widths = [program.linear(t.linears[0]).in_features for t in thresholds]
        changes.update(
            inputs=len(thresholds),
            calibration_sparsity=round(sum(w * t.calibration_sparsity for w, t in zip(widths, thresholds))
                                       / sum(widths), 6),
            thresholds={t.linears[0]: {"block": t.block, "linears": t.linears, "threshold": t.value,
                                       "calibration_sparsity": round(t.calibration_sparsity, 6)} for t in thresholds})
        return edited, changes


@torch.no_grad()
def place_thresholds(program: Program, windows: torch.Tensor, sparsity: float, roles: list[str],
                     batch_size: int = 8, allocation: str = "uniform", greedy_windows: int = 4,
                     greedy_step: float = 0.05, criterion: str = "magnitude") -> list[Threshold]:
    """For every input of a linear with one of ``roles``: the score (see the module docstring) below which its share
    of calibration values lie (exact over up to SAMPLE_VALUES values per input, a seeded uniform sample of them beyond
    that). The share is ``sparsity`` for every input (uniform), or per input as TEAL's greedy allocation chooses it in
    each block, with the same width-weighted mean (see activation_greedy)."""
    runner = BlockRunner(program, windows, batch_size)
    by_block: dict[int, list[list[str]]] = {}
    for block, names in input_groups(program, roles):
        by_block.setdefault(block, []).append(names)
    per_batch = SAMPLE_VALUES // max(1, math.ceil(len(windows) / batch_size))
    generator = torch.Generator().manual_seed(0)
    n_blocks = len(program.structure.blocks)
    found: list[Threshold] = []
    progress = Progress(f"activation thresholds ({allocation})", n_blocks, "blocks")
    for k in range(n_blocks):
        groups = {runner.graphs.linear_inputs[k][names[0]]: names for names in by_block.get(k, [])}
        columns = {j: column_norms(program, names) for j, names in groups.items()} if criterion == "wina" else {}
        on_device = {j: c.to(runner.device) for j, c in columns.items()}
        samples: dict[int, list[torch.Tensor]] = {j: [] for j in groups}
        entering = [runner.inputs(k, m) for m in range(math.ceil(min(greedy_windows, len(windows)) / runner.micro))] \
            if allocation == "greedy" else []

        def keep(stream_in: torch.Tensor, out: tuple) -> None:
            for j in groups:
                x = out[1 + j].abs().float()
                x = (x * on_device[j] if j in on_device else x).reshape(-1)
                if x.numel() > per_batch:
                    x = x[torch.randint(0, x.numel(), (per_batch,), generator=generator).to(x.device)]
                samples[j].append(x.cpu())

        runner.step(k, keep, [0, *(1 + j for j in groups)])
        values = {j: torch.cat(samples.pop(j)) for j in groups}
        levels = dict.fromkeys(groups, sparsity)
        if allocation == "greedy":
            widths = [program.linear(names[0]).in_features for names in groups.values()]
            chosen_levels = greedy_levels(_block_error(runner, k, list(groups), values, entering, on_device), widths,
                                          sparsity, greedy_step)
            levels = dict(zip(groups, chosen_levels))
        for j, names in groups.items():
            value = _quantile(values[j], levels[j])
            zeroed = (values[j] < value) | (values[j] == 0)  # a ReLU's exact zeros count even below a zero threshold
            found.append(Threshold(k, names, value, float(zeroed.double().mean()), columns.get(j)))
        progress.update(k + 1)
    return found


def _quantile(values: torch.Tensor, level: float) -> float:
    """The value with ``level`` of ``values`` below it (0 for level 0: nothing is zeroed)."""
    below = int(level * values.numel())
    return float(torch.kthvalue(values, below + 1).values) if below else 0.0


GREEDY_SEARCH_VALUES = 1 << 20  # sorted values per input the greedy search reads its candidate thresholds from


def _block_error(runner: BlockRunner, k: int, inputs: list[int], values: dict[int, torch.Tensor],
                 entering: list[tuple], columns: dict[int, torch.Tensor]):
    """``error(levels)``: the squared distance of block k's output, with ``inputs`` thresholded at those levels, from
    its output with nothing thresholded, on the ``entering`` micro-batches (stream and side values). ``values`` are
    the inputs' scores; with ``columns`` (wina) a score's limit on |x| is per column (Threshold.limits)."""
    part = thresholded_block(runner.graphs.blocks[k], inputs)
    weights = runner.load(runner.graphs.blocks[k])
    ordered = {j: values[j][:: max(1, values[j].numel() // GREEDY_SEARCH_VALUES)].sort().values for j in inputs}

    def outputs(levels: list[float]) -> list[torch.Tensor]:
        limits = []
        for j, level in zip(inputs, levels):
            below = min(int(level * ordered[j].numel()), ordered[j].numel() - 1)
            value = float(ordered[j][below]) if below else 0.0
            limits.append(column_limits(value, columns[j]) if j in columns
                          else torch.tensor(value, device=runner.device))
        return [part(weights, *batch, *limits)[0] for batch in entering]

    dense = outputs([0.0] * len(inputs))

    def error(levels: list[float]) -> float:
        return sum(float(((out - ref) ** 2).sum()) for out, ref in zip(outputs(levels), dense))

    return error


def input_groups(program: Program, roles: list[str]) -> list[tuple[int, list[str]]]:
    """(block, linears) for every distinct input of a linear with one of ``roles``: linears reading one tensor (q, k
    and v; gate and up) form one group."""
    nodes = {n.name: n for n in program.exported.graph.nodes}
    groups: dict[str, tuple[int, list[str]]] = {}
    for lin in program.structure.in_blocks():
        if lin.role in roles:
            node = nodes[lin.node]
            x = node.args[LINEAR_INPUT_ARG[op_name(node)]]
            groups.setdefault(x.name, (lin.block, []))[1].append(lin.name)
    return list(groups.values())


def column_norms(program: Program, names: list[str]) -> torch.Tensor:
    """||W[:, i]|| over the rows of every linear in ``names`` (which read one input), in float32 (summed in float64)."""
    total = sum(program.weight(name, torch.float64).pow(2).sum(dim=0) for name in names)
    return total.sqrt().float()


def nudged(program: Program, factor: float) -> Program:
    """``program`` with every activation threshold multiplied by ``factor`` (the literal of each magnitude threshold,
    every WINA limit parameter); the given one unchanged. A hard threshold is discontinuous: scoring the program with
    thresholds nudged by a rounding-sized factor measures how far rounding alone moves its perplexity."""
    exported = copy_program(program.exported)
    scaled = 0
    for node in exported.graph.nodes:
        if node.target == aten.ge.Scalar and getattr(node.args[0], "target", None) == aten.abs.default:
            node.args = (node.args[0], float(node.args[1]) * factor)
            scaled += 1
    store = program.store.fork()
    for name in program.weight_names():
        if name.endswith(".activation_limit"):
            store.set(name, program.store.get(name) * factor)
            scaled += 1
    if not scaled:
        raise ValueError("nudged: the program has no activation thresholds")
    return program.derive(rebuild(exported, store), store)


def insert_thresholds(program: Program, thresholds: list[Threshold]) -> Program:
    """A new program whose chosen linears read ``where(|x| >= t, x, 0)`` instead of x (the given one unchanged); with
    column norms, t is a float32 parameter of per-column limits named after the first linear."""
    exported = copy_program(program.exported)
    graph = exported.graph
    nodes = {n.name: n for n in graph.nodes}
    store = program.store.fork()
    for t in thresholds:
        readers = [nodes[program.linear(name).node] for name in t.linears]
        x = readers[0].args[LINEAR_INPUT_ARG[op_name(readers[0])]]
        limit = t.limits()
        if isinstance(limit, torch.Tensor):
            target = program.linear(t.linears[0]).weight.rsplit(".", 1)[0] + ".activation_limit"
            limit = add_parameter(exported, store, target, limit, dtype=torch.float32)
        with graph.inserting_after(x):
            size = call(graph, aten.abs.default, (x,), readers[0])
        with graph.inserting_after(size):
            large = call(graph, aten.ge.Tensor if isinstance(limit, fx.Node) else aten.ge.Scalar, (size, limit),
                         readers[0])
        with graph.inserting_after(large):
            kept = call(graph, aten.where.ScalarOther, (large, x, 0.0), readers[0])
        for node in readers:
            node.replace_input_with(x, kept)
    log.info("activation: thresholds in front of %d inputs", len(thresholds))
    return program.derive(rebuild(exported, store, retrace=True), store)
