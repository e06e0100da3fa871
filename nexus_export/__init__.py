"""nexus-export: prune LLMs as graphs, lower to ONNX, run and report.

The package's folders follow the pipeline: ``weights`` (shards, the WeightStore), ``graph`` (capture, the Program,
its structure and edits), ``models`` (the zoo), ``engine`` (what a pass is, calibration), ``evaluation``,
``generate``, ``reporting``, ``run`` (recipes, the pipeline, sweeps) and ``api`` (the user-facing classes), over a
ground floor of small shared modules. The names users import come from here lazily (``from nexus_export import
SparseGPTPruner``), so importing the package stays cheap; the module paths of the flat layout before it (for example
``nexus_export.pruning``) still import, as the modules that replaced them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from typing import Any

__version__ = "0.1.0"

# the public names and the modules that define them
_API = {
    "SparseGPTPruner": "api.pruning", "SparseGPTConfig": "api.pruning", "WandaPruner": "api.pruning",
    "MagnitudePruner": "api.pruning", "NMSparsityPruner": "api.pruning", "ShortGPTPruner": "api.pruning",
    "SliceGPTPruner": "api.pruning", "DynamicPruner": "api.pruning", "GPTQQuantizer": "api.pruning",
    "export_onnx": "api.pruning", "evaluate_perplexity": "api.pruning",
    "CubicSparsityScheduler": "api.gradual", "apply_sparsity": "api.gradual",
    "load_model": "models.zoo", "open_model": "models.zoo",
    "Program": "graph.program",
    "generate_text": "generate.text", "generate": "generate.loop", "Sampling": "generate.loop",
    "Recipe": "run.recipe", "run_recipe": "run.pipeline",
    "calibration_windows": "data", "evaluation_windows": "data",
}

# module paths of the flat layout -> where those modules live now
_MOVED = {
    "zoo": "models.zoo", "store": "weights.store", "shards": "weights.shards",
    "checkpoint_keys": "weights.checkpoint_keys", "pickled": "weights.pickled", "hf_export": "graph.hf_export",
    "capture": "graph.capture", "kv_cache": "graph.kv_cache", "program": "graph.program",
    "structure": "graph.structure", "blocks": "graph.blocks", "runner": "graph.runner",
    "graph_edit": "graph.graph_edit", "surgery": "graph.surgery", "slicing": "graph.slicing",
    "passbase": "engine.pass_base", "calibration": "engine.calibration", "evaluate": "evaluation.evaluate",
    "eval_cache": "evaluation.eval_cache", "zero_shot": "evaluation.zero_shot",
    "lm_eval_adapter": "evaluation.lm_eval_adapter", "activation_stats": "evaluation.activation_stats",
    "generation": "generate.loop", "textgen": "generate.text", "report": "reporting.report",
    "report_html": "reporting.report_html", "report_text": "reporting.report_text", "plots": "reporting.plots",
    "model_card": "reporting.model_card", "compare": "reporting.compare", "recipe": "run.recipe",
    "pipeline": "run.pipeline", "sweep": "run.sweep", "pruning": "api.pruning", "gradual": "api.gradual",
}


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an import of a flat-layout path with the module that replaced it (one module object, two names)."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, old = fullname.rpartition(".")
        if package == __name__ and old in _MOVED:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(f"{__name__}.{_MOVED[spec.name.rpartition('.')[2]]}")

    def exec_module(self, module):
        pass  # already executed under its own name


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())
