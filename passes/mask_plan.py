"""What a masking pass may do before it masks: permute channels for N:M (option ``permute``) and choose OWL's per-block
sparsities (``layerwise: owl``). Both read the targeted linears' input norms on the dense model, from one calibration
sweep before the pass's own (all windows for OWL; the first ``PERMUTE_WINDOWS`` to choose a permutation)."""

from __future__ import annotations

import time

import torch

from nexus_export import distributed
from nexus_export.calibration import calibrate_blocks
from nexus_export.errors import UserError
from nexus_export.passbase import PassContext
from nexus_export.program import Program

from .masking import MaskConfig
from .owl import owl_targets
from .permute import permute
from .sparsity import Target

PERMUTE_WINDOWS = 8  # column norms settle long before the pass's calibration set is used up (4096 tokens at 512)
CHECK_TOKENS = 32  # length of the seeded window whose logits must not change under the permutation


def dense_norms(program: Program, windows: torch.Tensor, names: list[str], batch_size: int = 8
                ) -> dict[str, torch.Tensor]:
    """||X_j|| of the input of each linear in ``names`` on the dense model (nothing pruned while it runs)."""
    wanted, norms = set(names), {}

    def stage(k, linears, stats) -> dict:
        for lin in linears:
            if lin.name in wanted:
                norms[lin.name] = stats[lin.name].column_norms().float().cpu()
        return {}

    with torch.no_grad():
        calibrate_blocks(program, windows, stage, hessian=False, batch_size=batch_size, what="dense sweep")
    return norms


def plan_targets(program: Program, ctx: PassContext, cfg: MaskConfig, calibrated: bool
                 ) -> tuple[list[Target], dict]:
    """The pass's targets (OWL's per-block sparsities when asked) after the channel permutation (when asked), and the
    report's facts of both. ``calibrated``: the pass scores with activations (Wanda, SparseGPT); magnitude's
    permutation is chosen on |W| alone."""
    targets = cfg.targets(program)
    owl = cfg.layerwise == "owl"
    if not (cfg.permute or owl):
        return targets, {}
    facts: dict = {}
    norms = None
    if owl or calibrated:
        windows = ctx.calibration_windows
        if windows is None or len(windows) == 0:
            raise UserError("OWL needs calibration data (the outliers are measured on it); give calibration "
                            "settings" if owl else "the permutation needs calibration data; give calibration settings")
        used = windows if owl else windows[:max(PERMUTE_WINDOWS, distributed.world().size)]  # a window per process
        start = time.perf_counter()
        norms = dense_norms(program, used, [t.name for t in targets], getattr(cfg, "batch_size", 8))
        facts["dense_sweep"] = {"windows": int(used.shape[0]), "seconds": round(time.perf_counter() - start, 3)}
    if cfg.permute:
        facts["permutation"] = permute(program, targets, cfg.pattern_obj(), norms, _check_window(program))
    if owl:
        targets, facts["layerwise"] = owl_targets(program, targets, norms, cfg.owl_m, cfg.owl_lambda)
    return targets, facts


def _check_window(program: Program) -> torch.Tensor:
    """Seeded token ids (any input serves to check that a rewrite keeps the function)."""
    vocab = min(program.store.shape(p)[0] for p in program.structure.embeddings.values())
    return torch.randint(0, vocab, (1, CHECK_TOKENS), generator=torch.Generator().manual_seed(0))
