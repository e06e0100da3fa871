"""Pruning quality benchmark: dense, magnitude, Wanda and SparseGPT at 50% unstructured and 2:4 on one model.

Prints one Markdown table: perplexity on the evaluation windows in PyTorch and onnxruntime, perplexity on text the
calibration never saw (the license texts in /usr/share/common-licenses, when present), achieved sparsity, pruning
seconds and the pass's peak RSS. Every pruned model starts from the same dense weights, captured once.

    .venv/bin/python bench/prune_quality.py --model smollm2-135m            # the default protocol (~35 min)
    .venv/bin/python bench/prune_quality.py --model tiny-llama --eval-windows 4 --seq-len 64 --calib-samples 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from common import setup_logging
from nexus_export.data import calibration_windows, evaluation_windows
from nexus_export.evaluate import program_perplexity
from nexus_export.passbase import PassContext
from nexus_export.program import Program
from nexus_export.registry import get_pass, get_runtime
from nexus_export.zoo import load_model

ROWS = [
    ("magnitude", {"sparsity": 0.5}), ("magnitude", {"pattern": "2:4"}),
    ("wanda", {"sparsity": 0.5}), ("wanda", {"pattern": "2:4"}),
    ("sparsegpt", {"sparsity": 0.5}), ("sparsegpt", {"pattern": "2:4"}),
]
LICENSES = Path("/usr/share/common-licenses")


def other_text(folder: Path) -> Path | None:
    """The license texts joined into one file (regular files only: the symlinks repeat them), or None."""
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink())
    out = Path(tempfile.mkdtemp()) / "licenses.txt"
    out.write_text("\n\n".join(p.read_text(errors="replace") for p in files))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--ood-windows", type=int, default=32, help="windows of the license texts (0 = skip)")
    ap.add_argument("--methods", default="", help="comma-separated subset of magnitude,wanda,sparsegpt")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    setup_logging()

    loaded = load_model(args.model)
    tok = loaded.tokenizer
    evals = evaluation_windows(tok, "austen", args.eval_windows, args.seq_len)
    calib = calibration_windows(tok, "austen", args.calib_samples, args.seq_len, 0)
    ood_path = other_text(LICENSES) if args.ood_windows else None
    ood = evaluation_windows(tok, ood_path, args.ood_windows, args.seq_len) if ood_path else None
    program = Program.from_model(loaded.model, tok, name=loaded.name)
    targets = [lin.name for lin in program.structure.in_blocks()]
    dense = {n: program.weight(n).detach().clone() for n in targets}
    runtime = get_runtime("onnxruntime")()
    wanted = set(filter(None, args.methods.split(",")))
    rows = []

    def measure(label: str, pattern: str, wall, rss) -> None:
        ppl, _ = program_perplexity(program, evals, 4, f"{label} {pattern}")
        ood_ppl = program_perplexity(program, ood, 4, f"{label} {pattern} (other text)")[0] if ood is not None else None
        with tempfile.TemporaryDirectory() as tmp:
            artifact = runtime.lower(program, Path(tmp))
            ort_ppl, _ = runtime.perplexity(runtime.session(artifact), evals, 4)
        zeros = sum(int((program.weight(n) == 0).sum()) for n in targets)
        total = sum(program.weight(n).numel() for n in targets)
        rows.append(dict(method=label, pattern=pattern, ppl=ppl, ppl_onnx=ort_ppl, ppl_other=ood_ppl,
                         sparsity=zeros / total, prune_s=wall, peak_rss_mb=rss))
        print_table(rows, flush=True)

    measure("dense", "-", None, None)
    for name, options in ROWS:
        if wanted and name not in wanted:
            continue
        with torch.no_grad():
            for n, w in dense.items():
                program.weight(n).copy_(w)
        report = get_pass(name)(options).run(program, PassContext(calibration_windows=calib)).report
        measure(name, options.get("pattern", "50% unstructured"), report.wall_s, report.peak_rss_mb)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def print_table(rows: list[dict], flush: bool = False) -> None:
    lines = ["| method | pattern | ppl PyTorch | ppl onnxruntime | ppl other text (x dense) | sparsity | prune s | "
             "peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    dense_other = rows[0]["ppl_other"]
    for r in rows:
        other = "-" if r["ppl_other"] is None else f"{r['ppl_other']:.2f} ({r['ppl_other'] / dense_other:.2f}x)"
        seconds = "-" if r["prune_s"] is None else f"{r['prune_s']:.0f}"
        rss = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
        lines.append(f"| {r['method']} | {r['pattern']} | {r['ppl']:.2f} | {r['ppl_onnx']:.2f} | {other} | "
                     f"{r['sparsity']:.1%} | {seconds} | {rss} |")
    print("\n".join(lines) + "\n", flush=flush)


if __name__ == "__main__":
    sys.exit(main())
