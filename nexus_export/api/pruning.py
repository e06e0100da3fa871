"""The Python API users already know: pruner classes over the pass pipeline, for a model in a Python session.

    pruner = SparseGPTPruner(pruning_config=SparseGPTConfig(sparsity=0.5, blocksize=128, percdamp=0.01))
    metrics = pruner.prune_model(model, calibration_dataloader, nsamples=128)

Each pruner captures the model, runs the same pass the CLI runs, and returns a metrics dict (achieved_sparsity,
per_layer_sparsity, params_before/after, wall_seconds, report). Masking pruners (magnitude, N:M, Wanda, SparseGPT)
write the pruned weights into the given model in place (the captured program shares its tensors). Structural pruners
(SliceGPT, ShortGPT) leave the given model untouched and return the new model in ``metrics["model"]``.
``GPTQQuantizer(bits=4).quantize_model(model, calibration_data)`` quantizes after any of them (prune, then quantize).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from nexus_export.api.gradual import CubicSparsityScheduler, apply_sparsity
from nexus_export.engine.pass_base import PassContext
from nexus_export.errors import UserError
from nexus_export.graph.program import Program, require_module
from nexus_export.registry import get_pass, get_runtime

__all__ = ["SparseGPTConfig", "SparseGPTPruner", "WandaPruner", "MagnitudePruner", "NMSparsityPruner", "ShortGPTPruner",
           "SliceGPTPruner", "DynamicPruner", "GPTQQuantizer", "export_onnx", "evaluate_perplexity", "CubicSparsityScheduler", "apply_sparsity", "calibration_tensor"]


def calibration_tensor(data: Iterable | torch.Tensor | None, nsamples: int | None) -> torch.Tensor | None:
    """Stack token ids from a DataLoader-like iterable (tensors [L] or [B, L], or dicts with ``input_ids``)."""
    if data is None:
        return None
    if nsamples is not None and (isinstance(nsamples, bool) or not isinstance(nsamples, int) or nsamples < 1):
        raise UserError(f"nsamples must be a positive whole number (or None for all the data), got {nsamples!r}")
    rows: list[torch.Tensor] = []
    items = [data] if isinstance(data, torch.Tensor) else data
    for item in items:
        if isinstance(item, dict):
            if "input_ids" not in item:
                raise UserError(f"a calibration batch is a dict without 'input_ids' (keys: {sorted(item)})")
            item = item["input_ids"]
        elif isinstance(item, (list, tuple)) and item and isinstance(item[0], torch.Tensor):
            item = item[0]
        if not isinstance(item, torch.Tensor) or item.is_floating_point() or item.dim() not in (1, 2):
            what = f"a {item.dtype} tensor of shape {tuple(item.shape)}" if isinstance(item, torch.Tensor) else \
                type(item).__name__
            raise UserError(f"calibration data must yield token ids (integer tensors [seq] or [batch, seq], or dicts "
                            f"with 'input_ids'); it yielded {what}")
        rows.extend(item.reshape(-1, item.shape[-1]).long())
        if nsamples is not None and len(rows) >= nsamples:
            break
    if not rows:
        raise UserError("the calibration data yielded no samples")
    if nsamples is not None and len(rows) < nsamples:
        raise UserError(f"nsamples={nsamples} but the calibration data provides only {len(rows)} samples")
    lengths = {len(r) for r in rows}
    if len(lengths) > 1:
        raise UserError(f"calibration samples have different lengths {sorted(lengths)[:5]}; chunk or pad them to one "
                        "length")
    return torch.stack(rows[:nsamples] if nsamples is not None else rows)


def _sparsity_options(sparsity: float | dict, pattern: str | None = None) -> dict:
    """A sparsity or a per-layer dict in the seed's syntax, as pass options (a dict leaves other layers dense)."""
    if isinstance(sparsity, dict):
        return {"schedule": dict(sparsity), **({"pattern": pattern} if pattern else {"sparsity": 0.0})}
    return {"sparsity": sparsity, **({"pattern": pattern} if pattern else {})}


class _Pruner:
    method = ""
    structural = False  # True: the given model is left untouched and the result is a new model

    def options(self) -> dict:
        raise NotImplementedError

    def _check(self) -> None:
        """Validate the options now, as the pass will (the same messages as the CLI and recipes)."""
        get_pass(self.method)(self.options())

    def prune_model(self, model: torch.nn.Module, calibration_dataloader: Iterable | None = None,
                    nsamples: int | None = None) -> dict[str, Any]:
        """Prune ``model`` in place (masking pruners) and return metrics."""
        require_module(model)
        windows = calibration_tensor(calibration_dataloader, nsamples)
        pass_ = get_pass(self.method)(self.options())
        if pass_.needs_calibration and windows is None:
            raise UserError(f"{type(self).__name__} needs calibration data: pass a DataLoader of token ids")
        was_training = model.training
        start = time.perf_counter()
        try:
            program = Program.from_model(model, name=type(model).__name__, write_through=not self.structural)
            pass_.check(program)
            result = pass_.run(program, PassContext(calibration_windows=windows))
        finally:
            model.train(was_training)
        return _metrics(result, time.perf_counter() - start)


def _metrics(result, wall: float) -> dict[str, Any]:
    report = result.report.to_dict()
    changes = report["changes"]
    per_layer = {name: entry["sparsity"] for name, entry in changes.get("per_layer", {}).items()}
    return {
        "achieved_sparsity": changes.get("overall_sparsity", 0.0),
        "per_layer_sparsity": per_layer,
        "params_before": report["params_before"],
        "params_after": report["params_after"],
        "wall_seconds": wall,
        "report": report,
        "program": result.program,
    }


@dataclass(frozen=True)
class SparseGPTConfig:
    """SparseGPT settings in the seed API's names; ``sparsity`` may be a per-layer dict."""

    sparsity: float | dict = 0.5
    blocksize: int = 128
    percdamp: float = 0.01
    uniform: bool = True
    pattern: str | None = None
    true_sequential: bool = False


class SparseGPTPruner(_Pruner):
    """SparseGPT (OBS weight updates) over the ``sparsegpt`` pass; writes the pruned weights into the model."""

    method = "sparsegpt"

    def __init__(self, pruning_config: SparseGPTConfig | None = None, **kwargs):
        self.config = pruning_config or SparseGPTConfig(**kwargs)
        if not self.config.uniform:
            raise UserError("SparseGPT prunes every layer to its own target (uniform=True); use a per-layer dict "
                            "as sparsity for different targets")
        self._check()

    def options(self) -> dict:
        c = self.config
        return {**_sparsity_options(c.sparsity, c.pattern), "blocksize": c.blocksize, "percdamp": c.percdamp,
                "true_sequential": c.true_sequential}


class WandaPruner(_Pruner):
    """Wanda (|W| * ||X||, per output row) over the ``wanda`` pass; writes the pruned weights into the model."""

    method = "wanda"

    def __init__(self, sparsity: float | dict = 0.5, pattern: str | None = None, true_sequential: bool = False):
        self._options = {**_sparsity_options(sparsity, pattern), "true_sequential": true_sequential}
        self._check()

    def options(self) -> dict:
        return self._options


class MagnitudePruner(_Pruner):
    """Magnitude pruning over the ``magnitude`` pass; no calibration data needed."""

    method = "magnitude"

    def __init__(self, sparsity: float | dict = 0.5, pattern: str | None = None):
        self._options = _sparsity_options(sparsity, pattern)
        self._check()

    def options(self) -> dict:
        return self._options


class NMSparsityPruner(_Pruner):
    """N:M sparsity (N zeros in every M inputs) with a calibrated method: ``sparsegpt`` (default), ``wanda`` or
    ``magnitude``. ``permute``: first reorder the channels (residual stream, MLP inner, attention values) so the
    groups keep more importance; the model's function is unchanged and its weights are written back permuted."""

    def __init__(self, n: int = 2, m: int = 4, method: str = "sparsegpt", permute: bool = False):
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (n, m)):
            raise UserError(f"n and m must be whole numbers (n zeros in every m weights), got n={n!r}, m={m!r}")
        if not 0 < n < m:
            raise UserError(f"N:M needs 0 < n < m (n zeros in every m weights), got n={n}, m={m}")
        if method not in ("sparsegpt", "wanda", "magnitude"):
            raise UserError(f"method must be sparsegpt, wanda or magnitude, got {method!r}")
        self.method = method
        self._options = {"pattern": f"{n}:{m}", "permute": permute}
        self._check()

    def options(self) -> dict:
        return self._options


class ShortGPTPruner(_Pruner):
    """ShortGPT block removal. Structural: the given model is left untouched; ``metrics["model"]`` is the new
    Hugging Face model (when the architecture allows it; else None) and ``metrics["program"]`` the pruned program."""

    method = "shortgpt"
    structural = True

    def __init__(self, n_layers_to_remove: int | None = None, removal_strategy: str = "similarity",
                 remove_ratio: float | None = None, layers: list[int] | None = None):
        self._options = {"remove": n_layers_to_remove, "remove_ratio": remove_ratio, "layers": layers,
                         "strategy": removal_strategy}
        self._options = {k: v for k, v in self._options.items() if v is not None}
        self._check()

    def options(self) -> dict:
        return self._options

    def prune_model(self, model: torch.nn.Module, calibration_dataloader: Iterable | None = None,
                    nsamples: int | None = None, tokenizer=None) -> dict[str, Any]:
        """Ranks blocks on the calibration data (all of it unless ``nsamples`` says how much), or without data on
        64 built-in Austen windows (needs the model's tokenizer). The given model keeps all its blocks."""
        from nexus_export.graph.hf_export import to_hf_model

        require_module(model)
        if calibration_dataloader is None and "layers" not in self._options:
            calibration_dataloader = _builtin_windows(model, tokenizer, nsamples or 64)
        metrics = super().prune_model(model, calibration_dataloader, nsamples)
        program = metrics["program"]
        partial = program.origin.get("attention_removed") or program.origin.get("mlp_removed")
        metrics["model"] = None if partial else to_hf_model(program)
        return metrics


class SliceGPTPruner(_Pruner):
    """SliceGPT (PCA rotation of the residual stream, then slicing) over the ``slicegpt`` pass. Structural: the given
    model is left untouched. No Hugging Face class holds the result (shortcut matrices on the residual connections), so
    ``metrics["model"]`` is a torch module ``(input_ids, attention_mask) -> logits`` and ``metrics["program"]`` the
    sliced program (for ``export_onnx`` or a masking pass). ``slice_ratio`` may be a dict of block ranges
    (``{"layer_0-5": 0.1, "layer_6-29": 0.3}``)."""

    method = "slicegpt"
    structural = True

    def __init__(self, slice_ratio: float | dict = 0.25, round_to: int = 8, damping: float = 0.01):
        if isinstance(slice_ratio, dict):
            self._options = {"slicing": 0.0, "schedule": dict(slice_ratio)}
        else:
            self._options = {"slicing": slice_ratio}
        self._options.update(round_to=round_to, damping=damping)
        self._check()  # bad options fail here, not after capture

    def options(self) -> dict:
        return self._options

    def prune_model(self, model: torch.nn.Module, calibration_dataloader: Iterable | None = None,
                    nsamples: int | None = None) -> dict[str, Any]:
        """Fuses, rotates and slices a copy of the captured program; ``model`` keeps its weights."""
        metrics = super().prune_model(model, calibration_dataloader, nsamples)
        metrics["model"] = metrics["program"].module()
        metrics["widths"] = metrics["report"]["changes"]["widths"]
        return metrics


class DynamicPruner(_Pruner):
    """Activation sparsity over the ``activation`` pass: thresholds in front of the blocks' linears, calibrated so that
    ``sparsity`` of each input's entries are zeroed (per tensor). The given model is left untouched;
    ``metrics["model"]`` is a torch module ``(input_ids, attention_mask) -> logits`` that applies the thresholds,
    ``metrics["program"]`` the rewritten program (for ``export_onnx`` or more passes), ``metrics["thresholds"]`` the
    threshold of each input by its first linear."""

    method = "activation"
    structural = True

    def __init__(self, sparsity: float = 0.4, roles: list[str] | None = None):
        self._options = {"sparsity": sparsity, **({"roles": list(roles)} if roles is not None else {})}
        self._check()

    def options(self) -> dict:
        return self._options

    def prune_model(self, model: torch.nn.Module, calibration_dataloader: Iterable | None = None,
                    nsamples: int | None = None) -> dict[str, Any]:
        metrics = super().prune_model(model, calibration_dataloader, nsamples)
        changes = metrics["report"]["changes"]
        metrics["model"] = metrics["program"].module()
        metrics["thresholds"] = {name: t["threshold"] for name, t in changes["thresholds"].items()}
        metrics["achieved_sparsity"] = changes["calibration_sparsity"]
        return metrics

    def prune_by_activation(self, model: torch.nn.Module, input: torch.Tensor, threshold: float = 0.1
                            ) -> dict[str, Any]:
        """The seed's dynamic pruning: for this ``input`` [batch, seq] only, zero every entry below one global
        ``threshold`` in the inputs of the chosen linears. Returns the logits, the measured sparsity (``sparsity``:
        mean over input entries; ``skippable_macs``) and the program; ``model`` is left untouched. To compare with
        calibrated thresholds, pick the global one that gives the same measured sparsity."""
        from nexus_export.evaluation.activation_stats import input_sparsity, summarize_inputs

        require_module(model)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
            raise UserError(f"threshold must be a number >= 0, got {threshold!r}")
        ids = calibration_tensor(input, None)
        program = Program.from_model(model, name=type(model).__name__)
        thresholded = get_pass(self.method)(self.options()).with_threshold(program, threshold)
        measured = summarize_inputs(input_sparsity(thresholded, ids))
        everything = [name for name, e in measured["per_input"].items() if e["sparsity"] == 1.0]
        if everything:
            raise UserError(f"threshold {threshold} zeroes every entry entering {', '.join(everything[:3])} on this "
                            "input; choose a smaller threshold")
        return {"logits": thresholded.logits(ids), "sparsity": measured["sparsity"],
                "skippable_macs": measured["skippable_macs"], "program": thresholded}


class GPTQQuantizer:
    """GPTQ 4- or 8-bit weights over the ``gptq`` pass: every linear of the decoder blocks is rounded to its grid with
    the rounding error compensated on the calibration data, and the dequantized weights (exactly on the grid) are
    written into the float32 model in place; weights already zero (a pruner before it) stay zero. ``clip_search``
    shrinks a group's range where that rounds its weights closer (False: the whole range, as GPTQ's reference).
    ``metrics["program"]`` keeps the scales: ``export_onnx(metrics["program"], path)`` writes MatMulNBits, while
    ``export_onnx(model, path)`` writes the dequantized weights in float32."""

    def __init__(self, bits: int = 4, group_size: int = 128, act_order: bool = False, sym: bool = True,
                 percdamp: float = 0.01, blocksize: int = 128, clip_search: bool = True):
        self._options = {"bits": bits, "group_size": group_size, "act_order": act_order, "sym": sym,
                         "percdamp": percdamp, "blocksize": blocksize, "clip_search": clip_search}
        get_pass("gptq")(self._options)  # bad options fail here, with the CLI's messages

    def quantize_model(self, model: torch.nn.Module, calibration_data: Iterable | torch.Tensor | None = None,
                       nsamples: int | None = None) -> dict[str, Any]:
        """Quantize ``model`` in place; returns bits, group_size, layers, wall_seconds, report and program."""
        require_module(model)
        windows = calibration_tensor(calibration_data, nsamples)
        if windows is None:
            raise UserError("GPTQQuantizer needs calibration data (a DataLoader or tensor of token ids): its error "
                            "compensation uses the layers' inputs")
        pass_ = get_pass("gptq")(self._options)
        was_training = model.training
        start = time.perf_counter()
        try:
            program = Program.from_model(model, name=type(model).__name__, write_through=True)
            pass_.check(program)
            result = pass_.run(program, PassContext(calibration_windows=windows))
        finally:
            model.train(was_training)
        report = result.report.to_dict()
        return {"bits": self._options["bits"], "group_size": self._options["group_size"],
                "layers": report["changes"]["layers"], "wall_seconds": time.perf_counter() - start,
                "report": report, "program": result.program}


def _builtin_windows(model, tokenizer, nsamples: int) -> torch.Tensor:
    from nexus_export.data import calibration_windows, choose_bos
    from nexus_export.models.zoo import tokenizer_for

    tokenizer = tokenizer or tokenizer_for(model)
    if tokenizer is None:
        raise UserError("no calibration data and no tokenizer: pass calibration_dataloader, or tokenizer= so the "
                        "built-in calibration text can be used")
    bos = choose_bos(tokenizer, getattr(getattr(model, "config", None), "model_type", None))
    return calibration_windows(tokenizer, "austen", nsamples, 128, 0, bos.token_id)


def export_onnx(model_or_program: torch.nn.Module | Program, path: str | Path) -> Path:
    """Lower a model (captured first) or a Program to ONNX at ``path`` (+ external data, and its key/value-cache twin);
    returns the path. A program a GPTQ pass quantized is written with MatMulNBits (its weights as 4- or 8-bit codes
    and its own scales, computing exactly what the program evaluated)."""
    program = model_or_program if isinstance(model_or_program, Program) else Program.from_model(model_or_program)
    return get_runtime("onnxruntime")().export(program, Path(path))


def evaluate_perplexity(model: torch.nn.Module | Program, text_or_dataset: str | torch.Tensor = "austen",
                        tokenizer=None, windows: int = 64, seq_len: int = 512, bos: str = "auto") -> float:
    """Perplexity on token windows: a tensor [n, seq], or a source for the evaluation split (``austen``, a text file,
    a folder) tokenized with ``tokenizer`` (by default the model's own, when it came from a local folder); ``bos``
    (auto, always, never) starts each window with the BOS token, as ``--bos`` does."""
    from nexus_export.data import choose_bos, evaluation_windows
    from nexus_export.evaluation.evaluate import program_perplexity
    from nexus_export.graph.capture import CausalLM
    from nexus_export.metrics import next_token_nll, perplexity
    from nexus_export.models.zoo import tokenizer_for

    if isinstance(text_or_dataset, torch.Tensor):
        ids = text_or_dataset.long()
    else:
        if tokenizer is None:
            tokenizer = model.tokenizer if isinstance(model, Program) else tokenizer_for(model)
        if tokenizer is None:
            raise UserError("evaluating on text needs a tokenizer: pass tokenizer=")
        choice = choose_bos(tokenizer, getattr(getattr(model, "config", None), "model_type", None), bos)
        ids = evaluation_windows(tokenizer, text_or_dataset, windows, seq_len, choice.token_id)
    if isinstance(model, Program):
        return program_perplexity(model, ids)[0]
    module, total, tokens = CausalLM(model), 0.0, 0  # plain forward passes: no capture, the model is left as it is
    with torch.no_grad():
        for start in range(0, len(ids), 4):
            batch = ids[start:start + 4]
            nll, count = next_token_nll(module(batch, torch.ones_like(batch)), batch)
            total, tokens = total + nll, tokens + count
    return perplexity(total, tokens)
