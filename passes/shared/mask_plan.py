"""What a masking pass may do before it masks: permute channels for N:M (option ``permute``) and choose OWL's per-block
sparsities (``layerwise: owl``). Both read the targeted linears' input norms on the dense model, from one calibration
sweep before the pass's own (all windows for OWL; the first ``PERMUTE_WINDOWS`` to choose a permutation)."""

from __future__ import annotations

import time

import torch

from nexus_export import distributed
from nexus_export.engine.calibration import calibrate_blocks
from nexus_export.engine.pass_base import PassContext
from nexus_export.errors import UserError
from nexus_export.graph.program import Program
from passes.shared.masking import MaskConfig
from passes.shared.owl import owl_targets
from passes.shared.permute import permute
from passes.shared.sparsity import Target

PERMUTE_WINDOWS = 8  # column norms settle long before the pass's calibration set is used up (4096 tokens at 512)
CHECK_TOKENS = 32  # length of the seeded window whose logits must not change under the permutation


def dense_scales(program: Program, windows: torch.Tensor, names: list[str], batch_size: int = 8,
                 obs: bool = False, percdamp: float = 0.01) -> dict[str, torch.Tensor]:
    """A scale per input column of each linear in ``names``, on the dense model (nothing pruned while it runs), such
    that (|W_ij| * scale_j)^2 is the error of dropping W_ij: ||X_j|| (Wanda's metric), or with ``obs``
    1 / sqrt([H^-1]_jj), H = 2 X^T X / n damped as SparseGPT damps it (the saliency w^2 / [H^-1]_jj it prunes by)."""
    wanted, scales = set(names), {}

    def stage(k, linears, stats) -> dict:
        for lin in linears:
            if lin.name not in wanted:
                continue
            st = stats[lin.name]
            if not obs:
                scales[lin.name] = st.column_norms().float().cpu()
            elif "obs_scale" in st.derived:  # q, k and v (gate and up) read one input
                scales[lin.name] = st.derived["obs_scale"]
            else:
                h = st.hessian()
                h.diagonal().add_(percdamp * float(h.diagonal().mean()))
                scale = torch.cholesky_inverse(torch.linalg.cholesky(h)).diagonal().rsqrt().float().cpu()
                scales[lin.name] = st.derived["obs_scale"] = scale
        return {}

    with torch.no_grad():
        calibrate_blocks(program, windows, stage, hessian=obs, batch_size=batch_size, what="dense sweep")
    return scales


def plan_targets(program: Program, ctx: PassContext, cfg: MaskConfig, calibrated: bool, obs: bool = False
                 ) -> tuple[list[Target], dict]:
    """The pass's targets (OWL's per-block sparsities when asked) after the channel permutation (when asked), and the
    report's facts of both. ``calibrated``: the pass scores with activations (Wanda, SparseGPT); magnitude's
    permutation is chosen on |W| alone. ``obs``: the pass prunes by OBS saliency (SparseGPT), and so is the
    permutation chosen (OWL's outliers are Wanda scores in every case)."""
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
        norms = dense_scales(program, used, [t.name for t in targets], getattr(cfg, "batch_size", 8),
                             obs=obs and not owl, percdamp=getattr(cfg, "percdamp", 0.01))
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
