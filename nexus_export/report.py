"""Reports are data (report.json); this module writes them and renders the Markdown a person reads."""

from __future__ import annotations

import json
from pathlib import Path


CACHED = " (from the evaluation cache)"
REMEASURED = " (measured again: the cached entry was ignored, {})"


def write_reports(report: dict, folder: Path) -> None:
    """report.json, the plots (``folder/plots``), report.md and report.html of a run."""
    from .plots import report_plots
    from .report_html import render_html

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


def headline(report: dict) -> str:
    """One line: model, passes, sparsity, perplexities, parity."""
    ppl = report["perplexity"]
    passes = " + ".join(p["name"] for p in report["passes"]) or "no pass"
    for p in report["passes"]:
        widths = p.get("changes", {}).get("widths")
        if widths:
            passes += f" (width {p['changes']['hidden_before']} -> {'/'.join(map(str, sorted(set(widths.values()))))})"
    onnx = f"onnxruntime {ppl['onnx']:.2f}" if ppl.get("onnx") is not None else "onnxruntime not run"
    rel = report["parity"].get("perplexity_rel")
    if ppl.get("onnx") is None and rel is not None:
        onnx = f"onnxruntime within {rel:.1e} relative on the parity windows"
    dense = f"{ppl['dense']:.2f}" + (" (cached)" if ppl.get("dense_from_cache") else "")
    parity = report["parity"]["max_abs_diff"]
    activations = report.get("activation_sparsity")
    acts = f" | activations {activations['sparsity']:.1%} zero" if activations else ""
    return (f"{report['model']['name']} | {passes} | sparsity {report['sparsity']['overall']:.1%} "
            f"({report['sparsity']['pattern']}){acts} | perplexity dense {dense} -> pruned {ppl['pruned']:.2f} "
            f"({onnx}) | parity max|diff| " + (f"{parity:.2e}" if parity is not None else "-"))


def generation_lines(report: dict) -> list[str]:
    """The decode speed of the dense and pruned models and their greedy continuations of the report's prompt, for
    the terminal (nothing when the run measured none)."""
    gen = report.get("generation") or {}
    if not gen.get("models"):
        return [f"  decode speed: not measured ({gen['skipped']})"] if gen.get("skipped") else []
    dense, pruned = gen["models"][0], gen["models"][1]
    cached = " (dense from the evaluation cache)" if dense.get("from_cache") else ""
    lines = [f"  decode ({gen['protocol']}){cached}: dense {dense['decode_tokens_per_s']:.1f} -> pruned "
             f"{pruned['decode_tokens_per_s']:.1f} tokens/s ({gen['decode_speedup']:.2f}x); prefill "
             f"{dense['prefill_tokens_per_s']:.0f} -> {pruned['prefill_tokens_per_s']:.0f} tokens/s; key/value cache "
             f"{dense['kv_bytes_per_token'] / 1024:.1f} -> {pruned['kv_bytes_per_token'] / 1024:.1f} KiB per token"]
    for row in gen["models"][2:]:
        lines.append(f"  decode {row['name']} ({row['cache_model']}): {row['decode_tokens_per_s']:.1f} tokens/s")
    lines.append(f"  greedy continuation of {gen['prompt']!r} ({gen['sample_tokens']} tokens, through the key/value "
                 "cache):")
    width = max(len(row["name"]) for row in gen["models"])
    for row in gen["models"]:
        lines.append(f"    {row['name']:<{width}}: {' '.join(row['continuation'].split())!r}")
    return lines


def _bos_line(bos: dict) -> str:
    """One sentence on the BOS choice (--bos) and why."""
    if bos["token_id"] is None:
        return f"Windows start without a BOS token (bos {bos['mode']}: {bos['reason']})."
    return (f"Every window starts with the BOS token {bos['token']} (id {bos['token_id']}; bos {bos['mode']}: "
            f"{bos['reason']}).")


def calibration_line(cal: dict | None) -> str | None:
    """One sentence on the calibration windows and, for a mix, each source's share (None without calibration)."""
    if not cal:
        return None
    where = (", ".join(f"{m['source']} {m['share']:.0%} ({m['windows']} windows)" for m in cal["mix"])
             if cal.get("mix") else cal["source"])
    return f"Calibration: {cal['samples']} windows x {cal['seq_len']} tokens (seed {cal['seed']}) of {where}."


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
        *([_bos_line(report["bos"]), ""] if report.get("bos") else [""]),
        "| | perplexity |",
        "|---|---|",
        f"| dense (PyTorch) | {ppl['dense']:.3f}{CACHED if ppl.get('dense_from_cache') else ''}"
        f"{REMEASURED.format(ppl['dense_remeasured']) if ppl.get('dense_remeasured') else ''} |",
        f"| pruned (PyTorch) | {ppl['pruned']:.3f} |" if ppl.get("pruned_runtime", "pytorch") == "pytorch" else
        "| pruned (PyTorch) | not run (--eval-runtime onnxruntime) |",
        f"| pruned (onnxruntime) | {num(ppl['onnx'], '.3f', ppl.get('onnx_eval', ''))} |",
        *_parity_windows(report["parity"]),
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
        f"layers with a weight ({_forms(summary)}); weight sparsity {summary['sparsity']:.1%}; "
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
            lines.append(f"| {a['name']} | {a['path']} | {a['bytes'] / 2**20:.1f} | {_quantization(a)} | "
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


def generation_rows(report: dict) -> list[list[str]]:
    """One row per model of the decode-speed table: name, file, prefill and decode tokens/s, cache KiB per token."""
    return [[row["name"] + (CACHED if row.get("from_cache") else ""),
             row.get("cache_model") or "(dense, lowered for this measure)",
             f"{row['prefill_tokens_per_s']:.0f}",
             f"{row['decode_tokens_per_s']:.1f}", f"{row['kv_bytes_per_token'] / 1024:.1f}"]
            for row in (report.get("generation") or {}).get("models", [])]


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


def _parity_windows(parity: dict) -> list[str]:
    """The perplexity row of the parity windows, where both runtimes scored them."""
    if parity.get("perplexity_rel") is None:
        return []
    return [f"| parity windows ({parity['inputs']}): PyTorch / onnxruntime | {parity['pytorch_perplexity']:.3f} / "
            f"{parity['onnx_perplexity']:.3f} ({parity['perplexity_rel']:.3%} apart) |"]


def num(value, fmt: str, missing: str = "-") -> str:
    """A number formatted, or ``missing`` when it was not measured."""
    return format(value, fmt) if value is not None else (missing or "-")


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
             "when the thresholds move by a millionth (bench/activation_rounding.py measures that spread).", "",
             "| input of | block | threshold | sparsity (calibration) | sparsity (evaluation) |", "|---|---|---|---|---|"]
    for p in report["passes"]:
        for name, t in p.get("changes", {}).get("thresholds", {}).items():
            evaluation = measured["per_input"].get(name, {}).get("sparsity")
            lines.append(f"| {', '.join(t['linears'])} | {t['block']} | {t['threshold']:.4g} | "
                         f"{t['calibration_sparsity']:.1%} | {num(evaluation, '.1%')} |")
    return lines


def zero_shot_rows(report: dict) -> list[list[str]]:
    """[task, metric, dense, pruned (PyTorch), ONNX] rows of the run's lm-eval accuracies ("-" where not run)."""
    rows = []
    for task, by in report["zero_shot"]["tasks"].items():
        for metric in sorted(by.get("dense", {})):
            rows.append([task, metric] + [num(by.get(what, {}).get(metric), ".1%") for what in ("dense", "pruned",
                                                                                                    "onnx")])
    return rows


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


def _quantization(artifact: dict) -> str:
    """How a model file's weights were quantized, in a few words ("-" for float weights)."""
    if "method" not in artifact:
        return "-"
    words = [artifact["method"].upper(), f"{artifact['bits']}-bit", f"groups of {artifact['group_size']}",
             "symmetric" if artifact["sym"] else "asymmetric"]
    if artifact.get("act_order"):
        words.append("act-order")
    if artifact.get("clip_search"):
        words.append("ranges searched")
    if artifact.get("joint"):
        words.append("joint sweep")
    kept = artifact.get("pruned_zeros_kept")
    return ", ".join(words) + ("" if kept is None else f"; pruned zeros kept: {'yes' if kept else 'NO'}")


def _forms(summary: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in summary.get("by_form", {}).items()) or "none"


