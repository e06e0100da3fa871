"""Reports are data (report.json); this module writes them and renders the Markdown a person reads."""

from __future__ import annotations

import json
from pathlib import Path

from nexus_export.reporting.plots import report_plots
from nexus_export.reporting.report_html import render_html
from nexus_export.reporting.report_text import (
    CACHED,
    REMEASURED,
    bos_line,
    calibration_line,
    forms,
    generation_rows,
    headline,
    num,
    quantization_label,
    zero_shot_rows,
)


def write_reports(report: dict, folder: Path) -> None:
    """report.json, the plots (``folder/plots``), report.md and report.html of a run."""
    write_json(report, folder / "report.json")
    plots = report_plots(report, folder / "plots")
    (folder / "report.md").write_text(render_markdown(report, plots))
    (folder / "report.html").write_text(render_html(report, folder / "plots", plots))


def write_json(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, default=_plain) + "\n")


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


def render_markdown(report: dict, plots: list | None = None) -> str:
    """The Markdown report; ``plots`` (``plots.Plot``s written under plots/) are linked in a section of their own."""
    ppl = report["perplexity"]
    onnx = report["onnx"]
    summary = onnx["summary"]
    lines = [
        f"# nexus-export report: {report['model']['name']}",
        "",
        headline(report),
        "",
        "## Perplexity",
        f"Dataset: {ppl['dataset']} ({ppl['tokens']} predicted tokens).",
        *([calibration_line(report["calibration"])] if report.get("calibration") else []),
        *([bos_line(report["bos"]), ""] if report.get("bos") else [""]),
        "| | perplexity |",
        "|---|---|",
        f"| dense (PyTorch) | {ppl['dense']:.3f}{CACHED if ppl.get('dense_from_cache') else ''}"
        f"{REMEASURED.format(ppl['dense_remeasured']) if ppl.get('dense_remeasured') else ''} |",
        f"| pruned (PyTorch) | {ppl['pruned']:.3f} |" if ppl.get("pruned_runtime", "pytorch") == "pytorch" else
        "| pruned (PyTorch) | not run (--eval-runtime onnxruntime) |",
        f"| pruned (onnxruntime) | {num(ppl['onnx'], '.3f', ppl.get('onnx_eval', ''))} |",
        *_parity_windows(report["parity"]),
        *_rounding(ppl.get("activation_rounding")),
        "",
        "## Passes",
        "| pass | wall s | params before | params after | peak RSS MiB |",
        "|---|---|---|---|---|",
    ]
    for p in report["passes"]:
        lines.append(f"| {p['name']} | {p['wall_s']:.2f} | {p['params_before']:,} | {p['params_after']:,} | "
                     f"{p['peak_rss_mb']:.0f} |")
    for p in report["passes"]:
        lines += _changes(p)
    lines += _activations(report)
    lines += _zero_shot(report)
    lines += [
        "",
        "## ONNX",
        f"`{onnx['path']}`: {onnx['bytes'] / 2**20:.1f} MiB, opset {onnx['opset']}; {summary['layers']} MatMul/Gemm "
        f"layers with a weight ({forms(summary)}); weight sparsity {summary['sparsity']:.1%}; "
        f"{summary['targeted_layers']} targeted, {summary['nm_valid_layers']} of them N:M-valid. "
        f"Parity with PyTorch: max |logits diff| {num(report['parity']['max_abs_diff'], '.2e', 'not measured')}.",
        "",
        "| layer | k | n | sparsity | N:M valid | form | targeted |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in onnx["layers"]:
        valid = "-" if row["nm_valid"] is None else ("yes" if row["nm_valid"] else "NO")
        lines.append(f"| {row['layer']} | {row['k']} | {row['n']} | {row['sparsity']:.1%} | {valid} | {row['form']} | "
                     f"{'yes' if row['targeted'] else 'no'} |")
    if len(report.get("artifacts", [])) > 1:
        lines += ["", "## Model files", "| variant | file | MiB | quantization | onnxruntime perplexity | PyTorch "
                  "perplexity | parity max abs diff |", "|---|---|---|---|---|---|---|"]
        for a in report["artifacts"]:
            parity = a.get("parity_max_abs_diff", report["parity"]["max_abs_diff"])
            pytorch = a.get("pytorch_perplexity", report["perplexity"]["pruned"] if a is report["artifacts"][0] else None)
            lines.append(f"| {a['name']} | {a['path']} | {a['bytes'] / 2**20:.1f} | {quantization_label(a)} | "
                         f"{num(a['perplexity'], '.3f')} | {num(pytorch, '.3f')} | {num(parity, '.2e')} |")
        lines.append(f"Deployable: {report['deploy']['model']}.")
    lines += _generation(report)
    if report.get("latency"):
        lines += ["", "## Latency (onnxruntime CPU)", "| shape | median ms | p90 ms | runs |", "|---|---|---|---|"]
        for shape, lat in report["latency"].items():
            lines.append(f"| {shape} | {lat['median_ms']:.1f} | {lat['p90_ms']:.1f} | {lat['runs']} |")
    ex = report.get("execution", {})
    lines += ["", "## Time and memory",
              f"Device {ex.get('device', 'cpu')}, weights in {ex.get('dtype', 'fp32')} (computed in "
              f"{ex.get('compute_dtype', 'fp32')}), checkpoint {report['model'].get('checkpoint_bytes', 0) / 2**20:.1f} "
              f"MiB, memory budget {ex.get('memory_budget_bytes', 0) / 2**30:.2f} GiB.", "",
              "| stage | wall s | peak RSS MiB |", "|---|---|---|"]
    lines += [f"| {row['stage']} | {row['wall_s']:.1f} | {row['peak_rss_mb']:.0f} |" for row in report.get("stages", [])]
    lines += ["", f"Total {report['timings'].get('total_s', 0):.1f} s; peak RSS of the process "
                  f"{report['peak_rss_mb']:.0f} MiB.", ""]
    if plots:
        lines += ["## Plots", "The same in one page: report.html.", ""]
        lines += [f"![{p.title}](plots/{p.file})" for p in plots] + [""]
    return "\n".join(lines)


def _generation(report: dict) -> list[str]:
    gen = report.get("generation") or {}
    if not gen.get("models"):
        return ["", "## Generation", f"Not measured: {gen['skipped']}."] if gen.get("skipped") else []
    lines = ["", "## Generation",
             f"Key/value-cache models in {gen['protocol']}; decode {gen['decode_speedup']:.2f}x and prefill "
             f"{gen['prefill_speedup']:.2f}x the dense model's.", "",
             "| model | file | prefill tokens/s | decode tokens/s | cache KiB per token |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in generation_rows(report)]
    lines += ["", f"Greedy continuation of \"{gen['prompt']}\" ({gen['sample_tokens']} tokens):", ""]
    lines += [f"- {row['name']}: \"{' '.join(row['continuation'].split())}\"" for row in gen["models"]]
    return lines


def _rounding(rounding: dict | None) -> list[str]:
    """Activation thresholds nudged by a rounding-sized factor: PyTorch's own spread beside onnxruntime's difference."""
    if not rounding:
        return []
    diff = rounding["onnx_vs_pytorch_rel"]
    verdict = "" if diff is None else (f"; onnxruntime differs by {diff:.3%}, "
                                       f"{'within' if rounding['onnx_within_spread'] else 'outside'} it")
    return [f"| thresholds x (1 +- {rounding['nudge']:g}), {rounding['windows']} windows: PyTorch moves by | "
            f"{rounding['pytorch_spread_rel']:.3%}{verdict} |"]


def _parity_windows(parity: dict) -> list[str]:
    """The perplexity row of the parity windows, where both runtimes scored them."""
    if parity.get("perplexity_rel") is None:
        return []
    return [f"| parity windows ({parity['inputs']}): PyTorch / onnxruntime | {parity['pytorch_perplexity']:.3f} / "
            f"{parity['onnx_perplexity']:.3f} ({parity['perplexity_rel']:.3%} apart) |"]


def _changes(p: dict) -> list[str]:
    """What one pass changed: its scalar facts, and block scores as a table when the pass ranked blocks."""
    changes = p.get("changes", {})
    lines = ["", f"### {p['name']}"]
    for key, value in changes.items():
        if key in ("per_layer", "scores", "widths", "thresholds", "quantized", "layerwise", "permutation"):
            continue
        lines.append(f"- {key}: {value}")
    perm = changes.get("permutation")
    if perm:
        gains = ", ".join(f"{kind} {gain:+.2%}" for kind, gain in perm["kept_score_gain"].items())
        lines.append(f"- channel permutation: {perm['spaces']} spaces, kept score {gains}; " +
                     (f"logits unchanged (relative change {perm['logits_rel_change']:.1e})" if perm["applied"] else
                      f"NOT applied: the logits changed by {perm['logits_rel_change']:.1e} (relative)") +
                     f"; {perm['seconds']:.1f} s")
    owl = changes.get("layerwise")
    if owl:
        lines += [f"- OWL per-block sparsity (M {owl['m']}, lambda {owl['lambda']}):", "",
                  "| block | outlier share | sparsity |", "|---|---|---|"]
        lines += [f"| {block} | {share:.4%} | {owl['block_sparsity'][block]:.1%} |"
                  for block, share in owl["outlier_share"].items()]
    if changes.get("widths"):
        widths = changes["widths"]
        if len(set(widths.values())) == 1:
            lines.append(f"- stream width in every block: {next(iter(widths.values()))}")
        else:
            lines += ["", "| block | stream width |", "|---|---|"]
            lines += [f"| {block} | {width} |" for block, width in widths.items()]
    if changes.get("scores"):
        removed = set(changes.get("removed", []))
        lines += ["", "| block | score | removed |", "|---|---|---|"]
        for block, score in changes["scores"].items():
            lines.append(f"| {block} | {score:.5f} | {'yes' if int(block) in removed else ''} |")
    return lines


def _activations(report: dict) -> list[str]:
    """The thresholds an activation pass placed, with the sparsity each input reaches on the calibration and on the
    evaluation windows."""
    measured = report.get("activation_sparsity")
    if not measured:
        return []
    lines = ["", "## Activation sparsity",
             f"On the evaluation windows {measured['sparsity']:.1%} of the entries entering the blocks' linears are zero; "
             f"{measured['skippable_macs']:.1%} of their multiply-adds read a zero (what a kernel that skips zero "
             "inputs could save: onnxruntime has none, so this is not a speed-up here). The thresholds are hard: an "
             "entry within rounding of one is kept by one runtime and zeroed by the other, and later blocks compound "
             "that, so PyTorch and onnxruntime differ here by more than float rounding, as PyTorch differs from itself "
             "when the thresholds move by a millionth: the perplexity table above gives that spread, measured by this "
             "run, beside onnxruntime's difference.", "",
             "| input of | block | threshold | sparsity (calibration) | sparsity (evaluation) |", "|---|---|---|---|---|"]
    for p in report["passes"]:
        for name, t in p.get("changes", {}).get("thresholds", {}).items():
            evaluation = measured["per_input"].get(name, {}).get("sparsity")
            lines.append(f"| {', '.join(t['linears'])} | {t['block']} | {t['threshold']:.4g} | "
                         f"{t['calibration_sparsity']:.1%} | {num(evaluation, '.1%')} |")
    return lines


def _zero_shot(report: dict) -> list[str]:
    """The lm-eval accuracies of the dense and pruned models."""
    zs = report.get("zero_shot")
    if not zs:
        return []
    limit = f"the first {zs['limit']} examples of each task" if zs["limit"] else "every example"
    lines = ["", "## Zero-shot accuracy (lm-eval)",
             f"Multiple-choice accuracy on {limit}; pruned = "
             f"{'onnxruntime' if zs['runtime'] == 'onnxruntime' else 'PyTorch'}"
             + (" (dense from the evaluation cache)" if zs.get("dense_from_cache") else "") + ".", "",
             "| task | metric | dense | pruned | onnxruntime |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in zero_shot_rows(report)]
    return lines


