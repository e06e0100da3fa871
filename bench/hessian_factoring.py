"""The wide Hessian's factoring, torch's against the blocked in-place one: time and memory above the matrix.

Each way runs in a process of its own on a seeded positive definite float32 matrix (X X^T / D + I), and reports its
wall time and the rise of the process's peak resident memory (VmHWM, reset before the factoring) above what it held
when the factoring began. Prints a Markdown table.

    .venv/bin/python bench/hessian_factoring.py                  # 8,192 wide (a 3B-8B down projection's order)
    .venv/bin/python bench/hessian_factoring.py --widths 4096,16384
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def one(way: str, width: int) -> dict:
    """Factor one matrix the given way, in this process."""
    from passes.shared.obs import blocked_inverse_upper_cholesky_

    x = torch.randn(width, width, generator=torch.Generator().manual_seed(0))
    a = x @ x.T / width
    a.diagonal().add_(1.0)
    del x
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status_mib("VmRSS")
    start = time.perf_counter()
    if way == "blocked":
        assert blocked_inverse_upper_cholesky_(a)
    else:
        lower = torch.linalg.cholesky(a)
        a.copy_(torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True))
    return {"way": way, "width": width, "s": time.perf_counter() - start,
            "above_mib": status_mib("VmHWM") - before, "matrix_mib": width * width * 4 / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="8192")
    ap.add_argument("--one", nargs=2, metavar=("WAY", "WIDTH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return 0
    print("| width | matrix MiB | way | seconds | peak above the matrix's process, MiB |\n|---|---|---|---|---|")
    for width in (int(w) for w in args.widths.split(",")):
        for way in ("torch", "blocked"):
            out = subprocess.run([sys.executable, __file__, "--one", way, str(width)], capture_output=True,
                                 text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {width:,} | {r['matrix_mib']:.0f} | {way} | {r['s']:.1f} | {r['above_mib']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
