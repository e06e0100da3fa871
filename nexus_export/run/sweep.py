"""Sweeps: one method at several settings (sparsities, blocks removed, slicings), one run folder per point, then a
table (sweep.md, sweep.html, sweep.json) and a plot of perplexity (and zero-shot accuracy when the runs measured it)
against the setting.

Every point's recipe is built and validated before the first one runs, so bad input stops the sweep before any
work. A point that fails is recorded with its error; the others are kept. The dense evaluation is computed once:
later points read it from the evaluation cache.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nexus_export.errors import UserError
from nexus_export.outdir import check_output_dir, staged_output
from nexus_export.reporting.compare import load_run, row, write_comparison
from nexus_export.reporting.plots import Plot, available, figure, save
from nexus_export.run.recipe import Recipe

log = logging.getLogger(__name__)

# what a sweep varies, by method: the list flag, the recipe option it sets, and how a value is read and named
AXES = {"sparsities": ("sparsity", float, "sparsity"), "remove": ("remove", int, "blocks removed"),
        "slicings": ("slicing", float, "slicing")}


@dataclass(frozen=True)
class Point:
    value: float | int
    label: str  # the point's folder name, e.g. sparsity-0.5
    recipe: Recipe


EXAMPLES = {int: "2,4,7", float: "0.3,0.5,0.7", str: "hellaswag,arc_easy"}
KINDS = {int: "a whole number", float: "a number"}


def parse_values(text: str | None, flag: str, kind: type) -> list:
    """``0.3,0.5,0.7`` -> [0.3, 0.5, 0.7] (``kind`` int, float or str); an empty, malformed or repeating list, or an
    empty entry, is refused."""
    example = f"; e.g. --{flag} {EXAMPLES[kind]}"
    if text is None or not text.strip():
        raise UserError(f"--{flag} is empty; give a comma-separated list{example}")
    values = []
    for item in (item.strip() for item in text.split(",")):
        if not item:
            raise UserError(f"--{flag} {text!r} has an empty entry{example}")
        try:
            values.append(kind(item))
        except ValueError:
            raise UserError(f"--{flag} {text!r}: {item!r} is not {KINDS[kind]}{example}") from None
    if len(set(values)) != len(values):
        raise UserError(f"--{flag} {text!r} names a value twice; give each once")
    return values


def plan(axis: str, text: str | None, make_recipe: Callable[[str, float | int], Recipe]) -> list[Point]:
    """The sweep's points: every value of ``--<axis>`` with its recipe (validated now)."""
    option, kind, _ = AXES[axis]
    points = []
    for value in parse_values(text, axis, kind):
        try:
            recipe = make_recipe(option, value)
        except UserError as exc:
            raise UserError(f"--{axis} point {value}: {exc}") from None
        points.append(Point(value, f"{option}-{value}", recipe))
    return points


def run_sweep(points: list[Point], axis: str, out_dir: str | Path, force: bool,
              run: Callable[[Recipe, Path], dict | None]) -> dict:
    """Run every point into ``out_dir/<label>``; write sweep.json and the comparison files. Returns the summary."""
    out_dir = check_output_dir(out_dir, force)
    _, _, name = AXES[axis]
    results = []
    with staged_output(out_dir, force) as tmp:
        for i, point in enumerate(points):
            log.info("sweep point %d of %d: %s %s", i + 1, len(points), name, point.value)
            start = time.perf_counter()
            try:
                run(point.recipe, tmp / point.label)
                results.append({"value": point.value, "run": point.label, "ok": True})
            except Exception as exc:  # noqa: BLE001 - one failed point must not lose the others
                log.error("sweep point %s %s failed: %s", name, point.value, exc)
                results.append({"value": point.value, "run": point.label, "ok": False,
                                "error": f"{type(exc).__name__}: {exc}"})
            results[-1]["wall_s"] = round(time.perf_counter() - start, 1)
        rows = []
        for r in results:
            if r["ok"]:
                rows.append(row(r["run"], load_run(tmp / r["run"])))
                r.update(perplexity=rows[-1]["pruned"], dense=rows[-1]["dense"], accuracy=rows[-1]["accuracy"])
        summary = {"axis": name, "points": results}
        failed = [f"{name} {r['value']} failed: {r['error']}" for r in results if not r["ok"]]
        plot = sweep_plot(results, name, tmp / "plots")
        write_comparison(rows, tmp, f"sweep of {name}", "sweep", [plot] if plot else [], failed, summary)
    return summary


def sweep_plot(results: list[dict], name: str, folder: Path) -> Plot | None:
    """Perplexity (and mean zero-shot accuracy, when measured) against the swept setting."""
    done = [r for r in results if r["ok"] and r.get("perplexity") is not None]
    if not available()[0] or not done:
        return None
    fig, ax = figure(6.0, 3.4)
    xs = [r["value"] for r in done]
    ax.plot(xs, [r["perplexity"] for r in done], marker="o", color="tab:blue", label="pruned")
    ax.axhline(done[0]["dense"], color="gray", linestyle="--", label=f"dense {done[0]['dense']:.2f}")
    values = [r["perplexity"] for r in done] + [done[0]["dense"]]
    if max(values) > 10 * min(values):  # perplexity explodes at high sparsity: a log axis keeps the low end readable
        ax.set_yscale("log")
    ax.set_xlabel(name)
    ax.set_ylabel("perplexity (lower is better)")
    ax.legend(loc="upper left")
    accuracies = [(r["value"], r["accuracy"]) for r in done if r.get("accuracy") is not None]
    if accuracies:
        twin = ax.twinx()
        twin.plot(*zip(*accuracies), marker="s", color="tab:orange", label="zero-shot accuracy")
        twin.set_ylabel("mean zero-shot accuracy")
        twin.legend(loc="lower right")
    ax.set_title(f"perplexity against {name}")
    return save(fig, folder, "sweep.png", f"Perplexity against {name}")
