"""CUDA against CPU on one 70B-wide decoder block: the masks of SparseGPT 2:4 and Wanda 2:4, time and peak memory.

A synthetic bf16 checkpoint of one Llama-3-70B block (8,192 / 28,672, 64 heads, 8 KV heads; a 2,048-token vocabulary,
so the head costs next to nothing) is pruned by the pass itself (calibration engine, Hessians, sweep) on each device,
from the same program and the same calibration windows. A second CUDA run takes the windows in reverse order: its
Hessians differ from the first run's by the order of a sum alone, so its agreement with the first run is the share of
the mask that rounding alone re-draws, the floor against which the CPU's agreement is read. Prints a table; --json
writes every number, per linear too.

    python bench/device_parity.py --json $OUT/parity.json        # on a GPU machine (bench/gpu_checks.sh)
    .venv/bin/python bench/device_parity.py --width small --runs cpu,cpu-reversed   # the script itself, anywhere
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from common import setup_logging
from scale import checkpoint

from nexus_export.engine.pass_base import PassContext
from nexus_export.evaluation.evaluate import program_perplexity
from nexus_export.graph.program import Program
from nexus_export.models.zoo import open_model
from nexus_export.registry import get_pass

log = logging.getLogger("device_parity")
WIDTHS = {  # LlamaConfig arguments of one block
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8),
    "small": dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=2),
}
METHODS = {"wanda": {"pattern": "2:4"}, "sparsegpt": {"pattern": "2:4"}}  # the quick one first
RUNS = {"cuda": ("cuda", False), "cuda-reversed": ("cuda", True), "cpu": ("cpu", False),
        "cpu-reversed": ("cpu", True)}


def one_run(base: Program, method: str, device: str, windows: torch.Tensor) -> tuple[Program, dict]:
    """The pass on a fork of ``base`` with its blocks on ``device``: the pruned program and its time and peaks."""
    program = base.fork()
    program.device = device
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = get_pass(method)(METHODS[method]).run(program, PassContext(calibration_windows=windows))
    if device == "cuda":
        torch.cuda.synchronize()
    facts = {"pass_s": time.perf_counter() - start, "peak_rss_gib": result.report.peak_rss_mb / 1024}
    if device == "cuda":
        facts["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result.program, facts


def masks(program: Program) -> dict[str, torch.Tensor]:
    return {lin.name: program.weight(lin.name) == 0 for lin in program.structure.in_blocks()}


def agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    """The share of weights whose pruned-or-kept state is the same in both, overall and per linear."""
    per = {name: float((a[name] == b[name]).float().mean()) for name in a}
    same = sum(int((a[name] == b[name]).sum()) for name in a)
    return same / sum(m.numel() for m in a.values()), per


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", choices=sorted(WIDTHS), default="70b")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--runs", default="cuda,cuda-reversed,cpu",
                    help=f"comma-separated, of {', '.join(RUNS)}; each is compared with the first")
    ap.add_argument("--windows", type=int, default=8, help="calibration windows (scale.py's protocol: 8 x 256)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", type=Path, help="write every number here")
    args = ap.parse_args()
    setup_logging()
    runs = args.runs.split(",")
    if any(RUNS[r][0] == "cuda" for r in runs) and not torch.cuda.is_available():
        print(f"no CUDA GPU here (torch {torch.__version__}): choose --runs from cpu, cpu-reversed")
        return 0
    vocab = 2048
    folder = checkpoint(f"block-{args.width}", dict(WIDTHS[args.width], num_hidden_layers=1, vocab_size=vocab,
                                                    tie_word_embeddings=False))
    base = Program.from_loaded(open_model(folder))
    windows = torch.randint(0, vocab, (args.windows, args.seq_len), generator=torch.Generator().manual_seed(0))
    held_out = torch.randint(0, vocab, (4, args.seq_len), generator=torch.Generator().manual_seed(1))
    evaluate_on = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict = {"width": args.width, "torch": torch.__version__, "windows": list(windows.shape),
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "rows": []}
    lines = [f"| method | run | pass s | peak GPU GiB | peak RSS GiB | mask agreement with {runs[0]} | "
             "held-out perplexity |", "|---|---|---|---|---|---|---|"]
    first: dict[str, dict[str, torch.Tensor]] = {}  # each method's masks in the first run
    for label in runs:  # every method on one device before the next device: a slow CPU run ends the table, not a row
        device, reverse = RUNS[label]
        for method in args.methods.split(","):
            log.info("%s on %s ...", method, label)
            pruned, facts = one_run(base, method, device, windows.flip(0) if reverse else windows)
            current = masks(pruned)
            same, per = agreement(first[method], current) if method in first else (1.0, {})
            first.setdefault(method, current)
            pruned.device = evaluate_on
            ppl, _ = program_perplexity(pruned, held_out, 2)
            row = {"method": method, "run": label, **facts, "agreement": same, "per_linear": per, "perplexity": ppl}
            results["rows"].append(row)
            gpu = f"{facts['peak_gpu_gib']:.2f}" if "peak_gpu_gib" in facts else ""
            lines.append(f"| {method} 2:4 | {label} | {facts['pass_s']:.1f} | {gpu} | {facts['peak_rss_gib']:.2f} | "
                         f"{same:.4%} | {ppl:.3f} |")
            print(lines[-1], file=sys.stderr, flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))
            del pruned, current
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
