"""SparseGPT 2:4 under the default protocol with 1 process x 1 thread against N processes x T threads (torchrun), in
one run, side by side: the pass's wall time, the speed-up and the perplexity of each.

    .venv/bin/python bench/distributed.py --model smollm2-135m              # 1 x 1 and 2 x 1 (~20 min here)
    .venv/bin/python bench/distributed.py --layouts 1x1,2x1,2x8 --device cuda  # on a GPU machine

Each layout is a separate command line run (the same one a user runs), its peak resident memory measured from outside
by /usr/bin/time (per process: the largest rank) and inside by the report's stages; onnxruntime evaluation and latency
are off (the ONNX model is the same in every layout).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(procs: int, threads: int, args: argparse.Namespace, out: Path) -> dict:
    """One command line run with ``procs`` processes of ``threads`` threads; its report and outside measurements."""
    prune = ["prune", "--model", args.model, "--method", "sparsegpt", "--pattern", "2:4", "--onnx-eval", "off",
             "--no-latency", "--device", args.device, "--out", str(out)]
    python = [sys.executable]
    if procs > 1:
        python = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
                  "--master-port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    timed = ["/usr/bin/time", "-v", *python, "-m", "nexus_export", "-q", *prune]
    start = time.perf_counter()
    done = subprocess.run(timed, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{procs}x{threads} failed:\n{done.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    # /usr/bin/time reports the largest resident set of the process tree's biggest member (torchrun's children too)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    pass_report = report["passes"][0]
    return {"layout": f"{procs}x{threads}", "pass_s": pass_report["wall_s"],
            "rank_pass_s": pass_report.get("rank_wall_s", [pass_report["wall_s"]]),
            "dense": report["perplexity"]["dense"], "pruned": report["perplexity"]["pruned"],
            "total_s": round(wall, 1), "peak_rss_mib_outside": int(peak.group(1)) / 1024 if peak else None,
            "peak_rss_mib_inside": report["peak_rss_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layouts", default="1x1,2x1", help="processes x threads, comma separated (the first is the base)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    layouts = [tuple(int(v) for v in item.split("x")) for item in args.layouts.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        for procs, threads in layouts:
            out = Path(tmp) / f"{procs}x{threads}"
            rows.append(run_layout(procs, threads, args, out))
            print(f"# {rows[-1]}", file=sys.stderr, flush=True)
            shutil.rmtree(out, ignore_errors=True)
    base = rows[0]
    print(f"SparseGPT 2:4 on {args.model}, default protocol, device {args.device}")
    print("| layout (processes x threads) | pass wall s | per-rank pass s | vs base | perplexity (PyTorch) | vs base | "
          "whole run s | peak RSS MiB (outside, largest process) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['pass_s']:.1f} | {', '.join(f'{v:.1f}' for v in r['rank_pass_s'])} | "
              f"{r['pass_s'] / base['pass_s']:.2f}x | {r['pruned']:.3f} | "
              f"{(r['pruned'] - base['pruned']) / base['pruned']:+.4%} | {r['total_s']:.0f} | "
              f"{r['peak_rss_mib_outside'] or 0:.0f} |")


if __name__ == "__main__":
    main()
