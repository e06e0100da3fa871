"""The main job's wall time: the demo (scripts/demo.sh) run twice against an empty evaluation cache, side by side.

    .venv/bin/python bench/main_job.py                 # SmolLM2-135M, SparseGPT 2:4 (~13 min here)
    .venv/bin/python bench/main_job.py -- --eval-runtime both   # extra arguments go to the demo

The first run measures the dense model and fills the cache; the second reads the dense perplexity from it. Each run
is the command a user runs, timed and measured from outside by /usr/bin/time (wall, peak resident memory) and inside
by its report (stages, the process's own peak). Targets (issue 17): first run at most 9 minutes, second at most 6.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS_S = {"first": 9 * 60, "second": 6 * 60}


def run_demo(out: Path, cache: Path, extra: list[str]) -> dict:
    """One demo run; its wall time and peak RSS from outside, and its report."""
    env = {**os.environ, "NEXUS_EXPORT_EVAL_CACHE": str(cache)}
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", "bash", str(ROOT / "scripts" / "demo.sh"), "--out", str(out),
                           *extra], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"the demo failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    report = json.loads((out / "report.json").read_text())
    return {"wall_s": wall, "outside_peak_mib": int(peak.group(1)) / 1024 if peak else float("nan"), "report": report}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("extra", nargs="*", help="arguments for scripts/demo.sh (after --)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nexus-bench-main-") as tmp:
        cache = Path(tmp) / "cache"
        runs = {name: run_demo(Path(tmp) / name, cache, args.extra) for name in ("first", "second")}
    stages = list(dict.fromkeys(row["stage"] for r in runs.values() for row in r["report"]["stages"]))
    print("| run | wall (outside) | target | met | dense from cache | peak RSS outside | peak RSS inside |")
    print("|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        rep = r["report"]
        print(f"| {name} | {r['wall_s'] / 60:.1f} min ({r['wall_s']:.0f} s) | {TARGETS_S[name] / 60:.0f} min | "
              f"{'yes' if r['wall_s'] <= TARGETS_S[name] else 'NO'} | {rep['perplexity']['dense_from_cache']} | "
              f"{r['outside_peak_mib']:.0f} MiB | {rep['peak_rss_mb']:.0f} MiB |")
    print()
    print("| stage | first s | second s |")
    print("|---|---|---|")
    for stage in stages:
        cells = []
        for r in runs.values():
            rows = [row for row in r["report"]["stages"] if row["stage"] == stage]
            cells.append(f"{rows[0]['wall_s']:.1f}" if rows else "-")
        print(f"| {stage} | {' | '.join(cells)} |")
    first, second = runs["first"]["report"], runs["second"]["report"]
    print()
    rel = [r["parity"].get("perplexity_rel") for r in (first, second)]
    print(f"perplexity: dense {first['perplexity']['dense']:.3f} / {second['perplexity']['dense']:.3f} (cached), "
          f"pruned {first['perplexity']['pruned']:.3f} / {second['perplexity']['pruned']:.3f}; onnxruntime on the "
          f"parity windows within " + " / ".join("not run" if v is None else f"{v:.2e}" for v in rel) + " relative")


if __name__ == "__main__":
    main()
