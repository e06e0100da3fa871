"""Pipeline: run a validated recipe end to end and write the artifacts and the report.

open (config + shard headers; weights stay on disk) -> capture (meta) -> dense perplexity (and lm-eval accuracy;
both cached) -> passes -> pruned perplexity (and the logits parity compares with) -> Hugging Face folder -> lower to
ONNX (weights streamed from the store) -> check the ONNX (zeros, N:M) -> onnxruntime parity, perplexity (every window
or the parity windows, as --eval-runtime says), latency -> report.json / report.md / report.html / plots /
recipe.yaml. Every stage runs block by block through the weight store, so memory is one block's weights and the
activations, whatever the model's size; the store's edits stay in memory within the budget and spill to a scratch
file beside the output past it, and before lowering. Everything is written to a temporary folder renamed into place
only when complete.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from nexus_export import __version__, distributed, memory
from nexus_export.data import calibration_windows, choose_bos, evaluation_windows
from nexus_export.data.sources import mix_counts, parse_mix
from nexus_export.engine.calibration import LEAN_HESSIAN_WIDTH
from nexus_export.engine.pass_base import PassContext
from nexus_export.errors import UserError
from nexus_export.evaluation import eval_cache
from nexus_export.evaluation.activation_stats import input_sparsity, summarize_inputs
from nexus_export.evaluation.evaluate import program_perplexity
from nexus_export.evaluation.zero_shot import ZeroShot
from nexus_export.generate.loop import generate
from nexus_export.graph.capture import COMPUTE_DTYPE
from nexus_export.graph.hf_export import save_hf
from nexus_export.graph.kv_cache import has_cache
from nexus_export.graph.program import Program
from nexus_export.graph.runner import resolve_device
from nexus_export.memory import RssSampler, current_rss_mb, peak_rss_mb, release
from nexus_export.metrics import max_abs_diff, next_token_nll, perplexity
from nexus_export.models.zoo import LoadedModel, open_model
from nexus_export.outdir import check_distinct, check_output_dir, staged_output
from nexus_export.progress import Progress
from nexus_export.registry import get_pass, get_runtime
from nexus_export.reporting.model_card import hf_card
from nexus_export.reporting.report import write_reports
from nexus_export.run.grid_files import GridFiles
from nexus_export.run.recipe import Recipe, dtype_name, output_dtype, run_steps
from nexus_export.weights.store import DEFAULT_BUDGET, parse_bytes

log = logging.getLogger(__name__)

PARITY_WINDOWS, PARITY_TOKENS = 2, 128
# Every activation threshold times 1 +- this (about ten float32 ulps): PyTorch's own perplexity spread under it is
# what onnxruntime's difference from PyTorch is compared with (a hard threshold is discontinuous)
ROUNDING_NUDGE = 1e-6


class Stages:
    """Wall time and peak resident memory of each stage of a run, logged as it ends and kept for the report."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        with RssSampler() as rss:
            yield
            release()
        row = {"stage": name, "wall_s": round(time.perf_counter() - start, 2), "peak_rss_mb": round(rss.peak_mb, 1)}
        if rss.spike_mb:
            row.update(spike_mb=round(rss.spike_mb, 1), spike_at=rss.spike_at)
            log.warning("stage %s: the process's peak was %.0f MiB above every 50 ms sample: a short rise, noticed "
                        "at %s", name, rss.spike_mb, rss.spike_at or "the stage's end")
        self.rows.append(row)
        log.info("stage %s: %.1f s, peak RSS %.0f MiB (%.0f MiB after)", name, row["wall_s"], row["peak_rss_mb"],
                 current_rss_mb())


def run_recipe(recipe: Recipe, out_dir: str | Path, force: bool = False, resume: bool = False) -> dict | None:
    """Run ``recipe``; write model.onnx (+ data), recipe.yaml, report.json and report.md into ``out_dir``.

    Calibrated passes checkpoint every finished block in a hidden folder beside ``out_dir``; with ``resume`` an
    interrupted run continues from there. The checkpoint is removed once the run completes. Launched by torchrun,
    the processes share the calibration, evaluation and per-layer work (see ``distributed``); rank 0 writes
    everything and returns the report, the other ranks write nothing and return None.
    """
    device = distributed.process_device(resolve_device(recipe.execution.device))
    world = distributed.init(device)
    try:
        distributed.check_same("recipe or model", recipe.to_yaml())
        return _run_recipe(recipe, out_dir, force, resume, device, world)
    finally:
        distributed.shutdown(done=False)  # after a failure (a finished run has left the group already)


@contextmanager
def _no_output() -> Iterator[Path]:
    """What a rank other than 0 writes into: a private temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="nexus-export-rank-") as tmp:
        yield Path(tmp)


def _run_recipe(recipe: Recipe, out_dir: str | Path, force: bool, resume: bool, device: torch.device,
                world: distributed.World) -> dict | None:
    """The stages of one run, in order (each a method of ``_Run``), inside the staging folder."""
    run = _Run(recipe, check_output_dir(out_dir, force), resume, device, world)
    try:
        with staged_output(run.out_dir, force) if world.writer else _no_output() as tmp:
            run.tmp = tmp
            run.load()
            run.capture()
            run.evaluate_dense()
            run.run_passes()
            run.evaluate_pruned()
            distributed.shutdown()  # the shared work is done: rank 0 lowers, checks and writes alone
            if not world.writer:
                return None
            run.score_pruned_further()
            run.lower()
            run.check_onnx()
            run.score_onnx()
            run.write_variants()
            run.measure_generation()
            run.write_folder()
    finally:
        shutil.rmtree(run.scratch, ignore_errors=True)
    if world.writer:
        shutil.rmtree(run.checkpoints, ignore_errors=True)
    log.info("wrote %s", run.out_dir)
    return run.report


class _Run:
    """The state one run carries from stage to stage (every stage timed and measured by ``stages``)."""

    def __init__(self, recipe: Recipe, out_dir: Path, resume: bool, device: torch.device, world: distributed.World):
        self.recipe, self.out_dir, self.resume, self.device, self.world = recipe, out_dir, resume, device, world
        self.ev, self.cal = recipe.evaluation, recipe.calibration
        if Path(recipe.model).is_dir():  # its weights are read until the end: the output must not replace or hold it
            check_distinct(Path(recipe.model).resolve(), out_dir, ("--model", "--out"))
        self.checkpoints = out_dir.parent / f".{out_dir.name}.checkpoint"
        self.scratch = out_dir.parent / f".{out_dir.name}.scratch-{os.getpid()}"
        if resume and not self.checkpoints.is_dir():
            raise UserError(f"--resume: no checkpoint at {self.checkpoints}; run without --resume")
        runtime_cls = get_runtime(recipe.lowering.runtime)
        ok, why = runtime_cls.available()
        if not ok:
            raise UserError(f"runtime {recipe.lowering.runtime} is not available: {why}")
        self.runtime = runtime_cls()
        self.passes = [get_pass(step.name)(step.config) for step in run_steps(recipe)]
        self.needs_calibration = any(pass_.needs_calibration for pass_ in self.passes)
        refusals = [f"{pass_.name}: {pass_.hf_refusal()}" for pass_ in self.passes if pass_.hf_refusal()]
        if recipe.lowering.save_hf and refusals:
            raise UserError(f"--save-hf is not possible: {'; '.join(refusals)} (the ONNX model is written without it)")
        if world.size > self.ev.windows or (self.needs_calibration and world.size > self.cal.samples):
            raise UserError(f"{world.size} processes cannot share {self.ev.windows} evaluation and "
                            f"{self.cal.samples} calibration windows; use at least one window of each per "
                            "process, or fewer processes")
        self.dtype = output_dtype(recipe.execution.dtype)
        self.budget = None if recipe.execution.memory_budget == "auto" else parse_bytes(recipe.execution.memory_budget)
        self.stage = Stages()
        self.t0 = time.perf_counter()
        self.tmp: Path | None = None
        self.report: dict | None = None
        self.dense_program: Program | None = None
        self.dense_row: dict | None = None
        self.dense_entry: str | None = None

    def load(self) -> None:
        """The model (its weights left in the checkpoint), its BOS choice, the evaluation and calibration windows."""
        with self.stage("load"):
            self.loaded = loaded = open_model(self.recipe.model, convert_pickled=self.recipe.convert_pickled)
            if loaded.tokenizer is None:
                raise UserError(f"model {self.recipe.model} has no tokenizer; evaluation needs one")
            ev, cal = self.ev, self.cal
            check_context(loaded.model, ev.seq_len, "evaluation")
            if self.needs_calibration:
                check_context(loaded.model, cal.seq_len, "calibration")
            self.bos = bos = choose_bos(loaded.tokenizer, getattr(loaded.model.config, "model_type", None),
                                        self.recipe.bos)
            if bos.token_id is not None:
                log.info("every window starts with the BOS token %s (id %d): %s", bos.token, bos.token_id, bos.reason)
            self.windows = evaluation_windows(loaded.tokenizer, ev.source, ev.windows, ev.seq_len, bos.token_id)
            self.cal_windows = calibration_windows(loaded.tokenizer, cal.source, cal.samples, cal.seq_len, cal.seed,
                                                   bos.token_id) if self.needs_calibration else None
            self.tasks = ZeroShot.check(ev, loaded, bos.token_id) if ev.tasks else None

    def capture(self) -> None:
        """The program (captured on the meta device, weights in the store), every pass's checks, the plan."""
        with self.stage("capture"):
            program = Program.from_loaded(self.loaded, store_dtype=self.dtype, budget=self.budget or DEFAULT_BUDGET,
                                          scratch=self.scratch)
            if self.budget is None:
                self.budget = program.store.budget = auto_budget(*_block_need(program))
            program.device = str(self.device)
            for pass_ in self.passes:
                pass_.check(program)
                pass_.check_calibration(program, self.cal_windows)
            _check_variants(self.recipe, program, self.passes, self.dtype)
            self.onnx_eval, self.onnx_eval_why = _plan(program, self.budget, self.ev.onnx)
            if self.world.writer:
                _check_disk(self.out_dir.parent, _disk_need(self.recipe, program, self.dtype, self.budget))
        self.program = program
        self.checkpoint_bytes = program.weight_bytes()
        self.params_dense = program.num_parameters()
        self.out_dtype = self.dtype or program.main_dtype()
        log.info("model %s: %d blocks, %d linears, %.1fM parameters, %.2f GiB of %s weights; running on %s",
                 self.loaded.name, len(program.structure.blocks), len(program.structure.linears),
                 self.params_dense / 1e6, self.checkpoint_bytes / 2**30, dtype_name(self.out_dtype), self.device)

    def evaluate_dense(self) -> None:
        """The dense perplexity (and zero-shot accuracy), from the evaluation cache where an earlier run measured it."""
        with self.stage("eval_dense"):
            self.dense_ppl, self.tokens, self.dense_cached, self.cache_rejected = _dense_perplexity(
                self.program, self.windows, self.ev, self.device, self.world)
        log.info("dense perplexity %.3f on %d tokens%s", self.dense_ppl, self.tokens,
                 " (from the evaluation cache)" if self.dense_cached else "")
        if self.tasks:
            with self.stage("zero_shot_dense"):
                self.tasks.dense(self.program, self.device, self.world)

    def run_passes(self) -> None:
        """Every pass in order, each on the program the one before returned."""
        self.speed = (self.ev.decode_speed and self.onnx_eval and self.world.writer
                      and self.recipe.lowering.lower != "logits" and has_cache(self.program))
        if self.speed:  # the dense model, lowered beside the pruned one for the decode speed: the passes get a fork
            self.dense_program, self.program = self.program, self.program.fork()  # (sharing every weight until a
            # pass changes one)
        self.pass_reports = []
        for i, pass_ in enumerate(self.passes):
            ctx = PassContext(calibration_windows=self.cal_windows,
                              checkpoint_dir=self.checkpoints / f"{i}-{pass_.name}", resume=self.resume)
            with self.stage(f"pass:{pass_.name}"):
                result = pass_.run(self.program, ctx)
            self.program = result.program
            self.pass_reports.append(result.report.to_dict())
            if self.world.active:
                self.pass_reports[-1]["rank_wall_s"] = distributed.gather_objects(self.pass_reports[-1]["wall_s"])
            del result

    def evaluate_pruned(self) -> None:
        """The pruned perplexity in PyTorch (unless onnxruntime alone scores it) and the parity windows' logits."""
        self.parity_ids = self.windows[:PARITY_WINDOWS, : min(PARITY_TOKENS, self.windows.shape[1])]
        self.score_pytorch = self.ev.runtime != "onnxruntime" or not self.onnx_eval
        with self.stage("eval_pruned"):
            self.pruned_ppl = None
            if self.score_pytorch:
                self.pruned_ppl, _ = program_perplexity(self.program, self.windows, self.ev.batch_size,
                                                        "pruned perplexity")
                log.info("pruned perplexity %.3f", self.pruned_ppl)
            self.expected = self.program.logits(self.parity_ids) if self.onnx_eval and self.world.writer else None

    def score_pruned_further(self) -> None:
        """Zero-shot accuracy of the pruned program, the activation sparsity it reached, its Hugging Face folder."""
        if self.tasks and self.score_pytorch:
            with self.stage("zero_shot_pruned"):
                self.tasks.score("pruned", lambda ids, mask: self.program.logits(ids, mask))
        self.activations = None
        if any(pass_.sparsifies_activations for pass_ in self.passes):
            with self.stage("activation_sparsity"):
                self.activations = summarize_inputs(input_sparsity(self.program, self.windows, self.ev.batch_size))
            log.info("activation sparsity on the evaluation windows %.1f%% (%.1f%% of the blocks' multiply-adds read a "
                     "zero)", 100 * self.activations["sparsity"], 100 * self.activations["skippable_macs"])
        self.rounding = None
        if self.activations is not None and self.onnx_eval and self.score_pytorch:
            with self.stage("activation_rounding"):
                self.rounding = self._rounding_spread()
        self.hf_parity = None
        if self.recipe.lowering.save_hf:
            with self.stage("save_hf"):
                self.hf_parity = save_hf(self.program, self.tmp / "hf", self.dtype,
                                         check=self.params_dense * 4 <= self.budget)

    def _rounding_spread(self) -> dict:
        """PyTorch's perplexity with every activation threshold nudged by ROUNDING_NUDGE up and down, on the windows
        onnxruntime's perplexity is compared on (every window, or the parity windows under --eval-runtime pytorch)."""
        every = self.ev.runtime != "pytorch"
        windows = self.windows if every else self.parity_ids
        thresholds = next(p for p in reversed(self.passes) if p.sparsifies_activations)
        placed = self.pruned_ppl if every else program_perplexity(self.program, windows, self.ev.batch_size)[0]
        nudged = [program_perplexity(thresholds.nudged(self.program, 1 + sign * ROUNDING_NUDGE), windows,
                                     self.ev.batch_size, f"perplexity, thresholds x (1 {'+-'[sign < 0]} nudge)")[0]
                  for sign in (1, -1)]
        spread = max(abs(p - placed) / placed for p in nudged)
        log.info("activation thresholds x (1 +- %g): PyTorch perplexity moves by %.3g relative", ROUNDING_NUDGE, spread)
        return {"nudge": ROUNDING_NUDGE, "windows": "evaluation" if every else "parity", "pytorch": placed,
                "pytorch_nudged": nudged, "pytorch_spread_rel": spread}

    def _rounding_report(self) -> dict | None:
        """The rounding spread beside onnxruntime's difference from PyTorch on the same windows."""
        if self.rounding is None:
            return None
        if self.rounding["windows"] == "evaluation":
            onnx = self.onnx_ppl
            diff = abs(onnx - self.pruned_ppl) / self.pruned_ppl if onnx is not None else None
        else:
            diff = self.parity_ppl.get("perplexity_rel")
        within = None if diff is None else diff <= self.rounding["pytorch_spread_rel"]
        return {**self.rounding, "onnx_vs_pytorch_rel": diff, "onnx_within_spread": within}

    def lower(self) -> None:
        """The pruned program's ONNX models (and the dense one's cache model for the decode speed, unless an
        earlier run on this machine measured it); then the program's facts, and the program let go."""
        lowering = self.recipe.lowering
        with self.stage("lower"):
            # the lowering reads every weight tensor by tensor: the edits a pass left in memory (up to the budget;
            # a calibrated pass's finished blocks are read from its checkpoints) go to the scratch file first, so
            # they do not sit beside the lowering's own working set
            self.program.store.spill()
            self.artifact = self.runtime.lower(self.program, self.tmp, opset=lowering.opset,
                                               external_data=lowering.external_data, dtype=self.out_dtype,
                                               lower=lowering.lower)
        self.dense_dir = self.tmp / ".dense"  # removed before the output is complete
        if self.dense_program is not None:
            if self.ev.cache:  # the dense model's row, measured on this machine by an earlier run
                self.dense_entry = eval_cache.key(self.dense_program, [
                    "generation", GENERATION_PROMPT, SAMPLE_TOKENS, lowering.opset, dtype_name(self.out_dtype),
                    _machine(self.runtime)], str(self.device))
                self.dense_row = eval_cache.load(self.dense_entry).result
            if self.dense_row is None:
                with self.stage("lower_dense"):
                    self.runtime.lower(self.dense_program, self.dense_dir, opset=lowering.opset, dtype=self.out_dtype,
                                       lower="generate")
            self.dense_program = None
        program = self.program
        self.pattern = _last_pattern(self.pass_reports)
        self.targeted = _targeted_layers(program, self.pass_reports)
        self.per_layer = program.sparsity(self.targeted)
        sizes = {n: math.prod(program.store.shape(program.linear(n).weight)) for n in self.targeted}
        self.roles = {n: {"block": program.linear(n).block, "role": program.linear(n).role, "params": sizes[n]}
                      for n in self.targeted}
        total = sum(sizes.values())
        self.overall = sum(self.per_layer[n] * sizes[n] for n in self.targeted) / total if total else 0.0
        self.grids = _quantization_grids(program, self.recipe, self.scratch / "grids")
        self.model_report = {"name": self.loaded.name, "origin": self.loaded.origin,
                             "structure": program.structure.summary(), "params_dense": self.params_dense,
                             "params_pruned": program.num_parameters()}
        del program
        self.program = None  # the store's edits are in the ONNX file now: free them before onnxruntime
        release()

    def check_onnx(self) -> None:
        with self.stage("check_onnx"):
            self.onnx_info = self.runtime.inspect(self.artifact, self.pattern, set(self.targeted))

    def score_onnx(self) -> None:
        """Parity with PyTorch, the onnxruntime perplexity (every window, as --eval-runtime says) and latency."""
        runtime, ev = self.runtime, self.ev
        self.onnx_ppl, self.parity, self.parity_ppl, self.latency = None, None, {}, {}
        self.artifacts = [{"name": dtype_name(self.out_dtype), "path": self.artifact.name,
                           "bytes": runtime.artifact_bytes(self.artifact), "perplexity": None}]
        if self.onnx_eval:
            with self.stage("onnxruntime"):
                sess = runtime.session(self.artifact)
                self.parity, self.parity_ppl = _parity(runtime, sess, self.expected, self.parity_ids)
                if ev.runtime != "pytorch":
                    self.onnx_ppl, _ = runtime.perplexity(sess, self.windows, 1, Progress(
                        "onnxruntime perplexity", len(self.windows), "windows"))
                    log.info("onnxruntime perplexity %.3f", self.onnx_ppl)
                    if self.tasks:
                        self.tasks.score("onnx", lambda ids, mask: runtime.logits(sess, ids, mask))
                if ev.latency:
                    self.latency["onnxruntime_cpu_1x128"] = runtime.latency(sess, 1, 128)
                del sess
            self.artifacts[0]["perplexity"] = self.onnx_ppl
        if self.pruned_ppl is None:
            self.pruned_ppl = self.onnx_ppl  # --eval-runtime onnxruntime: the ONNX model is the pruned model's score
        self.pruned_runtime = "pytorch" if self.score_pytorch else "onnxruntime"

    def write_variants(self) -> None:
        """The fp16 and quantized model files the recipe asks for (their writing a stage of its own), each scored in
        onnxruntime."""
        runtime = self.runtime
        if self.recipe.quantize is None and self.recipe.lowering.precision != "fp16":
            return
        with self.stage("write_variants"):
            variants = runtime.variants(self.artifact, self.recipe, set(self.targeted), self.grids)
        for variant in variants:
            variant["perplexity"] = variant["parity_max_abs_diff"] = None
            if self.onnx_eval:
                with self.stage(f"variant:{variant['name']}"):
                    sess = runtime.session(self.tmp / variant["path"])
                    variant["perplexity"], _ = runtime.perplexity(
                        sess, self.windows, 1, Progress(f"{variant['name']} perplexity", len(self.windows)))
                    variant["parity_max_abs_diff"] = runtime.parity(self.expected, sess, self.parity_ids)
                    del sess
                if variant.get("method") == "gptq" and self.score_pytorch:  # the program held GPTQ's dequantized
                    variant["pytorch_perplexity"] = self.pruned_ppl  # weights
                    variant["vs_pytorch_rel"] = abs(variant["perplexity"] - self.pruned_ppl) / self.pruned_ppl
            self.artifacts.append(variant)

    def measure_generation(self) -> None:
        """Decode speed and greedy continuations of the dense model and every model file written."""
        self.generation = None
        if self.speed:
            with self.stage("generation"):
                self.generation = _generation(self.runtime, self.loaded.tokenizer, self.dense_row or self.dense_dir,
                                              self.tmp, self.artifacts)
            if self.dense_entry and self.dense_row is None:
                eval_cache.save(self.dense_entry, self.generation["models"][0])
        shutil.rmtree(self.dense_dir, ignore_errors=True)

    def write_folder(self) -> None:
        """The tokenizer files and genai_config.json beside the models, the recipe, the report in its three forms."""
        tmp, runtime, loaded = self.tmp, self.runtime, self.loaded
        deploy = self.artifacts[-1]
        _save_tokenizer(loaded, tmp)
        cache_model = runtime.cache_model(tmp / deploy["path"])
        if cache_model is not None:
            runtime.write_generation_config(tmp, cache_model, loaded.model.config, loaded.tokenizer,
                                            getattr(loaded.model, "generation_config", None))
        self.report = report = self._report(deploy)
        (tmp / "recipe.yaml").write_text(self.recipe.to_yaml())
        write_reports(report, tmp)
        if self.recipe.lowering.save_hf:
            (tmp / "hf" / "README.md").write_text(hf_card(report))

    def _report(self, deploy: dict) -> dict:
        ev, bos, recipe = self.ev, self.bos, self.recipe
        pruned_ppl, onnx_ppl = self.pruned_ppl, self.onnx_ppl
        return {
            "tool": {"name": "nexus-export", "version": __version__, "torch": torch.__version__,
                     "python": platform.python_version()},
            "model": {**self.model_report, "checkpoint_bytes": self.checkpoint_bytes},
            "execution": {"device": str(self.device), "dtype": dtype_name(self.out_dtype),
                          "compute_dtype": dtype_name(COMPUTE_DTYPE), "memory_budget_bytes": self.budget,
                          "world_size": self.world.size, "backend": self.world.backend},
            "recipe": recipe.to_dict(),
            "calibration": _calibration_report(self.cal) if self.needs_calibration else None,
            "passes": self.pass_reports,
            "sparsity": {"overall": round(self.overall, 6), "pattern": _pattern_label(self.pattern, self.pass_reports),
                         "per_layer": {n: round(v, 6) for n, v in self.per_layer.items()}, "roles": self.roles},
            **({"activation_sparsity": self.activations} if self.activations is not None else {}),
            "bos": bos.to_dict(),
            **({"zero_shot": self.tasks.to_dict(self.pruned_runtime)} if self.tasks else {}),
            "perplexity": {"dataset": f"{ev.source} evaluation, {ev.windows} windows x {ev.seq_len} tokens"
                                      + (f" (a BOS token and {ev.seq_len - 1} of text)" if bos.token_id is not None
                                         else ""),
                           "tokens": self.tokens, "dense": self.dense_ppl, "dense_from_cache": self.dense_cached,
                           **({"dense_remeasured": self.cache_rejected} if self.cache_rejected else {}),
                           "pruned": pruned_ppl, "pruned_runtime": self.pruned_runtime, "onnx": onnx_ppl,
                           "onnx_vs_pytorch_rel": (abs(onnx_ppl - pruned_ppl) / pruned_ppl
                                                   if onnx_ppl is not None and self.score_pytorch else None),
                           "onnx_eval": _onnx_eval_note(self.onnx_eval, self.onnx_eval_why, ev.runtime),
                           **({"activation_rounding": self._rounding_report()} if self.rounding else {})},
            "parity": {"max_abs_diff": self.parity, "inputs": f"{PARITY_WINDOWS} evaluation windows x "
                                                              f"{self.parity_ids.shape[1]} tokens", **self.parity_ppl,
                       **({"hf_folder_max_abs_diff": self.hf_parity} if recipe.lowering.save_hf else {})},
            "onnx": {"path": self.artifact.name, "bytes": self.runtime.artifact_bytes(self.artifact),
                     "opset": recipe.lowering.opset, **self.onnx_info},
            "latency": self.latency,
            "generation": self.generation if self.generation is not None else {"skipped": _generation_note(
                ev.decode_speed, self.onnx_eval, self.onnx_eval_why, self.runtime.cache_model(self.artifact))},
            "artifacts": self.artifacts,
            "deploy": {"model": deploy["path"], "variant": deploy["name"]},
            "stages": self.stage.rows,
            "timings": {**{f"{row['stage']}_s": row["wall_s"] for row in self.stage.rows},
                        "total_s": round(time.perf_counter() - self.t0, 2)},
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }


def _dense_perplexity(program: Program, windows: torch.Tensor, ev, device: torch.device,
                      world: distributed.World) -> tuple[float, int, bool, str | None]:
    """The dense model's perplexity and predicted tokens, from the evaluation cache when an earlier run measured it on
    the same weights and windows (and then whether it came from there, and why a cache entry that was there was not
    used). A distributed run always measures it: its processes need not share a disk."""
    use_cache = ev.cache and not world.active
    entry = eval_cache.key(program, ["pytorch perplexity", ev.batch_size], str(device), windows) if use_cache else None
    lookup = eval_cache.load(entry) if entry else eval_cache.Lookup(None)
    if lookup.result is not None:
        return lookup.result["perplexity"], lookup.result["tokens"], True, None
    ppl, tokens = program_perplexity(program, windows, ev.batch_size, "dense perplexity")
    if entry:
        eval_cache.save(entry, {"perplexity": ppl, "tokens": tokens, "model": program.name,
                                "written": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return ppl, tokens, False, lookup.rejected


def _parity(runtime, sess, expected: torch.Tensor, parity_ids: torch.Tensor) -> tuple[float, dict]:
    """From one onnxruntime call on the parity windows: max |logits difference| against the program's ``expected``
    logits, and both runtimes' perplexity there with their relative difference (the check that stays when onnxruntime
    does not score every window, --eval-runtime pytorch)."""
    actual = runtime.logits(sess, parity_ids, torch.ones_like(parity_ids))
    diff = max_abs_diff(expected, actual)
    log.info("parity on %s: max abs diff %.3g", tuple(parity_ids.shape), diff)
    pytorch, onnx = (perplexity(*next_token_nll(logits, parity_ids)) for logits in (expected, actual))
    return diff, {"pytorch_perplexity": pytorch, "onnx_perplexity": onnx,
                  "perplexity_rel": abs(onnx - pytorch) / pytorch}


GENERATION_PROMPT = "The best way to spend a quiet afternoon is"
SAMPLE_TOKENS = 32  # the greedy continuation every report shows, dense beside pruned


def _generation(runtime, tokenizer, dense: Path | dict, out_dir: Path, artifacts: list[dict]) -> dict:
    """Decode speed (prefill and decode tokens per second at batch 1) and a greedy continuation of
    ``GENERATION_PROMPT`` for the dense model and every model file written, each from its key/value-cache model in
    onnxruntime, one session at a time. ``dense``: the folder the dense model was lowered into, or its row as an
    earlier run on this machine measured it (kept with ``from_cache``)."""
    prompt = tokenizer(GENERATION_PROMPT, add_special_tokens=True)["input_ids"]
    models = [] if isinstance(dense, dict) else [("dense", None, runtime.cache_model(dense / "model.onnx"))]
    models += [(a["name"] if i else "pruned", a["path"], runtime.cache_model(out_dir / a["path"]))
               for i, a in enumerate(artifacts)]
    rows = [{**dense, "from_cache": True}] if isinstance(dense, dict) else []
    for name, artifact, path in models:
        decoder = runtime.decoder(path)  # one session for the speed and the sample
        speed = runtime.decode_speed(decoder)
        sample = generate(decoder, prompt, SAMPLE_TOKENS)
        del decoder
        rows.append({"name": name, "path": artifact, "cache_model": path.name if artifact else None, **speed,
                     "continuation": tokenizer.decode(sample.tokens), "tokens": sample.tokens})
        release()
        log.info("%s: prefill %.0f tokens/s, decode %.1f tokens/s; %r", name, speed["prefill_tokens_per_s"],
                 speed["decode_tokens_per_s"], rows[-1]["continuation"])
    dense, pruned = rows[0], rows[1]
    return {"prompt": GENERATION_PROMPT, "prompt_ids": prompt, "sample_tokens": SAMPLE_TOKENS,
            "protocol": f"onnxruntime CPU, batch 1, a {dense['prompt_tokens']}-token prompt then {dense['new_tokens']} "
                        f"greedy tokens, median of {dense['runs']} runs after a warm-up",
            "decode_speedup": pruned["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
            "prefill_speedup": pruned["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"],
            "models": rows}


def _machine(runtime) -> list:
    """What a speed measured here depends on besides the model: the host, its processor and cores, the runtime."""
    return [platform.node(), platform.machine(), platform.processor(), os.cpu_count(), runtime.available()[1]]


def _generation_note(asked: bool, onnx_eval: bool, onnx_eval_why: str, cache_model) -> str:
    """Why the report has no decode speed."""
    if not asked:
        return "--no-decode-speed"
    if not onnx_eval:
        return f"onnxruntime evaluation skipped: {onnx_eval_why}"
    if cache_model is None:
        return "no key/value-cache model (not a Hugging Face causal LM, or --lower logits)"
    return "not measured"


def _onnx_eval_note(ran: bool, why: str, runtime: str) -> str:
    """What onnxruntime did, in the report's words."""
    if not ran:
        return f"skipped: {why}"
    return "run" if runtime != "pytorch" else "parity windows only (--eval-runtime pytorch)"


def _calibration_report(cal) -> dict:
    """The calibration settings, and for a mix each source's share and number of windows."""
    parts = parse_mix(cal.source)
    mix = None if parts is None else [{"source": name, "share": share, "windows": count}
                                      for (name, share), count in zip(parts, mix_counts(parts, cal.samples))]
    return {**dataclasses.asdict(cal), **({"mix": mix} if mix else {})}


def _disk_need(recipe: Recipe, program: Program, dtype: torch.dtype | None, budget: int) -> dict[str, int]:
    """Bytes the run may write beside its output, by what writes them (an estimate from the parameter count): the ONNX
    data file, the variants (and the int4 file's scratch codes and GPTQ's grids while it is written) and the Hugging
    Face folder, the scratch file where a pass's edits spill (past the budget, and all of them before lowering), the
    resume checkpoints of calibrated passes (their blocks are read from there instead of spilling), and the copy of
    a wide Hessian that SparseGPT and GPTQ factor in place."""
    params = program.num_parameters()
    width = torch.finfo(dtype or program.main_dtype()).bits // 8
    need = {"model.onnx.data": params * width}
    if recipe.lowering.precision == "fp16":
        need["model.fp16.onnx.data"] = params * 2
    if recipe.quantize is not None:  # the weights' bits, and one float32 scale per group of 32 (at most)
        q = recipe.quantize
        need[f"model.q{q.bits}.onnx.data"] = params * q.bits // 8 + params // 8
        need["its codes' scratch copy while it is written"] = need[f"model.q{q.bits}.onnx.data"]
        if q.method == "gptq":  # float32 scales and uint8 zero points, from lowering to the int4 file
            need["GPTQ's grids, until the int4 file is written"] = params * 5 // q.group_size
    if recipe.lowering.save_hf:
        need["hf/"] = params * width
    steps = run_steps(recipe)
    keeping = [step for step in steps if get_pass(step.name).keeps_blocks]
    edited = program.weight_bytes() if recipe.passes or recipe.quantize is not None else 0  # at most every weight
    if edited and (len(keeping) < len(steps) or not steps):  # a checkpointed block is read from there
        need["scratch (a pass's edits, spilled before lowering)"] = edited
    if keeping:  # each finished block of such a pass stays on disk for --resume until the run ends
        blocks = sum(program.store.nbytes(lin.weight) for lin in program.structure.in_blocks())
        need["resume checkpoints (until the run ends)"] = blocks * len(keeping)
    widest = max((lin.in_features for lin in program.structure.in_blocks()), default=0)
    if widest > LEAN_HESSIAN_WIDTH and any(get_pass(step.name).factors_hessians for step in steps):
        need["a Hessian's copy while it is factored in place (the widest input's, float32)"] = widest * widest * 4
    return need


def _check_disk(folder: Path, need: dict[str, int]) -> None:
    """Refuse, before any work, a run whose outputs cannot fit on the disk that holds ``folder``."""
    folder = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(folder).free
    total = int(sum(need.values()) * 1.1)  # a tenth more: ONNX graphs, reports, tokenizer files, rounding
    if total > free:
        parts = ", ".join(f"{name} {_size(n)}" for name, n in need.items())
        raise UserError(f"the outputs need about {_size(total, up=True)} on the disk of {folder} ({parts}, and a "
                        f"tenth more for the rest) and it has {_size(free)} free; free space there or choose "
                        "another --out")


def _check_variants(recipe: Recipe, program: Program, passes: list, dtype: torch.dtype | None) -> None:
    """The fp16 variant starts from float32 weights (round to nearest reads a 16-bit weight through its Cast; GPTQ's
    own check says which grids it can keep in a 16-bit dtype), and block-wise quantization needs a block size that
    divides every layer's input width (a sliced model's widths included): refused now, not after the work."""
    written = dtype or program.main_dtype()
    if recipe.lowering.precision == "fp16" and written != torch.float32:
        raise UserError(f"--fp16 starts from float32 weights, and this run writes {dtype_name(written)}; add "
                        "--dtype fp32")
    if recipe.quantize is None:
        return
    block = recipe.quantize.group_size
    widths = [(lin.in_features, lin.name) for lin in program.structure.linears.values()]
    for pass_ in passes:
        if hasattr(pass_, "block_widths"):  # slicegpt: the widths it will leave
            first, kept = pass_.block_widths(program)
            widths += [(w, f"the stream slicegpt leaves ({w} wide)") for w in sorted({first, *kept})]
    for width, what in widths:
        if width % block:
            raise UserError(f"quantize group size {block} does not divide the input width {width} of {what}; choose "
                            "a group size that divides every layer's input width (e.g. 16 or 32)")


def _quantization_grids(program: Program, recipe: Recipe, folder: Path) -> GridFiles | None:
    """The GPTQ pass's scales and zero points by layer, for writing MatMulNBits once the program is gone (None
    without GPTQ): saved in ``folder`` a layer at a time and read back a layer at a time (grid_files.py)."""
    if recipe.quantize is None or recipe.quantize.method != "gptq":
        return None
    return GridFiles.save(get_pass("gptq").grid_items(program), folder)


def _block_need(program: Program) -> tuple[int, str]:
    """What the budget must hold: one decoder block's linear weights as the store keeps a pass's edits of them (the
    output dtype, or the checkpoint's: a block is run one linear at a time in float32, outside the budget), and that
    dtype's name for messages."""
    dtype = program.store.dtype or program.main_dtype()
    return program.block_bytes(dtype), str(dtype).removeprefix("torch.")


def auto_budget(block: int, dtype: str = "float32", available: int | None = None) -> int:
    """The memory budget ``--memory-budget auto`` chooses: 2 GiB, or one decoder block's weights in ``dtype`` (as a
    pass's edits are kept; rounded up to 64 MiB) where that is more, so that a default never refuses a wide model;
    refused with what to do when the machine's free memory (``MemAvailable``) cannot hold one block."""
    need = -(-block // 2**26) * 2**26
    available = memory.available_bytes() if available is None else available
    if available is not None and need > available:
        raise UserError(f"one decoder block of this model needs {_size(block)} in {dtype} and this machine has "
                        f"{_size(available)} free; free memory or run on a machine with more")
    wanted = max(DEFAULT_BUDGET, need)
    budget = wanted if available is None else max(need, min(wanted, available))
    why = f"one decoder block needs {_size(block)}" if need > DEFAULT_BUDGET else "2 GiB holds a decoder block"
    if budget < wanted:
        why += f"; capped at the {_size(available)} free"
    log.info("memory budget %s (auto: %s)", _size(budget), why)
    return budget


def _plan(program: Program, budget: int, onnx_eval: str) -> tuple[bool, str]:
    """Check the budget holds one block; say whether to evaluate the ONNX model in onnxruntime, and why not (its
    session holds every weight in float32)."""
    block, dtype = _block_need(program)
    if block > budget:
        raise UserError(f"--memory-budget {_size(budget)} is smaller than one decoder block of this model in {dtype} "
                        f"({_size(block)}); use --memory-budget {_size(block, up=True)} or more")
    need = program.num_parameters() * 4
    fits = need <= budget
    why = (f"onnxruntime would hold {_size(need)} of float32 weights, more than the memory budget of {_size(budget)}")
    if onnx_eval == "on" and not fits:
        raise UserError(f"--onnx-eval on: {why}; pass --onnx-eval auto (or off) to skip it, or --memory-budget "
                        f"{_size(need, up=True)} or more")
    if onnx_eval == "off":
        return False, "--onnx-eval off"
    if not fits:
        log.warning("onnxruntime evaluation skipped: %s (--onnx-eval on with a larger --memory-budget runs it)", why)
        return False, why
    return True, ""


def _size(nbytes: int, up: bool = False) -> str:
    """A byte count as --memory-budget writes it (KiB below 1 MiB, MiB below 10 GiB, else GiB); ``up``: rounded up."""
    for unit, scale in (("KiB", 2**10), ("MiB", 2**20), ("GiB", 2**30)):
        if nbytes < 2**20 * (1 if unit == "KiB" else 10 * 2**10 if unit == "MiB" else float("inf")):
            return f"{math.ceil(nbytes / scale) if up else round(nbytes / scale)}{unit}"
    return f"{nbytes}"


def _save_tokenizer(loaded: LoadedModel, folder: Path) -> None:
    """The tokenizer files and generation config a deployment needs, beside the ONNX models (where onnxruntime-genai
    and transformers both look for them)."""
    folder.mkdir(parents=True, exist_ok=True)
    loaded.tokenizer.save_pretrained(folder)
    generation = getattr(loaded.model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)


def check_context(model, seq_len: int, what: str) -> None:
    """Windows longer than the model's context are refused up front."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and seq_len > limit:
        raise UserError(f"{what} windows of {seq_len} tokens are longer than the model's context ({limit}); "
                        f"use --seq-len {limit} or less")


def _last_pattern(pass_reports: list[dict]) -> tuple[int, int] | None:
    for rep in reversed(pass_reports):
        pattern = rep.get("changes", {}).get("pattern")
        if pattern and pattern != "unstructured":
            n, m = pattern.split(":")
            return int(n), int(m)
    return None


def _pattern_label(pattern: tuple[int, int] | None, pass_reports: list[dict]) -> str:
    """"N:M", "unstructured", or "none" when no masking pass ran (structural passes only)."""
    if pattern:
        return f"{pattern[0]}:{pattern[1]}"
    masked = any(rep.get("changes", {}).get("per_layer") for rep in pass_reports)
    return "unstructured" if masked else "none"


def _targeted_layers(program: Program, pass_reports: list[dict]) -> list[str]:
    """Layers any masking pass targeted (in graph order); without one, every linear in the decoder blocks."""
    names = set()
    for rep in pass_reports:
        names.update(rep.get("changes", {}).get("per_layer", {}))
    known = [n for n in list(program.structure.linears) + list(program.structure.embeddings) if n in names]
    return known or [lin.name for lin in program.structure.in_blocks()]
