"""The report's facts as text: the one-line headline, the terminal's generation lines, and the rows and phrases the
Markdown and HTML pages share (so each page renders, and neither imports the other's renderer)."""

from __future__ import annotations

CACHED = " (from the evaluation cache)"
REMEASURED = " (measured again: the cached entry was ignored, {})"


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


def bos_line(bos: dict) -> str:
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


def generation_rows(report: dict) -> list[list[str]]:
    """One row per model of the decode-speed table: name, file, prefill and decode tokens/s, cache KiB per token."""
    return [[row["name"] + (CACHED if row.get("from_cache") else ""),
             row.get("cache_model") or "(dense, lowered for this measure)",
             f"{row['prefill_tokens_per_s']:.0f}",
             f"{row['decode_tokens_per_s']:.1f}", f"{row['kv_bytes_per_token'] / 1024:.1f}"]
            for row in (report.get("generation") or {}).get("models", [])]


def num(value, fmt: str, missing: str = "-") -> str:
    """A number formatted, or ``missing`` when it was not measured."""
    return format(value, fmt) if value is not None else (missing or "-")


def zero_shot_rows(report: dict) -> list[list[str]]:
    """[task, metric, dense, pruned (PyTorch), ONNX] rows of the run's lm-eval accuracies ("-" where not run)."""
    rows = []
    for task, by in report["zero_shot"]["tasks"].items():
        for metric in sorted(by.get("dense", {})):
            rows.append([task, metric] + [num(by.get(what, {}).get(metric), ".1%") for what in ("dense", "pruned",
                                                                                                    "onnx")])
    return rows


def quantization_label(artifact: dict) -> str:
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


def forms(summary: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in summary.get("by_form", {}).items()) or "none"
