"""Scale benchmark: peak memory and wall time of the CLI on synthetic LLaMA-shaped bf16 checkpoints of real sizes.

Each checkpoint is built once (seeded random weights, bf16 safetensors shards of at most 1 GiB, a byte-level
tokenizer) under $NEXUS_EXPORT_CACHE/synthetic/<name>, then every (model, method) runs the CLI in its own process.
Peak resident memory is measured from outside the process (its VmHWM and VmRSS in /proc/<pid>/status, read every
0.1 s; not ru_maxrss, which Linux starts at the spawner's own peak: this script's, when it had just built a
checkpoint) and from inside (report.json). Prints a Markdown table and writes a plot of
peak memory against parameters. Results accumulate in bench/results/scale.json (tracked: the README's table and plot
come from it), one entry per (model, method), the latest run replacing the one before.

    .venv/bin/python bench/scale.py                                     # every shape and method (hours)
    .venv/bin/python bench/scale.py --shapes 135m,1.1b --methods sparsegpt --budget 1GiB
    .venv/bin/python bench/scale.py --table-only                        # the table and plot of what ran so far
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from common import setup_logging

ROOT = Path(__file__).resolve().parents[1]
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                 vocab_size=32000, tie_word_embeddings=False)  # TinyLlama-1.1B's width, at several depths below
LLAMA3 = dict(num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0)
SHAPES = {  # LlamaConfig arguments of real model shapes (70b-2: two blocks of Llama-3-70B)
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True),
    "1.1b-11": dict(TINYLLAMA, num_hidden_layers=11),
    "1.1b": dict(TINYLLAMA, num_hidden_layers=22),
    "1.1b-44": dict(TINYLLAMA, num_hidden_layers=44),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
    "70b-2": dict(LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=2, num_attention_heads=64),
}
METHODS = {
    "magnitude": ["--method", "magnitude", "--pattern", "2:4"],
    "wanda": ["--method", "wanda", "--pattern", "2:4"],
    "sparsegpt": ["--method", "sparsegpt", "--pattern", "2:4"],
    "shortgpt": ["--method", "shortgpt", "--remove-ratio", "0.25"],
    "slicegpt": ["--method", "slicegpt", "--slicing", "0.25"],
    # GPTQ int4 keeps its dequantized weights in the checkpoint's dtype (bf16 here); the int4 file computes the grid
    "gptq": ["--method", "none", "--quantize-bits", "4", "--quantize-method", "gptq"],
    # magnitude 2:4, then round to nearest int4 from the bf16 file
    "rtn": ["--method", "magnitude", "--pattern", "2:4", "--quantize-bits", "4", "--quantize-method", "rtn"],
}
PROTOCOL = ["--calib-samples", "8", "--seq-len", "256", "--eval-windows", "4", "--no-latency", "--onnx-eval", "off"]
SHARD_BYTES = 2**30


def checkpoint(name: str, shape: dict | None = None) -> Path:
    """The synthetic checkpoint folder of shape ``name`` (``shape``: LlamaConfig arguments, SHAPES[name] when
    omitted), built (seeded, shard by shard) when missing."""
    import transformers
    from safetensors.torch import save_file

    from nexus_export.graph.capture import parameters_on_meta
    from nexus_export.models.zoo import byte_level_tokenizer, cache_root

    folder = cache_root() / "synthetic" / name
    if (folder / "complete").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = transformers.LlamaConfig(max_position_embeddings=2048, bos_token_id=256, eos_token_id=256,
                                      pad_token_id=256, **(shape or SHAPES[name]))
    config.dtype = "bfloat16"
    with parameters_on_meta():
        model = transformers.LlamaForCausalLM(config)
    names = [(n, tuple(p.shape)) for n, p in model.named_parameters()]  # tied weights once
    gen = torch.Generator().manual_seed(0)
    groups, current, size = [], [], 0  # which tensors go in each shard (at most SHARD_BYTES)
    for key, shape in names:
        nbytes = math.prod(shape) * 2
        if current and size + nbytes > SHARD_BYTES:
            groups.append(current)
            current, size = [], 0
        current.append((key, shape))
        size += nbytes
    groups.append(current)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):  # one shard in memory at a time, in the order the seeded generator draws
        shard = {key: torch.ones(shape, dtype=torch.bfloat16) if key.endswith("norm.weight")
                 else (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16) for key, shape in group}
        filename = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        weight_map.update({k: filename for k in shard})
        total += sum(v.numel() * 2 for v in shard.values())
        del shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    byte_level_tokenizer(2048).save_pretrained(folder)
    (folder / "complete").write_text("")
    return folder


def run(folder: Path, method: str, budget: str, out: Path) -> dict:
    """One CLI run in its own process; its peak RSS measured from outside and its report."""
    cmd = [str(ROOT / ".venv/bin/nexus-export"), "-q", "prune", "--model", str(folder), *METHODS[method],
           *PROTOCOL, "--memory-budget", budget, "--out", str(out), "--force"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampled, hwm = [0.0], [0.0]
    free_before = shutil.disk_usage(out.parent).free
    free_min = [free_before]

    def sample() -> None:
        while proc.poll() is None:
            free_min[0] = min(free_min[0], shutil.disk_usage(out.parent).free)
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            sampled[0] = max(sampled[0], int(line.split()[1]) / 2**20)
                        elif line.startswith("VmHWM:"):
                            hwm[0] = max(hwm[0], int(line.split()[1]) / 2**20)
            except (OSError, ValueError):
                pass
            time.sleep(0.1)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    watcher.join()
    wall = time.perf_counter() - start
    err = proc.stderr.read()
    if proc.returncode:
        return {"error": err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}", "wall_s": wall}
    report = json.loads((out / "report.json").read_text())
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": wall, "peak_gib": max(hwm[0], sampled[0]), "sampled_gib": sampled[0],
            "ru_maxrss_gib": usage.ru_maxrss / 2**20,  # for the record: starts at this script's peak (see above)
            "inside_gib": report["peak_rss_mb"] / 1024, "params": report["model"]["params_dense"],
            "bytes": report["model"]["checkpoint_bytes"], "pass_s": report["passes"][0]["wall_s"],
            "stages": {r["stage"]: r["peak_rss_mb"] for r in report["stages"]},
            "stage_s": {r["stage"]: r["wall_s"] for r in report["stages"]},
            "blocks": report["model"]["structure"].get("blocks"),
            "written_gib": written / 2**30, "disk_peak_gib": (free_before - free_min[0]) / 2**30,
            "spikes": {r["stage"]: {"mb": r["spike_mb"], "at": r["spike_at"]}
                       for r in report["stages"] if "spike_mb" in r}}


def revision() -> str:
    """The commit the run measured, with "+changes" when its code differs from it (documents and results aside)."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results", ":!docs", ":!*.md")
    return commit + ("+changes" if changed else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--budget", default="auto", help="--memory-budget of every run (earlier rows: 1GiB)")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "scale", help="scratch folder of the runs")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "scale.json",
                    help="the results so far, updated after every run")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "scale.png", help="where to write the plot")
    ap.add_argument("--table-only", action="store_true", help="run nothing: the table and plot of the results file")
    args = ap.parse_args()
    setup_logging()
    args.out.mkdir(parents=True, exist_ok=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    results_path = args.results
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for shape in [] if args.table_only else args.shapes.split(","):
        folder = checkpoint(shape)
        for method in args.methods.split(","):
            key = f"{shape}/{method}"
            print(f"running {key} ...", file=sys.stderr, flush=True)
            results[key] = {"shape": shape, "method": method, "budget": args.budget, "revision": revision(),
                            **run(folder, method, args.budget, args.out / "run")}
            results_path.write_text(json.dumps(results, indent=2))
            print_table(results)
    if args.table_only:
        print_table(results)
    plot(results, args.plot)
    return 0


def print_table(results: dict) -> None:
    lines = ["| model | parameters | checkpoint GiB | method | wall s | pass s | peak GiB (outside) | peak GiB (inside) | "
             "peak / checkpoint |", "|---|---|---|---|---|---|---|---|---|"]
    order = {name: i for i, name in enumerate([*SHAPES, *METHODS])}
    for r in sorted(results.values(), key=lambda r: (order.get(r["shape"], 99), order.get(r["method"], 99))):
        if "error" in r:
            lines.append(f"| {r['shape']} | | | {r['method']} | {r['wall_s']:.0f} | | failed: {r['error']} | | |")
            continue
        ckpt = r["bytes"] / 2**30
        lines.append(f"| {r['shape']} | {r['params'] / 1e9:.2f}B | {ckpt:.2f} | {r['method']} | {r['wall_s']:.0f} | "
                     f"{r['pass_s']:.0f} | {r['peak_gib']:.2f} | {r['inside_gib']:.2f} | {r['peak_gib'] / ckpt:.2f} |")
    print("\n".join(lines) + "\n", flush=True)


def plot(results: dict, path: Path) -> None:
    """Peak GiB (outside) against parameters, one line per method (matplotlib: the ``bench`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for method in METHODS:
        points = sorted((r["params"] / 1e9, r["peak_gib"]) for r in results.values()
                        if r["method"] == method and "error" not in r)
        if points:
            ax.plot(*zip(*points), marker="o", label=method)
    ckpts = sorted({(r["params"] / 1e9, r["bytes"] / 2**30) for r in results.values() if "error" not in r})
    if ckpts:
        ax.plot(*zip(*ckpts), linestyle="--", color="gray", label="checkpoint size (bf16)")
    ax.set_xscale("log")
    ticks = sorted({round(r["params"] / 1e9, 2) for r in results.values() if "error" not in r})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("parameters (billions)")
    ax.set_ylabel("peak resident memory (GiB)")
    ax.set_title("nexus-export prune + ONNX, peak memory (2 CPU cores)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path} ({math.ceil(path.stat().st_size / 1024)} KiB)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
