"""Plots of a run's report, drawn with matplotlib (the ``report`` extra) as small PNGs.

Each plot is made from report.json alone, so report.html, sweeps and comparisons draw from the same data: per-layer
sparsity as a block x role heat map, per-block stream widths (SliceGPT), block scores with the removed blocks
(ShortGPT), perplexity of every variant against dense, size per variant, latency. A plot whose data the run does not
have is not drawn. Without matplotlib nothing is drawn and ``available`` says how to install it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from nexus_export.graph.structure import ROLES as STRUCTURE_ROLES

log = logging.getLogger(__name__)

ROLES = tuple(role for role in STRUCTURE_ROLES if role != "lm_head")  # the roles inside the blocks
DPI = 90
INSTALL = "pip install 'nexus-export[report]' (matplotlib) to get the plots"


@dataclass(frozen=True)
class Plot:
    """A PNG written for a report: its title and its file name (under ``plots/``)."""

    title: str
    file: str


def available() -> tuple[bool, str]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False, f"matplotlib is not installed: {INSTALL}"
    return True, ""


def figure(width: float = 6.0, height: float = 3.2, columns: int = 1):
    """A matplotlib figure (no pyplot: no GUI backend, no global state) and its axes (a list of ``columns``
    sharing the y axis when more than one)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    return fig, (fig.add_subplot() if columns == 1 else list(fig.subplots(1, columns, sharey=True)))


def save(fig, folder: Path, name: str, title: str) -> Plot:
    """Write ``fig`` as ``folder/name`` (PNG)."""
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / name, dpi=DPI)
    return Plot(title, name)


def report_plots(report: dict, folder: Path) -> list[Plot]:
    """Every plot the report has data for, written into ``folder``; [] without matplotlib."""
    ok, why = available()
    if not ok:
        log.warning("no plots in the report: %s", why)
        return []
    plots = []
    for draw in (sparsity_heatmap, block_widths, block_scores, perplexities, sizes, latency, decode_speed):
        plot = draw(report, folder)
        if plot is not None:
            plots.append(plot)
    return plots


def sparsity_heatmap(report: dict, folder: Path) -> Plot | None:
    """Weight sparsity of each block's linears by role (size-weighted within a role), as a heat map."""
    roles = report["sparsity"].get("roles") or {}
    per_layer = report["sparsity"].get("per_layer") or {}
    cells: dict[tuple[int, str], list[tuple[float, int]]] = {}
    for name, value in per_layer.items():
        where = roles.get(name)
        if where and where["block"] is not None and where["role"] in ROLES:
            cells.setdefault((where["block"], where["role"]), []).append((value, where["params"]))
    if not cells:
        return None
    import numpy as np

    blocks = sorted({b for b, _ in cells})
    grid = np.full((len(blocks), len(ROLES)), np.nan)
    for (b, role), values in cells.items():
        total = sum(n for _, n in values)
        grid[blocks.index(b), ROLES.index(role)] = sum(v * n for v, n in values) / total
    fig, ax = figure(4.8, min(1.2 + 0.16 * len(blocks), 8.0))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(len(ROLES)), ROLES)
    step = max(1, len(blocks) // 16)
    ax.set_yticks(range(0, len(blocks), step), [str(b) for b in blocks[::step]])
    ax.set_ylabel("block")
    ax.set_title("weight sparsity by block and role")
    fig.colorbar(image, ax=ax, label="sparsity")
    return save(fig, folder, "sparsity.png", "Weight sparsity by block and role")


def block_widths(report: dict, folder: Path) -> Plot | None:
    """The residual stream width SliceGPT left in each block, against the width before."""
    for p in report["passes"]:
        widths = p.get("changes", {}).get("widths")
        if widths:
            before = p["changes"].get("hidden_before")
            blocks = sorted(widths, key=int)
            fig, ax = figure()
            ax.bar([int(b) for b in blocks], [widths[b] for b in blocks], color="tab:blue", label="kept")
            if before:
                ax.axhline(before, color="gray", linestyle="--", label=f"before ({before})")
            ax.set_xlabel("block")
            ax.set_ylabel("stream width")
            ax.set_title(f"{p['name']}: stream width per block")
            ax.legend(loc="lower right")
            return save(fig, folder, "widths.png", "Stream width per block")
    return None


def block_scores(report: dict, folder: Path) -> Plot | None:
    """ShortGPT's score of each block (the ranking it removed by), the removed blocks in red."""
    for p in report["passes"]:
        scores = p.get("changes", {}).get("scores")
        if scores:
            removed = {int(b) for b in p["changes"].get("removed", [])}
            blocks = sorted(scores, key=int)
            fig, ax = figure()
            ax.bar([int(b) for b in blocks], [scores[b] for b in blocks],
                   color=["tab:red" if int(b) in removed else "tab:blue" for b in blocks])
            ax.set_xlabel("block (red: removed)")
            ax.set_ylabel("score")
            ax.set_title(f"{p['name']}: block scores ({p['changes'].get('strategy', 'similarity')})")
            return save(fig, folder, "block_scores.png", "Block scores and the removed blocks")
    return None


def _perplexity_bars(report: dict) -> list[tuple[str, float]]:
    ppl = report["perplexity"]
    bars = [("dense", ppl["dense"])]
    if ppl.get("pruned_runtime", "pytorch") == "pytorch":
        bars.append(("pruned (PyTorch)", ppl["pruned"]))
    for a in report.get("artifacts", []):
        if a.get("perplexity") is not None:
            bars.append((f"{a['name']} (onnxruntime)", a["perplexity"]))
    return bars


def perplexities(report: dict, folder: Path) -> Plot | None:
    """Perplexity of the dense model, the pruned model and every model file that was scored."""
    bars = _perplexity_bars(report)
    fig, ax = figure()
    names, values = zip(*bars)
    ax.barh(range(len(bars)), values, color=["gray"] + ["tab:blue"] * (len(bars) - 1))
    ax.set_yticks(range(len(bars)), names)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}", va="center")
    ax.set_xlabel("perplexity (lower is better)")
    ax.set_xlim(0, max(values) * 1.2)
    ax.set_title("perplexity")
    return save(fig, folder, "perplexity.png", "Perplexity of every variant against dense")


def sizes(report: dict, folder: Path) -> Plot | None:
    """Size of each model file written (MiB)."""
    artifacts = report.get("artifacts", [])
    if not artifacts:
        return None
    fig, ax = figure(6.0, 1.2 + 0.4 * len(artifacts))
    values = [a["bytes"] / 2**20 for a in artifacts]
    ax.barh(range(len(artifacts)), values, color="tab:green")
    ax.set_yticks(range(len(artifacts)), [a["path"] for a in artifacts])
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.1f}", va="center")
    ax.set_xlim(0, max(values) * 1.25)
    ax.set_xlabel("MiB")
    ax.set_title("model files")
    return save(fig, folder, "sizes.png", "Size of each model file")


def latency(report: dict, folder: Path) -> Plot | None:
    """Median (and p90) latency of each measured shape."""
    measured = report.get("latency") or {}
    if not measured:
        return None
    fig, ax = figure(6.0, 1.2 + 0.4 * len(measured))
    shapes = list(measured)
    ax.barh(range(len(shapes)), [measured[s]["median_ms"] for s in shapes], color="tab:purple", label="median")
    ax.scatter([measured[s]["p90_ms"] for s in shapes], range(len(shapes)), color="black", marker="|", s=200,
               label="p90")
    ax.set_yticks(range(len(shapes)), shapes)
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.legend(loc="lower right")
    ax.set_title("latency")
    return save(fig, folder, "latency.png", "Latency")


def decode_speed(report: dict, folder: Path) -> Plot | None:
    """Prefill and decode tokens per second of the dense model and every model file, side by side."""
    rows = (report.get("generation") or {}).get("models") or []
    if not rows:
        return None
    fig, (left, right) = figure(8.0, 1.2 + 0.4 * len(rows), columns=2)
    names = [r["name"] for r in rows]
    for ax, key, title, color in ((left, "prefill_tokens_per_s", "prefill", "tab:green"),
                                  (right, "decode_tokens_per_s", "decode", "tab:blue")):
        values = [r[key] for r in rows]
        ax.barh(range(len(rows)), values, color=[("tab:gray" if n == "dense" else color) for n in names])
        ax.set_yticks(range(len(rows)), names if ax is left else [""] * len(rows))
        ax.invert_yaxis()
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.0f}" if v >= 100 else f" {v:.1f}", va="center")
        ax.set_xlim(0, max(values) * 1.3)
        ax.set_xlabel("tokens/s")
        ax.set_title(title)
    return save(fig, folder, "decode_speed.png", "Prefill and decode speed (onnxruntime, batch 1)")
