"""Zero-shot accuracy with lm-evaluation-harness (``lm-eval``, the ``eval`` extra) on any model nexus-export scores.

lm-eval asks a model for the log-likelihood of continuations; ``lm_eval_adapter.LogitsLM`` answers from a logits
function, so one adapter serves the PyTorch program (block by block, through the weight store) and the ONNX model in
onnxruntime. Multiple-choice tasks (hellaswag, arc_easy, piqa, ...) work; a task that generates text is refused when
lm-eval asks for it. Task names are checked against lm-eval's registry before any work, with close names suggested.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import torch

from nexus_export.errors import UserError
from nexus_export.evaluation import eval_cache
from nexus_export.graph.program import Program

log = logging.getLogger(__name__)

INSTALL = "pip install 'nexus-export[eval]' (lm-eval)"
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids [b, t], mask [b, t]) -> logits [b, t, v]
# (lm_eval_adapter, imported only once lm-eval is known to be there, names the same type for its own signature)


def task_manager(include: list[str] | None = None, defaults: bool = True):
    """lm-eval's task registry (its own tasks unless not ``defaults``), with the YAML task folders in ``include``."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(f"--eval-tasks needs lm-eval, which is not installed: {INSTALL}") from None
    for folder in include or []:
        if not Path(folder).is_dir():
            raise UserError(f"--eval-include {folder} is not a folder of lm-eval task YAML files")
    return TaskManager(include_path=list(include) if include else None, include_defaults=defaults)


def check_tasks(tasks: list[str], include: list[str] | None = None):
    """The task manager, once every name in ``tasks`` is known to lm-eval; unknown names are refused with the
    closest known ones. Tasks all found in ``include`` skip indexing lm-eval's own thousands (seconds)."""
    if include:
        local = task_manager(include, defaults=False)
        if all(name in local.all_tasks for name in tasks):
            return local
    manager = task_manager(include)
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
            raise UserError(f"lm-eval knows no task {name!r}" + (f"; close names: {', '.join(close)}" if close else
                                                                  "; list them with `lm-eval ls tasks`"))
    return manager


def evaluate_tasks(logits_fn: LogitsFn, tokenizer, tasks: list[str], manager, limit: int | None, max_length: int,
                   what: str, bos: int | None = None) -> dict[str, dict[str, float]]:
    """Accuracy (and normalized accuracy where the task has it) of each task: {task: {"acc": .., "acc_norm": ..}}."""
    import lm_eval

    from nexus_export.evaluation.lm_eval_adapter import LogitsLM

    model = LogitsLM(logits_fn, tokenizer, max_length, what, bos)
    out = lm_eval.simple_evaluate(model=model, tasks=list(tasks), limit=limit, task_manager=manager,
                                  bootstrap_iters=0, log_samples=False)
    scores = {}
    for task in tasks:
        metrics = out["results"][task]
        scores[task] = {name.split(",")[0]: float(value) for name, value in metrics.items()
                        if name.split(",")[0] in ("acc", "acc_norm") and isinstance(value, (int, float))}
        log.info("%s %s: %s", what, task, ", ".join(f"{k} {v:.3f}" for k, v in scores[task].items()))
    return scores


def _task_files(folders: list[str] | None) -> str:
    """A hash of the local task YAML files (and the data beside them): editing one is a new cache entry."""
    digest = hashlib.sha256()
    for folder in folders or []:
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


class ZeroShot:
    """The run's lm-eval tasks: checked before any work, scored on the dense model (cached like its perplexity), on
    the pruned program and on the ONNX model, as the recipe's evaluation runtime says."""

    def __init__(self, ev, loaded, manager, bos: int | None = None):
        self.ev, self.tokenizer, self.manager, self.bos = ev, loaded.tokenizer, manager, bos
        config = getattr(loaded.model, "config", None)
        self.max_length = min(getattr(config, "max_position_embeddings", None) or 2048, 4096)
        self.scores: dict[str, dict] = {task: {} for task in ev.tasks}
        self.dense_from_cache = False
        self.dense_cache_rejected: str | None = None

    @classmethod
    def check(cls, ev, loaded, bos: int | None = None) -> "ZeroShot":
        return cls(ev, loaded, check_tasks(ev.tasks, ev.task_paths), bos)

    def score(self, what: str, logits_fn) -> dict:
        result = evaluate_tasks(logits_fn, self.tokenizer, self.ev.tasks, self.manager, self.ev.task_limit,
                                self.max_length, what, self.bos)
        for task, metrics in result.items():
            self.scores[task][what] = metrics
        return result

    def dense(self, program: Program, device: torch.device, world) -> None:
        """The dense model's accuracies, from the evaluation cache when an earlier run measured them."""
        ev, entry = self.ev, None
        if ev.cache and not world.active:
            entry = eval_cache.key(program, ["lm-eval", version("lm_eval"), ev.tasks, ev.task_limit, self.bos,
                                             _task_files(ev.task_paths)], str(device))
            lookup = eval_cache.load(entry)
            self.dense_cache_rejected = lookup.rejected
            if lookup.result is not None:
                for task, metrics in lookup.result["tasks"].items():
                    self.scores[task]["dense"] = metrics
                self.dense_from_cache = True
                return
        result = self.score("dense", lambda ids, mask: program.logits(ids, mask))
        if entry:
            eval_cache.save(entry, {"tasks": result, "model": program.name})

    def to_dict(self, pruned_runtime: str) -> dict:
        """The report's ``zero_shot``; ``pruned_runtime`` is the runtime that scored the pruned model (the one asked
        for, or PyTorch when onnxruntime was skipped)."""
        tasks = {}
        for task, by in self.scores.items():
            tasks[task] = {**by, "pruned": by.get("pruned", by.get("onnx", {}))}
        return {"tasks": tasks, "limit": self.ev.task_limit, "runtime": pruned_runtime,
                "dense_from_cache": self.dense_from_cache,
                **({"dense_remeasured": self.dense_cache_rejected} if self.dense_cache_rejected else {})}
