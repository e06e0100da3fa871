"""SparseGPT: prune with Optimal Brain Surgeon updates of the remaining weights, column block by column block.

Before -> after: same graph and shapes; targeted weights get exact zeros and the kept weights are updated to
compensate, using H = (2/n) X^T X from the calibration engine (inputs produced by the already-pruned blocks).
Invariant: at sparsity 0 the weights are unchanged; with the pruned set fixed, the update lowers ||(W - W') X||.

The sweep is passes.shared.obs (shared with GPTQ): score w^2 / d^2 with d the diagonal of the upper Cholesky factor of H^-1;
unstructured masks chosen per block of ``blocksize`` columns over the whole rows x block; N:M chosen every M columns
on the already-updated weights. ``refit_steps`` then re-solves the kept weights for the chosen mask
(passes.shared.refit: the sweep's compensation only reaches the columns after each one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nexus_export.engine.pass_base import PassContext, option
from nexus_export.errors import UserError
from nexus_export.graph.program import Program
from passes.shared.calibrated import CalibratedConfig, run_calibrated
from passes.shared.masking import MaskingPass
from passes.shared.obs import HessianFactor, factor_hessian, obs_sweep, reconstruction_error, upper_inverse_cholesky  # noqa: F401
from passes.shared.quant_grid import Grid
from passes.shared.refit import refit_masked
from passes.shared.sparsity import NMPattern, Target


@dataclass(frozen=True)
class SparseGPTConfig(CalibratedConfig):
    blocksize: int = option(128, "sparsegpt: columns per block (default 128)")
    percdamp: float = option(0.01, "sparsegpt: damping as a fraction of mean diag(H) (0.01)")
    refit_steps: int = option(0, "sparsegpt: after the sweep, move the kept weights towards the layer's least-squares "
                                 "optimum for the chosen mask by this many conjugate-gradient steps (0 = off, as the "
                                 "reference; 30 recommended); the mask does not change")

    def validate(self) -> None:
        super().validate()
        if self.blocksize < 1:
            raise UserError(f"blocksize must be a positive number of columns, got {self.blocksize}")
        if not 0.0 < self.percdamp < 1.0:
            raise UserError(f"percdamp must be in (0, 1), e.g. 0.01; got {self.percdamp}")
        if isinstance(self.refit_steps, bool) or not isinstance(self.refit_steps, int) or self.refit_steps < 0:
            raise UserError(f"refit_steps must be a whole number >= 0 (0 = off, e.g. 30); got {self.refit_steps!r}")
        pattern = self.pattern_obj()
        if pattern is not None and self.blocksize % pattern.m:
            raise UserError(f"blocksize {self.blocksize} must be a multiple of the pattern's M={pattern.m}")


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor | None, sparsity: float, pattern: NMPattern | None,
                    blocksize: int = 128, percdamp: float = 0.01, factor: HessianFactor | None = None,
                    grid: Grid | None = None, refit_steps: int = 0) -> tuple[torch.Tensor, dict]:
    """The pruned and updated [out, in] weight (same dtype) and facts for the report (damping, reconstruction error).
    ``factor``: ``factor_hessian(hessian, percdamp)`` when the caller already has it (an input shared by linears);
    then ``hessian`` is only read by a refit and may be None without one (it may have become the factor).
    ``grid``: the kept weights are also quantized in the same sweep (the joint mode); then the weight is returned in
    float32 with the grid's scales and zero points in the facts (``scales``, ``zeros``).
    ``refit_steps``: the kept weights are then re-solved for this mask (passes.shared.refit); the facts add the
    sweep's own error (``sweep_error``)."""
    if grid is not None and refit_steps:
        raise ValueError("a refit moves weights off the quantization grid; refit without a grid")
    factor = factor if factor is not None else factor_hessian(hessian, percdamp)
    result = obs_sweep(weight, factor, sparsity=sparsity, pattern=pattern, grid=grid, blocksize=blocksize)
    facts = {"damping": factor.damp, "reconstruction_error": result.error}
    if refit_steps:
        result.weight = refit_masked(weight, result.weight, hessian, factor.damp, refit_steps)
        facts = {**facts, "sweep_error": facts["reconstruction_error"],
                 "reconstruction_error": reconstruction_error(weight, result.weight, hessian)}
    if grid is not None:
        return result.weight, {**facts, "scales": result.scales, "zeros": result.zeros}
    return result.weight.to(weight.dtype), facts


class SparseGPTPass(MaskingPass):
    name = "sparsegpt"
    config_class = SparseGPTConfig
    needs_calibration = True
    keeps_blocks = True
    factors_hessians = True

    def apply(self, program: Program, ctx: PassContext) -> tuple[Program, dict]:
        cfg: SparseGPTConfig = self.config
        pattern = cfg.pattern_obj()

        refit = bool(cfg.refit_steps)  # the refit reads H after the sweep; without it H may become its factor

        def prune(target: Target, stats) -> dict:
            if "sparsegpt" not in stats.derived:  # once per input: q, k and v (gate and up) share it
                stats.derived["sparsegpt"] = factor_hessian(
                    stats.hessian() if refit else stats.take_hessian(), cfg.percdamp, layer=target.name,
                    consume=not refit, scratch=program.store.scratch_folder())
            factor = stats.derived["sparsegpt"]
            weight = program.weight(target.name, device=factor.upper.device)
            new, facts = sparsegpt_prune(weight, stats.hessian() if refit else None, target.sparsity, pattern,
                                         cfg.blocksize, cfg.percdamp, factor, refit_steps=cfg.refit_steps)
            program.set_weight(target.name, new)
            return {k: round(v, 6) for k, v in facts.items()}

        changes = run_calibrated(program, ctx, cfg, prune, hessian=True, what="sparsegpt")
        changes["damping_increased"] = [name for name, layer in changes["per_layer"].items()  # from every process
                                        if layer.get("damping", cfg.percdamp) != cfg.percdamp]
        return program, changes
