"""report.html: one self-contained page per run (its plots embedded as data URIs, no script, no network).

Built from report.json and the PNGs ``plots`` wrote, with the same facts as report.md laid out for reading: the
headline, the results, the plots, per-pass and per-stage time and memory, the recipe, the model files and the ONNX
layers. ``page``, ``table`` and ``image`` are shared with the sweep and comparison pages.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import yaml

from nexus_export.reporting.plots import INSTALL, Plot
from nexus_export.reporting.report_text import CACHED, calibration_line, generation_rows, headline, num, zero_shot_rows

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}pre{background:#f6f6f6;padding:0.8em;overflow:auto}
.headline{font-size:1.05em;background:#eef4ff;padding:0.6em;border-radius:4px}figure{display:inline-block;margin:0.5em}
figcaption{text-align:center;color:#555}img{max-width:100%}"""


def page(title: str, parts: list[str]) -> str:
    """A whole HTML document around ``parts`` (already HTML)."""
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n" + "\n".join(parts) + "\n</body>\n</html>\n")


def table(headers: list[str], rows: list[list]) -> str:
    """An HTML table; cells are escaped text (None is shown as -)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('-' if c is None else str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def image(folder: Path, plot: Plot) -> str:
    """``folder/plot.file`` embedded as a PNG data URI, with its title as caption."""
    data = base64.b64encode((folder / plot.file).read_bytes()).decode("ascii")
    title = html.escape(plot.title)
    return f'<figure><img src="data:image/png;base64,{data}" alt="{title}"><figcaption>{title}</figcaption></figure>'


def plots_section(folder: Path, plots: list[Plot]) -> list[str]:
    if not plots:
        return ["<h2>Plots</h2>", f"<p>No plots: {html.escape(INSTALL)}.</p>"]
    return ["<h2>Plots</h2>", "<div>" + "".join(image(folder, p) for p in plots) + "</div>"]


def render_html(report: dict, plots_folder: Path, plots: list[Plot]) -> str:
    """The run's page."""
    ppl, parity = report["perplexity"], report["parity"]
    results = [
        ["dense (PyTorch)", num(ppl["dense"], ".3f") + (CACHED if ppl.get("dense_from_cache") else "")],
        ["pruned (PyTorch)", num(ppl["pruned"], ".3f") if ppl.get("pruned_runtime", "pytorch") == "pytorch" else
         "not run (--eval-runtime onnxruntime)"],
        ["pruned (onnxruntime, every window)", num(ppl.get("onnx"), ".3f", ppl.get("onnx_eval", ""))],
    ]
    if parity.get("perplexity_rel") is not None:
        results.append(["parity windows: PyTorch / onnxruntime", f"{parity['pytorch_perplexity']:.3f} / "
                                                                  f"{parity['onnx_perplexity']:.3f}"])
    results += [["max |logits diff| PyTorch vs onnxruntime", num(parity.get("max_abs_diff"), ".2e")],
                ["weight sparsity of the targeted layers", f"{report['sparsity']['overall']:.1%} "
                                                           f"({report['sparsity']['pattern']})"],
                ["parameters", f"{report['model']['params_dense']:,} -> {report['model']['params_pruned']:,}"],
                ["total time", f"{report['timings'].get('total_s', 0):.1f} s"],
                ["peak resident memory", f"{report['peak_rss_mb']:.0f} MiB"]]
    parts = [f'<p class="headline">{html.escape(headline(report))}</p>',
             f"<p>Evaluation: {html.escape(ppl['dataset'])}, {ppl['tokens']:,} predicted tokens.</p>",
             *([f"<p>{html.escape(calibration_line(report['calibration']))}</p>"] if report.get("calibration") else []),
             "<h2>Results</h2>", table(["", "value"], results)]
    if report.get("zero_shot"):
        parts += ["<h2>Zero-shot accuracy (lm-eval)</h2>",
                  table(["task", "metric", "dense", "pruned", "onnxruntime"], zero_shot_rows(report))]
    parts += plots_section(plots_folder, plots)
    parts += ["<h2>Passes</h2>",
              table(["pass", "wall s", "params before", "params after", "peak RSS MiB"],
                    [[p["name"], f"{p['wall_s']:.2f}", f"{p['params_before']:,}", f"{p['params_after']:,}",
                      f"{p['peak_rss_mb']:.0f}"] for p in report["passes"]])]
    for p in report["passes"]:
        facts = [[k, v] for k, v in p.get("changes", {}).items()
                 if k not in ("per_layer", "scores", "widths", "thresholds", "quantized") and not isinstance(v, dict)]
        if facts:
            parts += [f"<h3>{html.escape(p['name'])}</h3>", table(["what", "value"], facts)]
    parts += ["<h2>Time and memory by stage</h2>",
              table(["stage", "wall s", "peak RSS MiB"],
                    [[r["stage"], f"{r['wall_s']:.1f}", f"{r['peak_rss_mb']:.0f}"] for r in report.get("stages", [])])]
    if report.get("artifacts"):
        parts += ["<h2>Model files</h2>",
                  table(["variant", "file", "MiB", "onnxruntime perplexity"],
                        [[a["name"], a["path"], f"{a['bytes'] / 2**20:.1f}", num(a.get("perplexity"), ".3f")]
                         for a in report["artifacts"]])]
    gen = report.get("generation") or {}
    if gen.get("models"):
        parts += ["<h2>Generation</h2>",
                  f"<p>Key/value-cache models in {html.escape(gen['protocol'])}; decode {gen['decode_speedup']:.2f}x "
                  f"and prefill {gen['prefill_speedup']:.2f}x the dense model's.</p>",
                  table(["model", "file", "prefill tokens/s", "decode tokens/s", "cache KiB per token"],
                        generation_rows(report)),
                  f"<p>Greedy continuation of <q>{html.escape(gen['prompt'])}</q> ({gen['sample_tokens']} "
                  "tokens):</p>",
                  table(["model", "continuation"], [[row["name"], " ".join(row["continuation"].split())]
                                                    for row in gen["models"]])]
    elif gen.get("skipped"):
        parts += ["<h2>Generation</h2>", f"<p>Not measured: {html.escape(gen['skipped'])}.</p>"]
    if report.get("latency"):
        parts += ["<h2>Latency (onnxruntime CPU)</h2>",
                  table(["shape", "median ms", "p90 ms", "runs"],
                        [[s, f"{v['median_ms']:.1f}", f"{v['p90_ms']:.1f}", v["runs"]]
                         for s, v in report["latency"].items()])]
    parts += ["<h2>Recipe</h2>", f"<pre>{html.escape(yaml.safe_dump(report['recipe'], sort_keys=False))}</pre>"]
    onnx = report.get("onnx")
    if onnx:
        rows = [[r["layer"], r["k"], r["n"], f"{r['sparsity']:.1%}",
                 "-" if r["nm_valid"] is None else ("yes" if r["nm_valid"] else "NO"), r["form"],
                 "yes" if r["targeted"] else "no"] for r in onnx["layers"]]
        parts += [f"<h2>ONNX</h2><p>{html.escape(onnx['path'])}: {onnx['bytes'] / 2**20:.1f} MiB, opset "
                  f"{onnx['opset']}.</p>",
                  f"<details><summary>{len(rows)} layers with a weight</summary>"
                  + table(["layer", "k", "n", "sparsity", "N:M valid", "form", "targeted"], rows) + "</details>"]
    t = report.get("tool", {})
    parts.append(f"<p><small>nexus-export {html.escape(str(t.get('version', '')))}, torch "
                 f"{html.escape(str(t.get('torch', '')))}; every number on this page is in report.json.</small></p>")
    return page(f"nexus-export report: {report['model']['name']}", parts)
