"""ShortGPT: rank decoder blocks (or attention sublayers) by importance on calibration data and remove the least
important from the graph.

Before -> after: the chosen blocks (or attention sublayers) are gone from the graph, the residual stream is rewired
around them and the remaining blocks renumbered; nothing is multiplied by zero. Invariant: removing nothing leaves the
program unchanged.

Strategies:
- ``similarity``: Block Influence BI_k = mean over tokens of 1 - cos(h_in, h_out) (the last block's output is taken
  before the final norm); the lowest BI goes first.
- ``attention``: the same influence measured across each attention sublayer (stream before it and after its residual
  add); only attention sublayers are removed, the MLPs stay.
- ``gradient``: first-order Taylor importance |sum over tokens (h_out - h_in) . dL/dh_out| of each block on the
  calibration language-modelling loss.
- ``perplexity``: the calibration loss (mean next-token NLL on ``rank_windows`` of the calibration windows) of the
  model with that block removed alone (Kim et al., "Shortened LLaMA"); with ``iterative`` the blocks are re-ranked
  after each removal, on the model without the blocks removed so far. Not checkpointed: an interrupted ranking starts
  over with --resume.

``granularity sublayer`` ranks attention and MLP sublayers instead, each by the calibration loss of the model without
it alone (the ``perplexity`` strategy's measure), and removes them, cheapest first by loss added per parameter removed,
until ``remove_params`` of the blocks' linear parameters (or ``remove`` sublayers) are gone; a block that loses both
sublayers is removed whole.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from nexus_export import distributed
from nexus_export.engine.calibration import Checkpoint, Resumed, open_checkpoint
from nexus_export.engine.pass_base import Pass, PassConfig, PassContext, option
from nexus_export.errors import UserError
from nexus_export.graph.program import Program
from nexus_export.graph.runner import BlockRunner
from nexus_export.graph.surgery import remove_attention, remove_blocks
from nexus_export.metrics import next_token_nll
from nexus_export.progress import Progress
from passes.shared.repair import check_repairable, fit_repairs, fold
from passes.shared.sublayers import KINDS, SublayerRunner, Unit, check_sublayers, label

log = logging.getLogger(__name__)

STRATEGIES = ("similarity", "attention", "gradient", "perplexity")
GRANULARITIES = ("block", "sublayer")
DEFAULT_RANK_WINDOWS = 8  # calibration windows the perplexity strategy scores on (each costs ~n/2 forward passes)


@dataclass(frozen=True)
class ShortGPTConfig(PassConfig):
    remove: int | None = option(None, "shortgpt: number of blocks (or attention sublayers) to remove")
    remove_ratio: float | None = option(None, "shortgpt: fraction of blocks to remove")
    remove_params: float | None = option(None, "shortgpt sublayer: fraction of the blocks' linear parameters to "
                                               "remove, e.g. 0.25")
    layers: list | str | None = option(None, "shortgpt: exactly these blocks, e.g. 20,21,22 (no scoring needed)")
    strategy: str = option("similarity", "shortgpt: similarity (default), attention, gradient or perplexity")
    granularity: str = option("block", "shortgpt: remove whole blocks (block, default) or attention and MLP "
                                       "sublayers ranked by calibration loss (sublayer)", choices=GRANULARITIES)
    batch_size: int = option(8, "calibration windows per forward (gradient: per backward)", flag=False)
    rank_windows: int | None = option(None, "shortgpt perplexity: calibration windows the loss is measured on "
                                            "(default 8)")
    iterative: bool = option(False, "shortgpt perplexity: re-rank after each removal")
    repair: str | None = option(None, "shortgpt: linear: replace each removed span by a linear map fitted on the "
                                      "calibration windows and folded into the sublayer before it",
                                choices=("linear",))

    def validate(self) -> None:
        given = [x for x in (self.remove, self.remove_ratio, self.remove_params, self.layers) if x is not None]
        if len(given) != 1:
            raise UserError("say what to remove with exactly one of remove (a count), remove_ratio (a fraction), "
                            "remove_params (a fraction of parameters, granularity sublayer) or layers (a list of block "
                            "indices)")
        if self.granularity not in GRANULARITIES:
            raise UserError(f"unknown granularity {self.granularity!r}; use block or sublayer")
        if self.granularity == "sublayer":
            if self.layers is not None or self.remove_ratio is not None:
                raise UserError("granularity sublayer removes sublayers by rank: give remove (a count of sublayers) "
                                "or remove_params (a fraction of the blocks' parameters), not layers or remove_ratio")
            if self.strategy not in ("similarity", "perplexity"):
                raise UserError(f"granularity sublayer ranks by calibration loss; strategy {self.strategy!r} does "
                                "not apply (leave it out)")
        elif self.remove_params is not None:
            raise UserError("remove_params (--remove-params) belongs to granularity sublayer; add --granularity "
                            "sublayer, or give blocks with remove or remove_ratio")
        if self.remove_params is not None and not 0.0 < self.remove_params < 1.0:
            raise UserError(f"remove_params must be in (0, 1), got {self.remove_params}")
        if self.strategy not in STRATEGIES:
            raise UserError(f"unknown strategy {self.strategy!r}; use one of {', '.join(STRATEGIES)}")
        if self.remove is not None and self.remove < 0:
            raise UserError(f"remove must be 0 or more blocks, got {self.remove}")
        if self.remove_ratio is not None and not 0.0 <= self.remove_ratio < 1.0:
            raise UserError(f"remove_ratio must be in [0, 1), got {self.remove_ratio}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be positive, got {self.batch_size}")
        if self.layers is not None:
            self.layer_list()
        if not self.ranks_by_loss() and (self.rank_windows is not None or self.iterative):
            raise UserError("rank_windows (--rank-windows) and iterative (--iterative) belong to strategy perplexity; "
                            "add --strategy perplexity (or --granularity sublayer)")
        if self.repair not in (None, "linear"):
            raise UserError(f"unknown repair {self.repair!r}; use linear")
        if self.repair is not None and self.remove == 0:
            raise UserError("--repair linear repairs what is removed; nothing is (--remove 0)")
        if self.rank_windows is not None and self.rank_windows < 1:
            raise UserError(f"rank_windows must be a positive number of windows, got {self.rank_windows}")

    def ranks_by_loss(self) -> bool:
        """Whether the ranking is the calibration loss without each unit (strategy perplexity, every sublayer run)."""
        return self.strategy == "perplexity" or self.granularity == "sublayer"

    def windows_to_rank(self) -> int:
        return self.rank_windows if self.rank_windows is not None else DEFAULT_RANK_WINDOWS

    def layer_list(self) -> list[int]:
        items = self.layers.split(",") if isinstance(self.layers, str) else list(self.layers)
        if any(isinstance(x, (bool, float)) for x in items):
            raise UserError(f"layers must be block indices like 20,21,22; got {self.layers!r}")
        try:
            values = [int(str(x).strip()) for x in items if str(x).strip()]
        except ValueError:
            raise UserError(f"layers must be block indices like 20,21,22; got {self.layers!r}") from None
        if len(set(values)) != len(values):
            raise UserError(f"layers lists a block more than once: {values}")
        return values


class ShortGPTPass(Pass):
    name = "shortgpt"
    config_class = ShortGPTConfig
    not_after = {"slicegpt": "each block of a sliced model has its own rotated basis, so blocks cannot be dropped "
                             "from it; put shortgpt before slicegpt"}

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.config.layers is None or self.config.repair is not None

    def hf_refusal(self) -> str | None:
        if self.config.strategy == "attention" or self.config.granularity == "sublayer":
            return ("removing sublayers leaves blocks without an attention or an MLP, which no transformers class "
                    "holds")
        return None

    def check_calibration(self, program: Program, windows) -> None:
        if self.config.ranks_by_loss() and self.config.layers is None and windows is not None \
                and self.config.rank_windows is not None and self.config.rank_windows > len(windows):
            raise UserError(f"--rank-windows {self.config.rank_windows} is more than the {len(windows)} calibration "
                            "windows; use at most that many (or raise --calib-samples)")

    def count(self, program: Program) -> int:
        n = len(program.structure.blocks)
        return self.config.remove if self.config.remove is not None else int(n * (self.config.remove_ratio or 0.0))

    def check(self, program: Program) -> None:
        n = len(program.structure.blocks)
        if program.origin.get("sliced_widths"):
            raise UserError("shortgpt cannot remove blocks of a sliced model (each block's stream has its own rotated "
                            "basis); put shortgpt before slicegpt in the recipe")
        if self.config.repair is not None:
            check_repairable(program)
            if self.config.granularity == "block":
                check_sublayers(program, None, "--repair linear")
        if self.config.granularity == "sublayer":
            check_sublayers(program, self.config.remove)
            return
        if self.config.strategy == "attention":
            blocks_with_attention = {s.block for s in program.structure.sublayers if s.kind == "attention"}
            if not blocks_with_attention:
                raise UserError("strategy 'attention' needs blocks with an attention sublayer to separate; this model "
                                "has none; use strategy similarity")
            limit = len(blocks_with_attention)
        else:
            limit = n - 1
        if self.config.layers is not None:
            bad = [k for k in self.config.layer_list() if not 0 <= k < n]
            if bad:
                raise UserError(f"block indices {bad} are out of range: the model has blocks 0-{n - 1}")
            wanted = len(self.config.layer_list())
        else:
            wanted = self.count(program)
        if wanted > limit or (self.config.strategy != "attention" and wanted >= n):
            raise UserError(f"cannot remove {wanted} of {n} blocks; at most {limit} (at least one block must stay)")

    def apply(self, program: Program, ctx: PassContext) -> tuple[Program, dict]:
        cfg: ShortGPTConfig = self.config
        self.check(program)
        scores = None
        if cfg.layers is not None:
            chosen = sorted(cfg.layer_list())
        else:
            windows = ctx.calibration_windows
            if windows is None or len(windows) == 0:
                raise UserError("shortgpt needs calibration data to rank blocks, or an explicit list of layers")
            start = time.perf_counter()
            if cfg.granularity == "sublayer":
                self.check_calibration(program, windows)
                return remove_ranked_sublayers(self, program, ctx, start)
            if cfg.strategy == "perplexity":
                self.check_calibration(program, windows)
                ranking = windows[: cfg.windows_to_rank()]
                scores, order = rank_by_loss(program, ranking, self.count(program), cfg.iterative, cfg.batch_size)
                extra = {"rank_windows": len(ranking), "iterative": cfg.iterative, "removal_order": order}
            else:
                checkpoint, resumed = open_checkpoint(ctx, program, self.name, cfg.to_dict(), windows)
                scores = score_blocks(program, windows, cfg.strategy, cfg.batch_size, checkpoint, resumed)
                order = sorted(scores, key=lambda k: scores[k])[: self.count(program)]
                extra = {}
            extra["ranking_s"] = round(time.perf_counter() - start, 2)
            chosen = sorted(order)
        n_before = len(program.structure.blocks)
        units = [(k, "attention") for k in chosen] if cfg.strategy == "attention" else \
            [(k, kind) for k in chosen for kind in KINDS]
        program, repaired = self.repaired(program, ctx, units)
        if cfg.strategy == "attention":
            new = remove_attention(program, chosen)
        else:
            new = remove_blocks(program, chosen)
        changes = {
            "strategy": cfg.strategy if cfg.layers is None else "explicit",
            "unit": "attention sublayer" if cfg.strategy == "attention" else "block",
            "scores": {str(k): round(v, 6) for k, v in (scores or {}).items()},
            "removed": chosen,
            "blocks_before": n_before,
            "blocks_after": len(new.structure.blocks),
            **(extra if cfg.layers is None else {}),
            **repaired,
        }
        log.info("shortgpt: removed %s %s", changes["unit"] + "s", chosen)
        return new, changes

    def repaired(self, program: Program, ctx: PassContext, units: list[tuple[int, str]]) -> tuple[Program, dict]:
        """With --repair linear: a fork of ``program`` whose sublayers before the removed ``units`` carry the fitted
        maps, and the report's entries; else ``program`` as it is."""
        if self.config.repair is None or not units:
            return program, {}
        windows = ctx.calibration_windows
        if windows is None or len(windows) == 0:
            raise UserError("--repair linear fits on calibration data; give calibration windows")
        repairs = fit_repairs(program, windows, units, self.config.batch_size)
        program = program.fork()
        fold(program, repairs)
        return program, {"repair": [{"after": label(r.after), "span": [label(u) for u in r.span],
                                     "writer": r.writer, "residual": round(r.residual, 6)} for r in repairs]}


def score_blocks(program: Program, windows: torch.Tensor, strategy: str, batch_size: int = 8,
                 checkpoint: Checkpoint | None = None, resumed: Resumed | None = None) -> dict[int, float]:
    """Importance of each block (or attention sublayer) on the calibration windows; lower = removed first. Each block
    (gradient: each batch) done goes into ``checkpoint``; ``resumed`` continues after what it holds."""
    if strategy == "gradient":
        return _taylor_scores(program, windows, max(1, min(batch_size, 2)), checkpoint, resumed)
    if strategy == "perplexity":  # on every given window: callers pass the rank windows
        return loss_without_each(program, windows, set(), batch_size)
    runner = BlockRunner(program, distributed.local(windows, batch_size), batch_size)
    sums: dict[int, float] = {}
    tokens: dict[int, int] = {}
    start = 0
    if resumed is not None:
        runner.set_streams([s.to(runner.device) for s in resumed.local_streams(batch_size)])
        sums = {int(k): v for k, v in resumed.notes["sums"].items()}
        tokens = {int(k): v for k, v in resumed.notes["tokens"].items()}
        start = resumed.next
    progress = Progress(f"shortgpt {strategy}", len(program.structure.blocks), "blocks", every_s=10.0)
    for k in range(start, len(program.structure.blocks)):
        has_attention = "attention" in runner.graphs.residuals[k]

        def visit(h_in: torch.Tensor, out: tuple, k=k, has_attention=has_attention) -> None:
            if strategy == "attention":
                if not has_attention:
                    return
                h_out = out[runner.graphs.residuals[k]["attention"]]
            else:
                h_out = out[0]
            cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
            sums[k] = sums.get(k, 0.0) + float((1.0 - cos).sum())
            tokens[k] = tokens.get(k, 0) + cos.numel()

        runner.step(k, visit, [0, *runner.graphs.residuals[k].values()])
        if k in sums and distributed.world().active:  # block k over every process's windows
            total, count = distributed.sum_float(sums[k], tokens[k])
            sums[k], tokens[k] = total, int(count)
        if checkpoint is not None:
            checkpoint.save(k, {}, runner.streams(), {"sums": sums, "tokens": tokens})
        progress.update(k + 1)
    return {k: sums[k] / tokens[k] for k in sums}


def rank_by_loss(program: Program, windows: torch.Tensor, count: int, iterative: bool, batch_size: int = 8
                 ) -> tuple[dict[int, float], list[int]]:
    """The calibration loss without each block alone (the scores: lower = removed first) and the ``count`` blocks to
    remove, in the order chosen: the lowest scores, or (``iterative``) the lowest loss again after each removal."""
    scores = loss_without_each(program, windows, set(), batch_size)
    order = sorted(scores, key=scores.get)[:count]
    if iterative and count > 1:
        order = order[:1]
        while len(order) < count:
            again = loss_without_each(program, windows, set(order), batch_size)
            order.append(min(again, key=again.get))
            log.info("shortgpt perplexity: removing %s (calibration loss %.4f)", order, again[order[-1]])
    return scores, order


@torch.no_grad()
def loss_without_each(program: Program, windows: torch.Tensor, removed: set[int], batch_size: int = 8
                      ) -> dict[int, float]:
    """Mean next-token NLL on ``windows`` of the model without the blocks in ``removed`` and without block k, for
    every other block k. One walk through the blocks: each block's weights are loaded once per micro-batch and run on
    the stream of every candidate that skipped an earlier block (up to n streams alive at once). In a distributed run
    each process walks its share of the windows and the losses are summed."""
    windows = distributed.local(windows, batch_size)
    runner = BlockRunner(program, windows, batch_size)
    n = len(program.structure.blocks)
    suffix = runner.load(runner.graphs.suffix)
    totals: dict[int, float] = {}
    tokens = 0
    progress = Progress("shortgpt perplexity", runner.batches, "batches", every_s=10.0)
    for i in range(runner.batches):
        h = runner.inputs(0, i)[0]
        alive: dict[int, torch.Tensor] = {}  # candidate k -> the stream of the model without k
        for j in range(n):
            if j in removed:
                continue
            block = runner.graphs.blocks[j]
            weights = runner.load(block)
            alive = {k: block(weights, *runner.inputs(j, i, s))[0] for k, s in alive.items()}
            alive[j] = h
            h = block(weights, *runner.inputs(j, i, h))[0]
            del weights
        ids = windows[i * runner.micro:(i + 1) * runner.micro].to(runner.device)
        for k, stream in alive.items():
            totals[k] = totals.get(k, 0.0) + next_token_nll(runner.logits(i, stream, suffix), ids)[0]
        tokens += ids.shape[0] * (ids.shape[1] - 1)
        progress.update(i + 1)
    keys = [k for k in range(n) if k not in removed]
    *sums, tokens = distributed.sum_float(*(totals.get(k, 0.0) for k in keys), tokens)
    return {k: total / tokens for k, total in zip(keys, sums)}


def _taylor_scores(program: Program, windows: torch.Tensor, batch_size: int, checkpoint: Checkpoint | None,
                   resumed: Resumed | None) -> dict[int, float]:
    """|sum (h_out - h_in) . dL/dh_out| per block, summed over the calibration windows.

    Micro-batch by micro-batch: a forward pass keeps the stream at every block boundary, then the gradient is carried back block
    by block (each block re-run with autograd on its saved input), so one block's weights are loaded at a time."""
    runner = BlockRunner(program, windows, batch_size)
    n = len(program.structure.blocks)
    totals = torch.zeros(n, dtype=torch.float64)
    start = 0
    if resumed is not None:
        totals = torch.tensor(resumed.notes["totals"], dtype=torch.float64)
        start = resumed.next
    progress = Progress("shortgpt gradient", runner.batches, "batches", every_s=10.0)
    suffix = runner.load(runner.graphs.suffix)
    for i in range(start, runner.batches):
        h = runner.inputs(0, i)[0]
        boundary = [h]
        with torch.no_grad():
            for k in range(n):
                h = runner.graphs.blocks[k](runner.load(runner.graphs.blocks[k]), *runner.inputs(k, i, h))[0]
                boundary.append(h)
        ids = windows[i * runner.micro:(i + 1) * runner.micro].to(runner.device)
        with torch.enable_grad():
            last = boundary[-1].detach().requires_grad_(True)
            logits = runner.logits(i, last, suffix)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1))
            grad, = torch.autograd.grad(loss, last)
            for k in reversed(range(n)):
                totals[k] += float(((boundary[k + 1] - boundary[k]).double() * grad.double()).sum())
                if k:
                    h_in = boundary[k].detach().requires_grad_(True)
                    out = runner.graphs.blocks[k](runner.load(runner.graphs.blocks[k]), *runner.inputs(k, i, h_in))[0]
                    grad, = torch.autograd.grad(out, h_in, grad)
        if checkpoint is not None:
            checkpoint.save(i, {}, None, {"totals": totals.tolist()})
        progress.update(i + 1)
    return {k: float(abs(totals[k])) for k in range(n)}


# ------------------------------------------------------------------------------------------------ sublayers

def sublayer_params(program: Program) -> dict[Unit, int]:
    """The linear parameters (weights and biases) of every attention and MLP sublayer."""
    linears = program.structure.linears
    return {(sub.block, sub.kind): sum(linears[n].in_features * linears[n].out_features
                                       + (linears[n].out_features if linears[n].bias else 0)
                                       for n in (*sub.readers, *sub.writers))
            for sub in program.structure.sublayers}


def remove_ranked_sublayers(pass_: ShortGPTPass, program: Program, ctx: PassContext, start: float
                            ) -> tuple[Program, dict]:
    """Rank sublayers by the calibration loss without each, remove the cheapest (loss added per parameter) until the
    count or the parameter share is reached, re-ranking after each removal with ``cfg.iterative``."""
    from nexus_export.graph.surgery import remove_sublayers

    cfg: ShortGPTConfig = pass_.config
    windows = ctx.calibration_windows[: cfg.windows_to_rank()]
    params = sublayer_params(program)
    total = sum(params.values())
    budget = None if cfg.remove_params is None else cfg.remove_params * total
    base, losses = loss_without_each_sublayer(program, windows, set(), cfg.batch_size)

    def cheapest(base: float, losses: dict[Unit, float]) -> Unit:
        return min(losses, key=lambda u: ((losses[u] - base) / params[u], u))

    order: list[Unit] = []
    removed_params = 0
    current_base, current = base, dict(losses)
    while (len(order) < cfg.remove) if budget is None else (removed_params < budget):
        if len(order) == len(params) - 1:
            raise UserError(f"--remove-params {cfg.remove_params} would remove every sublayer; use a smaller share")
        unit = cheapest(current_base, current)
        order.append(unit)
        removed_params += params[unit]
        current.pop(unit)
        if cfg.iterative and current and ((len(order) < cfg.remove) if budget is None else removed_params < budget):
            current_base, current = loss_without_each_sublayer(program, windows, set(order), cfg.batch_size)
            log.info("shortgpt sublayer: removed %s (calibration loss %.4f)", label(unit), current_base)
    repaired_program, repaired = pass_.repaired(program, ctx, order)
    new = remove_sublayers(repaired_program, order)
    changes = {
        "strategy": "perplexity",
        "unit": "sublayer",
        "granularity": "sublayer",
        "dense_loss": round(base, 6),
        "scores": {label(u): round(v, 6) for u, v in sorted(losses.items())},
        "removal_order": [label(u) for u in order],
        "removed": [label(u) for u in sorted(order)],
        "removed_params": removed_params,
        "removed_params_share": round(removed_params / total, 6),
        "blocks_before": len(program.structure.blocks),
        "blocks_after": len(new.structure.blocks),
        "rank_windows": len(windows),
        "iterative": cfg.iterative,
        "ranking_s": round(time.perf_counter() - start, 2),
        **repaired,
    }
    log.info("shortgpt: removed sublayers %s (%.1f%% of the blocks' linear parameters)",
             changes["removed"], 100 * removed_params / total)
    return new, changes


@torch.no_grad()
def loss_without_each_sublayer(program: Program, windows: torch.Tensor, removed: set[Unit], batch_size: int = 8
                               ) -> tuple[float, dict[Unit, float]]:
    """The mean next-token NLL on ``windows`` of the model without the sublayers in ``removed``, and of that model
    without each other sublayer alone. One walk through the blocks, as ``loss_without_each``, each candidate's stream
    carried from its block on (see SublayerRunner for how a sublayer is skipped)."""
    windows = distributed.local(windows, batch_size)
    runner = SublayerRunner(program, windows, batch_size)
    suffix = runner.full.load(runner.full.graphs.suffix)
    units = [(k, kind) for k in range(runner.blocks) for kind in KINDS if (k, kind) not in removed]
    totals: dict[Unit | None, float] = {}
    tokens = 0
    progress = Progress("shortgpt sublayer losses", runner.batches, "batches", every_s=10.0)
    for i in range(runner.batches):
        h = runner.entering(i)
        alive: dict[Unit, torch.Tensor] = {}  # candidate -> the stream of the model without it
        for k in range(runner.blocks):
            skip = {kind for b, kind in removed if b == k}
            alive = {u: runner.through(k, s, i, skip) for u, s in alive.items()}
            for kind in KINDS:
                if (k, kind) not in removed:
                    alive[(k, kind)] = runner.through(k, h, i, skip | {kind})
            h = runner.through(k, h, i, skip)
        ids = windows[i * runner.full.micro:(i + 1) * runner.full.micro].to(runner.full.device)
        for u, stream in [*alive.items(), (None, h)]:
            totals[u] = totals.get(u, 0.0) + next_token_nll(runner.full.logits(i, stream, suffix), ids)[0]
        tokens += ids.shape[0] * (ids.shape[1] - 1)
        progress.update(i + 1)
    *sums, tokens = distributed.sum_float(totals.get(None, 0.0), *(totals.get(u, 0.0) for u in units), tokens)
    return sums[0] / tokens, {u: total / tokens for u, total in zip(units, sums[1:])}
