"""Side-by-side comparison of finished runs: one row per run folder, read from its report.json.

``nexus-export compare RUN_DIR... --out DIR`` prints the table and writes compare.md, compare.html (plot embedded),
compare.json and plots/compare.png; a sweep folder given stands for its points. Sweeps write the same table for
their points.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

from nexus_export.errors import UserError
from nexus_export.reporting.plots import Plot, available, figure, save
from nexus_export.reporting.report_html import page, plots_section, table
from nexus_export.reporting.report_text import num

log = logging.getLogger(__name__)

COLUMNS = ("run", "method", "sparsity", "params", "deploy MiB", "dense ppl", "pruned ppl", "onnxruntime ppl",
           "accuracy", "decode tok/s", "x dense", "time s", "peak MiB")


def load_run(folder: str | Path) -> dict:
    """The report.json of a run folder; anything else is refused with what to give instead."""
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"{folder} is not a folder; give run folders written by prune, run or sweep")
    try:
        report = json.loads((path / "report.json").read_text())
        report["perplexity"]["pruned"], report["passes"], report["sparsity"]["overall"]  # noqa: B018
    except FileNotFoundError:
        raise UserError(f"{folder} is not a run folder (no report.json); give folders written by prune, run or "
                        "sweep") from None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path / 'report.json'} is not a nexus-export report (unreadable or missing keys)") from None
    return report


def load_runs(folders: list[str | Path]) -> list[tuple[str, dict]]:
    """(name, report) of every run folder given; a sweep folder stands for the points that finished."""
    runs = []
    for folder in folders:
        sweep = Path(folder) / "sweep.json"
        if sweep.is_file() and not (Path(folder) / "report.json").is_file():
            try:
                points = [p["run"] for p in json.loads(sweep.read_text())["points"] if p["ok"]]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{sweep} is not a nexus-export sweep summary (unreadable or missing keys)") from None
            runs += [(f"{folder}/{point}", load_run(Path(folder) / point)) for point in points]
        else:
            runs.append((str(folder), load_run(folder)))
    return runs


def method_label(report: dict) -> str:
    """The passes of a run with their main setting, e.g. ``sparsegpt 2:4 + activation 0.4``."""
    words = []
    for p in report["passes"]:
        options = p.get("options", {})
        changes = p.get("changes", {})
        setting = (options.get("pattern") or options.get("sparsity") or changes.get("slicing")
                   or (f"remove {len(changes['removed'])}" if changes.get("removed") is not None else None))
        words.append(p["name"] + (f" {setting}" if setting not in (None, "") else ""))
    return " + ".join(words) or "none"


def accuracy(report: dict) -> float | None:
    """Mean zero-shot accuracy over the run's lm-eval tasks (None when it ran none)."""
    tasks = (report.get("zero_shot") or {}).get("tasks") or {}
    values = [t["pruned"]["acc"] for t in tasks.values() if t.get("pruned", {}).get("acc") is not None]
    return sum(values) / len(values) if values else None


def row(name: str, report: dict) -> dict:
    """One run as the table shows it (numbers unformatted)."""
    ppl = report["perplexity"]
    deploy = next((a for a in report.get("artifacts", []) if a["path"] == report.get("deploy", {}).get("model")),
                  None)
    return {"run": name, "method": method_label(report),
            "sparsity": report["sparsity"]["overall"], "pattern": report["sparsity"].get("pattern"),
            "params": report["model"].get("params_pruned"),
            "deploy_mib": deploy["bytes"] / 2**20 if deploy else None,
            "dense": ppl.get("dense"), "pruned": ppl.get("pruned"), "onnx": ppl.get("onnx"),
            "accuracy": accuracy(report), **_decode(report), "time_s": report.get("timings", {}).get("total_s"),
            "peak_mib": report.get("peak_rss_mb")}


def _decode(report: dict) -> dict:
    """The pruned model's decode tokens/s and its ratio to the dense model's (None where not measured)."""
    gen = report.get("generation") or {}
    models = gen.get("models") or []
    return {"decode": models[1]["decode_tokens_per_s"] if len(models) > 1 else None,
            "decode_x": gen.get("decode_speedup")}


def _cells(r: dict) -> list[str]:
    return [r["run"], r["method"], f"{r['sparsity']:.1%} ({r['pattern']})", num(r["params"], ","),
            num(r["deploy_mib"], ".1f"), num(r["dense"], ".3f"), num(r["pruned"], ".3f"), num(r["onnx"], ".3f"),
            num(r["accuracy"], ".1%"), num(r["decode"], ".1f"), num(r["decode_x"], ".2f"), num(r["time_s"], ".1f"),
            num(r["peak_mib"], ".0f")]


def markdown_table(rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return lines


def text_table(rows: list[dict]) -> str:
    """The table as aligned plain text, for the terminal."""
    cells = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def html_table(rows: list[dict]) -> str:
    return table(list(COLUMNS), [_cells(r) for r in rows])


def comparison_plot(rows: list[dict], folder: Path) -> Plot | None:
    """Perplexity of each run (pruned, with the dense model as a line), and the deployable file's size."""
    if not available()[0] or not rows:
        return None
    fig, (left, right) = figure(8.0, 1.4 + 0.45 * len(rows), columns=2)
    names = [r["run"] for r in rows]
    left.barh(range(len(rows)), [r["pruned"] or 0 for r in rows], color="tab:blue")
    dense = [r["dense"] for r in rows if r["dense"] is not None]
    if dense and max(dense) - min(dense) <= 1e-6 * max(dense):
        left.axvline(dense[0], color="gray", linestyle="--", label=f"dense {dense[0]:.2f}")
        left.legend(loc="lower right")
    left.set_yticks(range(len(rows)), names)
    left.invert_yaxis()
    values = [r["pruned"] for r in rows if r["pruned"]] + dense
    if values and max(values) > 10 * min(values):  # one run far worse than the others: a log axis shows them all
        left.set_xscale("log")
    left.set_xlabel("perplexity (lower is better)")
    right.barh(range(len(rows)), [r["deploy_mib"] or 0 for r in rows], color="tab:green")
    right.set_xlabel("deployable file, MiB")
    return save(fig, folder, "compare.png", "Perplexity and size of each run")


def write_comparison(rows: list[dict], folder: Path, title: str, stem: str = "compare",
                     extra_plots: list[Plot] = (), notes: list[str] = (), extra: dict | None = None) -> None:
    """STEM.md, STEM.html, STEM.json (the rows, and ``extra``) and plots/ for ``rows`` in ``folder`` (which
    exists)."""
    plot = comparison_plot(rows, folder / "plots")
    plots = [*extra_plots, *([plot] if plot else [])]
    (folder / f"{stem}.json").write_text(json.dumps({**(extra or {}), "runs": rows}, indent=2) + "\n")
    md = [f"# {title}", "", *notes, *([""] if notes else []), *markdown_table(rows), ""]
    md += [f"![{p.title}](plots/{p.file})" for p in plots] + [""]
    (folder / f"{stem}.md").write_text("\n".join(md))
    parts = [*(f"<p>{html.escape(n)}</p>" for n in notes), html_table(rows), *plots_section(folder / "plots", plots)]
    (folder / f"{stem}.html").write_text(page(title, parts))
