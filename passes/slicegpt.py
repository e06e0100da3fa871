"""SliceGPT: rotate the residual stream into its principal components and slice off the weakest directions.

Before -> after: the norms are fused (scale-free RMSNorm over the original width; the lm_head untied), then at every
point where the stream changes (the stream entering block 0, the output of every residual add) the stream is rotated
by the eigenvectors of its calibration covariance and cut to the ``d`` strongest directions. Every linear reading the
stream gets ``d`` input columns, every linear writing to it ``d`` output rows, the embeddings ``d`` columns, and each
residual connection a [d, d] shortcut matrix. ``d = floor((1 - slicing) * D)`` rounded down to a multiple of
``round_to``. Invariant: ``slicing=0`` leaves the logits unchanged (to float rounding).

Blocks are processed in order; each principal-component analysis sees the stream produced by the already rotated and
sliced earlier sublayers (the calibration program carries a projection Q_d Q_d^T at each finished point, which computes
exactly what the sliced program will). The kept bases wait in the weight store (spilled past its budget: a deep
model's bases would fill the memory) and are then aligned (see ``nexus_export.graph.slicing.align_bases``), so shortcut
matrices are as near identity as the subspaces allow and absent where nothing is sliced.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch

from nexus_export import distributed
from nexus_export.engine.calibration import InputStats, open_checkpoint
from nexus_export.engine.pass_base import Pass, PassConfig, PassContext, option
from nexus_export.errors import UserError
from nexus_export.graph.program import Program
from nexus_export.graph.runner import BlockRunner
from nexus_export.graph.slicing import (
    StoredBases,
    check_fusable,
    fuse_norms,
    rotate_and_slice,
    stream_width,
    with_projections,
)
from nexus_export.graph.structure import SHORTCUT
from nexus_export.progress import Progress

log = logging.getLogger(__name__)

_BLOCK_KEY = re.compile(r"layer_(\d+)(?:-(\d+))?")


@dataclass(frozen=True)
class SliceGPTConfig(PassConfig):
    slicing: float = option(0.25, "slicegpt: fraction of the hidden width to slice off, in [0, 1) (0.25); 0 = "
                                  "rotate only")
    round_to: int = option(8, "slicegpt: round the kept width down to a multiple of this (8)")
    damping: float = option(0.01, "added to the covariance diagonal, as a fraction of its mean", flag=False)
    schedule: dict | None = option(None, 'JSON per role/block/module, e.g. \'{"layer_0-5": 0.3, "mlp_out": 0.5}\'')
    batch_size: int = option(8, "calibration windows per forward", flag=False)

    def validate(self) -> None:
        _check_ratio(self.slicing, "slicing")
        if self.round_to < 1:
            raise UserError(f"round_to must be a positive integer, got {self.round_to}")
        if not 0.0 <= self.damping < 1.0:
            raise UserError(f"damping must be in [0, 1), got {self.damping}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be positive, got {self.batch_size}")
        for key, value in (self.schedule or {}).items():
            if not _BLOCK_KEY.fullmatch(str(key)):
                raise UserError(f"slicegpt schedule key {key!r} is not a block range; use keys like layer_3 or "
                                "layer_0-5 (the stream is sliced per block, not per role or module)")
            _check_ratio(value, f"schedule value for {key!r}")


def _check_ratio(value, what: str) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise UserError(f"{what} must be a fraction in [0, 1) of the hidden width to remove, got {value!r}")


def kept_width(hidden: int, slicing: float, round_to: int) -> int:
    """d = floor((1 - slicing) * hidden), rounded down to a multiple of ``round_to`` (never above ``hidden``)."""
    d = math.floor((1.0 - slicing) * hidden + 1e-9)
    return d if d == hidden else d - d % round_to


def pca_basis(xtx: torch.Tensor, damping: float) -> torch.Tensor:
    """Eigenvectors of the (damped) covariance ``xtx`` [D, D], float64, columns by decreasing eigenvalue."""
    h = xtx.double().clone()
    h.diagonal().add_(damping * h.diagonal().mean())
    values, vectors = torch.linalg.eigh(h)
    return vectors[:, torch.argsort(values, descending=True)]


class SliceGPTPass(Pass):
    name = "slicegpt"
    config_class = SliceGPTConfig
    needs_calibration = True
    not_after = {"slicegpt": "slice the original model once, with the slicing you want",
                 "activation": "a rotation moves the small entries the thresholds were placed for; put activation "
                               "after slicegpt"}

    def hf_refusal(self) -> str | None:
        return "a sliced model has shortcut matrices and per-block widths, which no transformers class holds"

    def block_widths(self, program: Program) -> tuple[int, list[int]]:
        """The width of the stream entering block 0 and of each block's stream, after rounding."""
        cfg: SliceGPTConfig = self.config
        hidden = stream_width(program)
        n = len(program.structure.blocks)
        ratios = [float(cfg.slicing)] * n
        for key, value in (cfg.schedule or {}).items():
            m = _BLOCK_KEY.fullmatch(str(key))
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo or hi >= n:
                raise UserError(f"schedule key {key!r} names blocks outside 0-{n - 1} (the model has {n})")
            for k in range(lo, hi + 1):
                ratios[k] = float(value)
        widths = [kept_width(hidden, r, cfg.round_to) for r in ratios]
        first = kept_width(hidden, float(cfg.slicing), cfg.round_to)
        if min(widths + [first]) <= 0:
            raise UserError(f"slicing {max(ratios + [cfg.slicing])} of width {hidden}, rounded down to a multiple of "
                            f"{cfg.round_to}, leaves no dimension; use a smaller slicing or round_to")
        return first, widths

    def check(self, program: Program) -> None:
        self.block_widths(program)
        if program.origin.get("sliced_widths"):
            raise UserError("this model was already sliced by slicegpt; slice the original model once instead")
        check_fusable(program)

    def apply(self, program: Program, ctx: PassContext) -> tuple[Program, dict]:
        cfg: SliceGPTConfig = self.config
        self.check(program)
        windows = ctx.calibration_windows
        hidden = stream_width(program)
        if windows is None or windows.numel() < hidden:
            have = 0 if windows is None else windows.numel()
            raise UserError(f"slicegpt needs at least as many calibration tokens as the hidden width ({hidden}) for a "
                            f"stable PCA, got {have}; use more or longer calibration windows")
        first, block_widths = self.block_widths(program)
        fused = fuse_norms(program)
        bases = self._principal_bases(program, fused, ctx, windows, first, block_widths)
        structure = fused.structure
        sliced = rotate_and_slice(fused, bases, in_place=True)  # fused is an intermediate: rewritten, not copied
        shortcut_params = sum(lin.in_features * lin.out_features for lin in sliced.structure.linears.values()
                              if lin.role == SHORTCUT)
        per_block = {str(k): block_widths[k] for k in range(len(structure.blocks))}
        changes = {
            "slicing": cfg.slicing,
            "hidden_before": hidden,
            "embedding_width": first,
            "widths": per_block,
            "shortcut_parameters": shortcut_params,
            "head_untied": bool(program.structure.tied_embedding),
            "calibration_tokens": int(windows.numel()),
        }
        log.info("slicegpt: stream width %d -> %s", hidden, sorted(set(block_widths + [first])))
        return sliced, changes

    def _principal_bases(self, program: Program, fused: Program, ctx: PassContext, windows: torch.Tensor, first: int,
                         block_widths: list[int]) -> StoredBases:
        """Every stream point's basis for ``fused`` (``program`` with its norms fused), block by block on the
        calibration windows, aligned. A function of its own so that the calibration's graph, streams and statistics
        go when it returns, before the rotation (as locals of ``apply`` they stayed: a closure's defaults held the last
        covariance, 32 MiB at a width of 2048)."""
        cfg: SliceGPTConfig = self.config
        hidden = stream_width(fused)
        projected, projections = with_projections(fused)
        runner = BlockRunner(projected, distributed.local(windows, cfg.batch_size), cfg.batch_size)
        structure = fused.structure

        bases = StoredBases(projected.store)  # per stream point: [D, d] (the d strongest principal directions)

        def place(keep: torch.Tensor) -> torch.Tensor:
            """Fix the basis of the next point; return its projection matrix (also written into the program)."""
            bases.append(keep)
            projection = (keep @ keep.t()).float()
            projected.set_parameter(projections[len(bases) - 1], projection, dtype=torch.float32)
            return projection.to(runner.device)

        def settle(cov: InputStats, width: int) -> torch.Tensor:
            cov.reduce()  # every process's windows
            if not distributed.world().active:
                return place(pca_basis(cov.xtx, cfg.damping)[:, :width].cpu())
            # one eigendecomposition, on rank 0, whose basis every rank takes (eigenvectors are not unique)
            mine = {"basis": pca_basis(cov.xtx, cfg.damping)[:, :width].cpu()} if distributed.world().writer else None
            return place(distributed.broadcast_tensors(mine, 0)["basis"])

        checkpoint, resumed = open_checkpoint(ctx, program, self.name, cfg.to_dict(), windows)
        start = 0
        if resumed is None:
            cov = InputStats(hidden, hessian=True, device=runner.device)
            for stream in runner.streams():
                cov.add(stream)
            p0 = settle(cov, first)
            runner.set_streams([s.to(runner.device) @ p0 for s in runner.streams()])
        else:
            for _, basis in sorted(resumed.tensors(), key=lambda item: item[0]):  # basis_00000, basis_00001, ...
                place(basis)
            runner.set_streams([s.to(runner.device) for s in resumed.local_streams(cfg.batch_size)])
            start = resumed.next

        progress = Progress("slicegpt", len(structure.blocks), "blocks", every_s=10.0)
        for k in range(start, len(structure.blocks)):
            settled = len(bases)
            kinds = [sub.kind for sub in structure.sublayers if sub.block == k]
            for j, kind in enumerate(kinds):
                index = runner.graphs.residuals[k][kind]
                last = j == len(kinds) - 1
                cov = InputStats(hidden, hessian=True, device=runner.device)
                outputs: list[torch.Tensor] = []

                def visit(i: int, stream_in: torch.Tensor, out: tuple, last=last, index=index, cov=cov,
                          outputs=outputs) -> None:
                    cov.add(out[index] if last else out[0])
                    if last:  # the block's output: the same values, in the shape the next block reads
                        outputs.append(out[0])

                # the last sublayer's point needs the whole block (its output moves the stream on); an earlier point
                # only what leads to it
                if last:
                    runner.run(k, visit, [index, 0])
                else:
                    runner.run(k, visit, [0], part=runner.output_only(k, index))
                projection = settle(cov, block_widths[k])
                if last:
                    runner.set_streams([o @ projection for o in outputs])
            if checkpoint is not None:  # the bases this block settled (block 0's also the stream entering it)
                done = range(0 if k == 0 else settled, len(bases))
                checkpoint.save(k, {f"basis_{j:05d}": bases[j] for j in done}, runner.streams(), {})
            progress.update(k + 1)

        bases.align()
        for name in bases.store.names():  # keep the bases; drop the references to the fused weights
            if not name.startswith(bases.prefix):
                bases.store.drop(name)
        return bases
