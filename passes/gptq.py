"""GPTQ: round every linear of the decoder blocks to a b-bit grid, compensating each column's rounding error in the
columns not yet rounded (Frantar et al., ICLR 2023), on the calibration engine's Hessians.

Before -> after: same graph and shapes; each weight holds its dequantized values, in the program's dtype (float32:
exactly on its grid; bfloat16 or float16, 4-bit grids only: rounded to that dtype, near enough to the grid that every
code is recovered from it), and its float32 scales and zero points are kept beside it in the store (``W::qscale``,
``W::qzero``), from which lowering writes MatMulNBits that compute the exact grid values. Weights that are exactly
zero (a pruning pass before it) stay exactly zero. The head and the embeddings are not quantized (as in the
reference).

Joint mode (``prune``): the masking pass's mask and the rounding happen in one sweep per layer, on one Hessian:
SparseGPT chooses its mask inside the sweep, Wanda's mask is chosen first and fixed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch

from nexus_export.engine.pass_base import Pass, PassConfig, PassContext
from nexus_export.errors import UserError
from nexus_export.graph.program import Program
from nexus_export.registry import get_pass
from passes.shared.calibrated import calibrate_linears, calibration_facts
from passes.shared.mask_plan import plan_targets
from passes.shared.masking import MaskConfig, masking_changes
from passes.shared.obs import factor_hessian, obs_sweep
from passes.shared.quant_grid import Grid, check_groups, grid_names
from passes.wanda import wanda_mask

log = logging.getLogger(__name__)

JOINT_METHODS = ("sparsegpt", "wanda")  # the masking passes the joint sweep can run inside itself
# Grids whose dequantized weights may be kept in bfloat16 or float16: a value s * m (|m| <= 15) rounded to 8
# significant bits is off by at most 15/256 of a step, so rounding it back to the grid finds its code; an 8-bit grid's
# |m| reaches 128-255 steps, which bfloat16 cannot tell apart.
HALF_BITS = (4,)


@dataclass(frozen=True)
class GPTQConfig(PassConfig):
    bits: int = 4
    group_size: int = 128  # inputs per scale (and zero point)
    sym: bool = True  # symmetric grid (zero point 2^(bits-1)); False: a zero point per group
    clip_search: bool = True  # each group's range shrunk where that rounds its weights closer (quant_grid.Grid)
    act_order: bool = False  # columns in decreasing Hessian diagonal order (scales still per stored group)
    blocksize: int = 128  # columns per lazy batch update
    percdamp: float = 0.01  # damping, as a fraction of the mean Hessian diagonal
    batch_size: int = 8  # calibration windows per forward through a block
    true_sequential: bool = False
    prune: dict | None = None  # joint mode: {"method": "sparsegpt" | "wanda", plus that pass's options}

    def validate(self) -> None:
        self.grid().validate()
        if self.blocksize < 1:
            raise UserError(f"blocksize must be a positive number of columns, got {self.blocksize}")
        if not 0.0 < self.percdamp < 1.0:
            raise UserError(f"percdamp must be in (0, 1), e.g. 0.01; got {self.percdamp}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be positive, got {self.batch_size}")
        if self.prune is not None:
            method, mask = self.mask()
            if method == "sparsegpt" and self.act_order:
                raise UserError("act-order cannot be combined with the joint SparseGPT sweep (its mask follows the "
                                "stored column order); drop --act-order or --joint")
            if getattr(mask, "refit_steps", 0):
                raise UserError("--refit-steps moves the kept weights after the mask is chosen, off the quantization "
                                "grid of the joint sweep; drop --refit-steps or --joint")

    def grid(self) -> Grid:
        return Grid(self.bits, self.group_size, self.sym, self.clip_search)

    def mask(self) -> tuple[str, MaskConfig]:
        """The joint mode's masking method and its validated options."""
        options = dict(self.prune or {})
        method = options.pop("method", None)
        if method not in JOINT_METHODS:
            raise UserError(f"the joint sweep prunes with {' or '.join(JOINT_METHODS)}, got {method!r}")
        return method, get_pass(method).config_class.from_options(options, method)


class GPTQPass(Pass):
    name = "gptq"
    config_class = GPTQConfig
    flag_prefix = None  # driven by the quantize section's flags (--quantize-bits, ...), not flags of its own
    needs_calibration = True
    keeps_blocks = True
    factors_hessians = True
    joint_methods: ClassVar[tuple[str, ...]] = JOINT_METHODS

    @staticmethod
    def grid_items(program: Program) -> Iterator[tuple[str, tuple[torch.Tensor, torch.Tensor]]]:
        """The scales and zero points this pass left beside each weight it quantized, a layer at a time (see
        quantization_grids)."""
        return grid_items(program)

    def check(self, program: Program) -> None:
        cfg: GPTQConfig = self.config
        dtype = program.store.dtype or program.main_dtype()
        if dtype != torch.float32 and cfg.bits not in HALF_BITS:
            name = str(dtype).replace("torch.", "")
            raise UserError(f"GPTQ keeps the dequantized weights in the program's dtype ({name}), which cannot tell "
                            f"the codes of {cfg.bits}-bit grids apart; use --dtype fp32 (Python API: model.float()) or "
                            "--quantize-bits 4")
        check_groups(program, cfg.group_size)
        if cfg.prune is not None:
            cfg.mask()[1].targets(program)

    def apply(self, program: Program, ctx: PassContext) -> tuple[Program, dict]:
        cfg: GPTQConfig = self.config
        self.check(program)  # float32 weights and dividing groups, also when called outside the pipeline
        grid = cfg.grid()
        method, mask = cfg.mask() if cfg.prune is not None else (None, None)
        planned, plan_facts = (plan_targets(program, ctx, mask, calibrated=True, obs=method == "sparsegpt")
                               if mask is not None else ([], {}))
        targets = {t.name: t for t in planned}
        pattern = mask.pattern_obj() if mask is not None else None
        names = [lin.name for lin in program.structure.in_blocks()]
        key = "gptq-act-order" if cfg.act_order else "gptq"

        def quantize(name: str, stats) -> dict:
            if key not in stats.derived:  # once per input: q, k and v (gate and up) share it; H becomes the factor
                stats.derived[key] = factor_hessian(stats.take_hessian(), cfg.percdamp, cfg.act_order, layer=name,
                                                    consume=True, scratch=program.store.scratch_folder())
            factor = stats.derived[key]
            weight = program.weight(name, device=factor.upper.device)
            target = targets.get(name)
            if method == "sparsegpt" and target is not None:
                how = {"sparsity": target.sparsity, "pattern": pattern}
            elif method == "wanda" and target is not None:
                how = {"keep": wanda_mask(weight, stats.column_norms(), target.sparsity, pattern, name)}
            else:
                zero = weight == 0
                how = {"keep": ~zero} if bool(zero.any()) else {}
            result = obs_sweep(weight, factor, grid=grid, blocksize=cfg.blocksize, **how)
            program.set_weight(name, result.weight)
            scale_name, zero_name = grid_names(program.linear(name).weight)
            program.set_parameter(scale_name, result.scales, dtype=torch.float32)  # the grid itself, whatever the dtype
            program.set_parameter(zero_name, result.zeros.to(torch.uint8))
            return {"damping": round(factor.damp, 6), "reconstruction_error": round(result.error, 6)}

        notes = calibrate_linears(program, ctx, names, quantize, hessian=True, what="gptq", options=cfg.to_dict(),
                                  true_sequential=cfg.true_sequential, batch_size=cfg.batch_size)
        program.origin["quantization"] = {**grid.to_dict(), "method": "gptq"}  # what export_onnx writes MatMulNBits by
        changes = {**grid.to_dict(), "act_order": cfg.act_order, "joint": method, "layers": len(names),
                   "quantized": notes, "calibration": calibration_facts(ctx, cfg.true_sequential),
                   "damping_increased": [n for n, note in notes.items() if note["damping"] != cfg.percdamp]}
        if mask is not None:
            changes.update(masking_changes(program, list(targets.values()), pattern), **plan_facts)
        log.info("gptq: %d layers on a %d-bit grid (groups of %d, %s%s)", len(names), grid.bits, grid.group_size,
                 "symmetric" if grid.sym else "asymmetric", f", pruned by {method} in the same sweep" if method else "")
        return program, changes


def quantization_grids(program: Program) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Scales and zero points [out, in / group] of every linear a GPTQ pass quantized, by linear name."""
    return dict(grid_items(program))


def grid_items(program: Program) -> Iterator[tuple[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(linear name, (scales, zero points)) of every linear a GPTQ pass quantized, each read when it is reached."""
    for lin in program.structure.linears.values():
        scale_name, zero_name = grid_names(lin.weight)
        if scale_name in program.store:
            yield lin.name, (program.parameter(scale_name), program.parameter(zero_name))
