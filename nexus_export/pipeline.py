"""Pipeline: run a validated recipe end to end and write the artifacts and the report.

load -> capture -> dense perplexity -> passes -> pruned perplexity -> lower to ONNX -> check the ONNX (zeros, N:M) ->
parity and onnxruntime perplexity -> latency -> report.json / report.md / recipe.yaml. Everything is written to a
temporary folder renamed into place only when complete.
"""

from __future__ import annotations

import logging
import platform
import shutil
import time
from pathlib import Path

import torch

from . import __version__
from .data import calibration_windows, evaluation_windows
from .errors import UserError
from .evaluate import program_perplexity
from .hf_export import save_hf
from .outdir import check_output_dir, staged_output
from .passbase import PassContext, peak_rss_mb
from .program import Program
from .progress import Progress
from .recipe import Recipe
from .registry import get_pass, get_runtime
from .report import render_markdown, write_json
from .zoo import load_model

log = logging.getLogger(__name__)


def run_recipe(recipe: Recipe, out_dir: str | Path, force: bool = False, resume: bool = False) -> dict:
    """Run ``recipe``; write model.onnx (+ data), recipe.yaml, report.json and report.md into ``out_dir``.

    Calibrated passes checkpoint every finished block in a hidden folder beside ``out_dir``; with ``resume`` an
    interrupted run continues from there. The checkpoint is removed once the run completes.
    """
    out_dir = Path(out_dir).resolve()
    checkpoints = out_dir.parent / f".{out_dir.name}.checkpoint"
    if resume and not checkpoints.is_dir():
        raise UserError(f"--resume: no checkpoint at {checkpoints}; run without --resume")
    check_output_dir(out_dir, force)
    runtime_cls = get_runtime(recipe.lowering.runtime)
    ok, why = runtime_cls.available()
    if not ok:
        raise UserError(f"runtime {recipe.lowering.runtime} is not available: {why}")
    runtime = runtime_cls()
    passes = [get_pass(step.name)(step.config) for step in recipe.passes]
    needs_calibration = any(pass_.needs_calibration for pass_ in passes)
    if recipe.lowering.save_hf and not all(pass_.keeps_architecture() for pass_ in passes):
        raise UserError("--save-hf needs passes that keep the architecture; removing attention sublayers does not")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with staged_output(out_dir, force) as tmp:
        loaded = load_model(recipe.model)
        if loaded.tokenizer is None:
            raise UserError(f"model {recipe.model} has no tokenizer; evaluation needs one")
        ev = recipe.evaluation
        cal = recipe.calibration
        check_context(loaded.model, ev.seq_len, "evaluation")
        if needs_calibration:
            check_context(loaded.model, cal.seq_len, "calibration")
        windows = evaluation_windows(loaded.tokenizer, ev.source, ev.windows, ev.seq_len)
        cal_windows = calibration_windows(loaded.tokenizer, cal.source, cal.samples, cal.seq_len, cal.seed) \
            if needs_calibration else None
        timings["load_s"] = time.perf_counter() - t0

        t = time.perf_counter()
        program = Program.from_model(loaded.model, loaded.tokenizer, name=loaded.name, origin=loaded.origin)
        timings["capture_s"] = time.perf_counter() - t
        for pass_ in passes:
            pass_.check(program)
        params_dense = program.num_parameters()
        log.info("model %s: %d blocks, %d linears, %.1fM parameters", loaded.name, len(program.structure.blocks),
                 len(program.structure.linears), params_dense / 1e6)

        t = time.perf_counter()
        dense_ppl, tokens = program_perplexity(program, windows, ev.batch_size, "dense perplexity")
        timings["eval_dense_s"] = time.perf_counter() - t
        log.info("dense perplexity %.3f on %d tokens", dense_ppl, tokens)

        pass_reports = []
        for i, pass_ in enumerate(passes):
            ctx = PassContext(calibration_windows=cal_windows, checkpoint_dir=checkpoints / f"{i}-{pass_.name}",
                              resume=resume)
            result = pass_.run(program, ctx)
            program = result.program
            pass_reports.append(result.report.to_dict())

        t = time.perf_counter()
        pruned_ppl, _ = program_perplexity(program, windows, ev.batch_size, "pruned perplexity")
        timings["eval_pruned_s"] = time.perf_counter() - t
        log.info("pruned perplexity %.3f", pruned_ppl)

        hf_parity = None
        if recipe.lowering.save_hf:
            hf_parity = save_hf(program, tmp / "hf")

        t = time.perf_counter()
        artifact = runtime.lower(program, tmp, opset=recipe.lowering.opset, external_data=recipe.lowering.external_data)
        timings["lower_s"] = time.perf_counter() - t
        pattern = _last_pattern(pass_reports)
        targeted = _targeted_layers(program, pass_reports)
        onnx_info = runtime.inspect(artifact, pattern, set(targeted))
        sess = runtime.session(artifact)
        parity_ids = windows[:2, : min(128, windows.shape[1])]
        parity = runtime.parity(program, sess, parity_ids)
        t = time.perf_counter()
        onnx_ppl, _ = runtime.perplexity(sess, windows, ev.batch_size,
                                         Progress("onnxruntime perplexity", len(windows), "windows"))
        timings["eval_onnx_s"] = time.perf_counter() - t
        latency = {}
        if ev.latency:
            latency["onnxruntime_cpu_1x128"] = runtime.latency(sess, 1, 128)
        del sess
        artifacts = [{"name": "fp32", "path": artifact.name, "bytes": runtime.artifact_bytes(artifact),
                      "perplexity": onnx_ppl}]
        for variant in runtime.variants(artifact, recipe, set(targeted)):
            sess = runtime.session(tmp / variant["path"])
            variant["perplexity"], _ = runtime.perplexity(sess, windows, ev.batch_size,
                                                          Progress(f"{variant['name']} perplexity", len(windows)))
            variant["parity_max_abs_diff"] = runtime.parity(program, sess, parity_ids)
            del sess
            artifacts.append(variant)
        deploy = artifacts[-1]
        _save_tokenizer(loaded, tmp / "tokenizer")

        per_layer = program.sparsity(targeted)
        total = sum(program.weight(n).numel() for n in targeted)
        overall = sum(per_layer[n] * program.weight(n).numel() for n in targeted) / total if total else 0.0
        timings["total_s"] = time.perf_counter() - t0
        report = {
            "tool": {"name": "nexus-export", "version": __version__, "torch": torch.__version__,
                     "python": platform.python_version()},
            "model": {"name": loaded.name, "origin": loaded.origin, "structure": program.structure.summary(),
                      "params_dense": params_dense, "params_pruned": program.num_parameters()},
            "recipe": recipe.to_dict(),
            "calibration": recipe.to_dict()["calibration"] if needs_calibration else None,
            "passes": pass_reports,
            "sparsity": {"overall": round(overall, 6), "pattern": _pattern_label(pattern, pass_reports),
                         "per_layer": {n: round(v, 6) for n, v in per_layer.items()}},
            "perplexity": {"dataset": f"{ev.source} evaluation, {ev.windows} windows x {ev.seq_len} tokens",
                           "tokens": tokens, "dense": dense_ppl, "pruned": pruned_ppl, "onnx": onnx_ppl,
                           "onnx_vs_pytorch_rel": abs(onnx_ppl - pruned_ppl) / pruned_ppl},
            "parity": {"max_abs_diff": parity, "inputs": "2 evaluation windows x 128 tokens",
                       **({"hf_folder_max_abs_diff": hf_parity} if hf_parity is not None else {})},
            "onnx": {"path": artifact.name, "bytes": runtime.artifact_bytes(artifact), "opset": recipe.lowering.opset,
                     **onnx_info},
            "latency": latency,
            "artifacts": artifacts,
            "deploy": {"model": deploy["path"], "variant": deploy["name"]},
            "timings": {k: round(v, 2) for k, v in timings.items()},
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        write_json(report, tmp / "report.json")
        (tmp / "report.md").write_text(render_markdown(report))
    shutil.rmtree(checkpoints, ignore_errors=True)
    log.info("wrote %s", out_dir)
    return report


def _save_tokenizer(loaded, folder: Path) -> None:
    """The tokenizer files and generation config a deployment needs beside the ONNX model."""
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
