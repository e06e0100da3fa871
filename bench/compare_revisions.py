"""Side by side: the same prune command with this checkout and with an earlier git revision, alternating runs.

Each run is its own process; the table gives the pass's wall time and the process's peak resident memory (ru_maxrss
of the child, measured from outside: it starts at this script's own peak, which is small, since Linux carries the
spawner's peak over at exec) per run, their medians, and the ratio new / old, so that noise on a shared
machine hits both sides alike. The old revision is checked out into a temporary git worktree and run with this
checkout's virtual environment.

    .venv/bin/python bench/compare_revisions.py --rev d00c577 --runs 2 -- \\
        --model smollm2-135m --method sparsegpt --pattern 2:4 --calib-samples 16 --eval-windows 2 --no-latency
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import setup_logging

ROOT = Path(__file__).resolve().parents[1]


def run_once(source: Path, args: list[str], out: Path) -> dict:
    """One CLI run of the code in ``source``; the pass's wall time from its report, peak RSS from outside."""
    env = {**os.environ, "PYTHONPATH": str(source)}  # ahead of the environment's editable install
    cmd = [sys.executable, "-c", "import sys; from nexus_export.cli import main; sys.exit(main())", "-q", "prune",
           *args, "--out", str(out), "--force"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=source, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"run failed in {source}: {err.strip().splitlines()[-1] if err.strip() else status}")
    report = json.loads((out / "report.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"pass_s": sum(p["wall_s"] for p in report["passes"]), "peak_gib": usage.ru_maxrss / 2**20,
            "wall_s": time.perf_counter() - start, "pruned": report["perplexity"]["pruned"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="the earlier git revision to compare with")
    ap.add_argument("--runs", type=int, default=2, help="runs of each side, alternating (default 2)")
    ap.add_argument("prune_args", nargs=argparse.REMAINDER, help="after --: arguments of nexus-export prune")
    args = ap.parse_args()
    setup_logging()
    prune_args = [a for a in args.prune_args if a != "--"]
    with tempfile.TemporaryDirectory(prefix="nexus-compare-") as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.rev], check=True,
                       capture_output=True)
        try:
            rows = {"old": [], "new": []}
            for i in range(args.runs):
                for side, source in (("old", old), ("new", ROOT)):
                    rows[side].append(run_once(source, prune_args, Path(tmp) / f"out-{side}"))
                    print(f"run {i + 1} {side}: {rows[side][-1]}", file=sys.stderr)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    print(f"nexus-export prune {' '.join(prune_args)}: {args.rev} (old) against this checkout (new), "
          f"{args.runs} alternating runs each\n")
    print("| side | pass s (runs) | pass s median | peak GiB median | pruned perplexity |")
    print("|---|---|---|---|---|")
    med = {}
    for side, runs in rows.items():
        med[side] = {k: statistics.median(r[k] for r in runs) for k in ("pass_s", "peak_gib")}
        each = ", ".join(f"{r['pass_s']:.1f}" for r in runs)
        print(f"| {side} | {each} | {med[side]['pass_s']:.1f} | "
              f"{med[side]['peak_gib']:.2f} | {runs[0]['pruned']:.3f} |")
    print(f"\nnew / old: pass time {med['new']['pass_s'] / med['old']['pass_s']:.2f}, peak memory "
          f"{med['new']['peak_gib'] / med['old']['peak_gib']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
