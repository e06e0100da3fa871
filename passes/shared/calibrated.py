"""What the calibrated masking passes (Wanda, SparseGPT) share: options, and the loop over the calibration engine."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from nexus_export import distributed
from nexus_export.engine.calibration import InputStats, calibrate_blocks, open_checkpoint
from nexus_export.engine.pass_base import PassContext, option
from nexus_export.errors import UserError
from nexus_export.graph.program import Program
from passes.shared.mask_plan import plan_targets
from passes.shared.masking import MaskConfig, masking_changes
from passes.shared.sparsity import Target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibratedConfig(MaskConfig):
    true_sequential: bool = option(False, "wanda/sparsegpt: prune attention inputs, attention output, MLP inputs, "
                                          "MLP output in turn, each on its pruned predecessors")
    batch_size: int = option(8, "calibration windows per forward through a block", flag=False)

    def validate(self) -> None:
        super().validate()
        if self.batch_size < 1:
            raise UserError(f"batch_size must be positive, got {self.batch_size}")


def run_calibrated(program: Program, ctx: PassContext, cfg: CalibratedConfig,
                   prune: Callable[[Target, InputStats], dict], hessian: bool, what: str) -> dict:
    """Drive ``prune(target, stats)`` over every targeted linear, block by block; return the pass's ``changes``.

    ``prune`` returns per-layer extras for the report (e.g. SparseGPT's damping); they are merged into per_layer.
    """
    planned, plan_facts = plan_targets(program, ctx, cfg, calibrated=True, obs=hessian)
    targets = {t.name: t for t in planned}
    extras = calibrate_linears(program, ctx, list(targets), lambda name, stats: prune(targets[name], stats),
                               hessian=hessian, what=what, options=cfg.to_dict(), true_sequential=cfg.true_sequential,
                               batch_size=cfg.batch_size)
    changes = masking_changes(program, list(targets.values()), cfg.pattern_obj())
    for name, extra in extras.items():
        changes["per_layer"][name].update(extra)
    changes["calibration"] = calibration_facts(ctx, cfg.true_sequential)
    return {**changes, **plan_facts}


def calibrate_linears(program: Program, ctx: PassContext, names: list[str], work: Callable[[str, InputStats], dict],
                      hessian: bool, what: str, options: dict, true_sequential: bool = False, batch_size: int = 8
                      ) -> dict[str, dict]:
    """Call ``work(name, stats)`` for every linear in ``names`` (all inside decoder blocks), block by block on the
    calibration windows, with checkpoints and resume; returns what ``work`` returned for each, for the report."""
    windows = ctx.calibration_windows
    if windows is None or len(windows) == 0:
        raise UserError(f"{what} needs calibration data; give calibration settings (source, samples, seq_len)")
    wanted = set(names)
    outside = [n for n in names if program.structure.linears.get(n) is None
               or program.structure.linears[n].block is None]
    if outside:
        raise UserError(f"{what} works on linears inside decoder blocks only; remove {outside} from the schedule "
                        f"(use magnitude for the embeddings or the lm_head)")

    def stage(block: int, linears, stats: dict[str, InputStats]) -> dict:
        jobs = [lin for lin in linears if lin.name in wanted]
        owner = distributed.owners([lin.out_features * lin.in_features * (lin.in_features if hessian else 1)
                                    for lin in jobs])  # every job on this process in a single one
        mine = {lin.name for lin, rank in zip(jobs, owner) if rank == distributed.world().rank}
        notes = {}
        for i, lin in enumerate(linears):
            if lin.name in mine:
                notes[lin.name] = work(lin.name, stats[lin.name]) or {}
            if all(stats[later.name] is not stats[lin.name] for later in linears[i + 1:]):
                stats[lin.name].free()  # no later linear reads this input: its Hessian goes before the next one's math
        if distributed.world().active:
            notes = _share_results(program, jobs, owner, notes)
        return notes

    checkpoint, resumed = open_checkpoint(ctx, program, what, options, windows)
    with torch.no_grad():
        return calibrate_blocks(program, windows, stage, hessian=hessian, true_sequential=true_sequential,
                                batch_size=batch_size, what=what, checkpoint=checkpoint, resumed=resumed)


def _share_results(program: Program, jobs: list, owner: list[int], notes: dict) -> dict:
    """After a distributed stage: every rank receives the tensors each owner wrote for its linears (the weight and
    what travels beside it, e.g. GPTQ's scales) and every rank's notes, in the order of ``jobs``."""
    world = distributed.world()
    for rank in range(world.size):
        names = [n for lin, r in zip(jobs, owner) if r == rank
                 for n in (lin.weight, *program.store.companions(lin.weight))]
        sent = {n: program.parameter(n) for n in names} if rank == world.rank else None
        for name, tensor in distributed.broadcast_tensors(sent, rank).items():
            if rank != world.rank:
                program.set_parameter(name, tensor, dtype=tensor.dtype)
    merged: dict = {}
    for part in distributed.gather_objects(notes):
        merged.update(part)
    return {lin.name: merged[lin.name] for lin in jobs}


def calibration_facts(ctx: PassContext, true_sequential: bool) -> dict:
    """How a calibrated pass was calibrated, for its report."""
    windows = ctx.calibration_windows
    return {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "true_sequential": true_sequential}
