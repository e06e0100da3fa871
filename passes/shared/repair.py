"""Linear repair after removal: each removed span of sublayers replaced by a d x d map folded into the output
projection of the sublayer before it, fitted in closed form on calibration activations.

A span is a run of consecutive removed sublayers (in model order: block 0's attention, its MLP, block 1's attention,
...). With the sublayer P before it kept, the stream after P is ``r + y`` (r: the stream P read, y: the output of P's
output projection); the original model would go on through the span to ``s``. The repair is the T minimising
||r + y T - s||^2 over the calibration tokens, T = (y^T y + lambda I)^-1 y^T (s - r) in float64 (lambda a 1e-6 ridge of
the mean diagonal, for inputs that never vary), folded into P's output projection (W := T^T W, b := T^T b): the graph
gains no node. The fit walks the model in order on the pruned model's own stream, each span fitted after the
repairs before it (the spans' targets come from running the removed sublayers on that stream), so errors do not pile
up unseen. A span at the very start (no sublayer before it) stays unrepaired.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from nexus_export.errors import UserError
from nexus_export.graph.program import Program
from nexus_export.progress import Progress
from passes.shared.sublayers import KINDS, SublayerRunner, Unit, label

log = logging.getLogger(__name__)

RIDGE = 1e-6


@dataclass
class SpanRepair:
    """The fitted map of one span: the sublayer it is folded into and how well it fits."""

    after: Unit
    span: list[Unit]
    writer: str  # the linear whose matrix takes T
    map: torch.Tensor  # [d, d], float64
    residual: float  # ||r + y T - s||^2 / ||r + y - s||^2: 0 perfect, 1 no better than removing the span


def check_repairable(program: Program) -> None:
    """The repair folds into a sublayer's one output projection, whose output must reach the residual add as it is."""
    for sub in program.structure.sublayers:
        if sub.post_norm is not None or len(sub.writers) != 1:
            why = "a norm between its output and the residual add" if sub.post_norm else \
                f"{len(sub.writers)} output projections"
            raise UserError(f"--repair linear folds a map into each sublayer's output projection; the {sub.kind} of "
                            f"block {sub.block} has {why}, so it cannot be folded; remove without --repair")


@torch.no_grad()
def fit_repairs(program: Program, windows: torch.Tensor, removed: list[Unit], batch_size: int = 8
                ) -> list[SpanRepair]:
    """The repair of every removed span of ``program`` (the model before removal) on the calibration ``windows``."""
    check_repairable(program)
    runner = SublayerRunner(program, windows, batch_size)
    order: list[Unit] = [(k, kind) for k in range(runner.blocks) for kind in KINDS]
    gone = set(removed)
    writers = {(s.block, s.kind): s.writers[0] for s in program.structure.sublayers}
    streams = [runner.entering(m) for m in range(runner.batches)]
    repairs: list[SpanRepair] = []
    progress = Progress("repair", len(order), "sublayers", every_s=10.0)
    i = 0
    while i < len(order):
        unit = order[i]
        j = i + 1
        while j < len(order) and order[j] in gone:
            j += 1
        span = order[i + 1:j]
        if unit in gone:  # a span at the very start: nothing before it to fold into
            i += 1
        elif not span:
            streams = [runner.apply(unit, h, m) for m, h in enumerate(streams)]
            i += 1
        else:
            repair, streams = _fit_span(runner, unit, span, streams, writers[unit])
            repairs.append(repair)
            i = j
        progress.update(i)
    return repairs


def _fit_span(runner: SublayerRunner, unit: Unit, span: list[Unit], streams: list[torch.Tensor], writer: str
              ) -> tuple[SpanRepair, list[torch.Tensor]]:
    """The map of ``span`` folded after ``unit``, and the streams leaving ``unit`` with it applied."""
    d = streams[0].shape[-1]
    gram = torch.zeros(d, d, dtype=torch.float64)  # y^T y
    cross = torch.zeros(d, d, dtype=torch.float64)  # y^T (s - r)
    target_sq = 0.0  # ||s - r||^2
    outs = []  # y per micro-batch, in the stream's dtype
    for m, h in enumerate(streams):
        after = runner.apply(unit, h, m)
        x = after
        for removed in span:
            x = runner.apply(removed, x, m)
        y = (after - h).reshape(-1, d)
        target = (x - h).reshape(-1, d).double()
        gram += y.double().T @ y.double()
        cross += y.double().T @ target
        target_sq += float((target * target).sum())
        outs.append(y)
        del after, x, target
    ridge = RIDGE * float(gram.diagonal().mean()) + 1e-12
    t = torch.linalg.solve(gram + ridge * torch.eye(d, dtype=torch.float64), cross)
    # ||y T - (s - r)||^2 and ||y - (s - r)||^2 from the sums alone
    after_fit = float((t * (gram @ t)).sum() - 2 * (t * cross).sum()) + target_sq
    plain = float(gram.diagonal().sum() - 2 * cross.diagonal().sum()) + target_sq
    repair = SpanRepair(unit, span, writer, t, max(after_fit, 0.0) / plain if plain else 0.0)
    log.info("repair: %s after %s, residual %.3f of plain removal's", ", ".join(map(label, span)), label(unit),
             repair.residual)
    t_stream = t.to(streams[0].dtype)
    return repair, [h + (y @ t_stream).reshape(h.shape) for h, y in zip(streams, outs)]


def fold(program: Program, repairs: list[SpanRepair]) -> None:
    """Fold each repair into its output projection: y T = x (T^T W)^T + T^T b (in place on ``program``'s store)."""
    for repair in repairs:
        lin = program.linear(repair.writer)
        t = repair.map
        program.set_weight(lin.name, (t.T @ program.weight(lin.name, torch.float64)).to(torch.float32))
        if lin.bias is not None:
            program.set_parameter(lin.bias, (program.parameter(lin.bias, torch.float64) @ t).to(torch.float32))
