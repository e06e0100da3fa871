"""Activation sparsity benchmark: calibrated per-input thresholds against the seed's one global threshold.

For each target sparsity, the ``activation`` pass places one threshold per linear input on the calibration windows,
with the same sparsity in every input (uniform) or as TEAL's greedy allocation spreads it within each block, by
each criterion asked for (magnitude |x_i|, TEAL's; wina, |x_i| times its weight column's norm); the
seed's global threshold is then searched (bisection) until it zeroes the same share of the linear inputs'
entries on the evaluation windows as the calibrated thresholds do, so both rows of a sparsity compare at the same
measured sparsity. Prints one Markdown table: measured sparsity, share of the blocks' multiply-adds that read a zero,
perplexity on the evaluation windows in PyTorch and onnxruntime, and on text the calibration never saw.

    .venv/bin/python bench/activation_quality.py                     # SmolLM2-135M, the default protocol
    .venv/bin/python bench/activation_quality.py --sparsities 0.4,0.5 --criteria magnitude,wina
    .venv/bin/python bench/activation_quality.py --model tiny-llama --eval-windows 4 --seq-len 64 --calib-samples 4
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common import cell, load_protocol, other_cell, other_text_windows, protocol_parser, quality, setup_logging

from nexus_export.engine.pass_base import PassContext
from nexus_export.evaluation.activation_stats import input_sparsity, summarize_inputs
from passes.activation import ActivationPass, Threshold, input_groups, insert_thresholds

ROLES = ["attn_in", "attn_out", "mlp_in", "mlp_out"]


def main() -> int:
    ap = protocol_parser(__doc__.splitlines()[0], other_text=True)
    ap.add_argument("--sparsities", default="0.25,0.4,0.5,0.6", help="comma-separated targets in (0, 1)")
    ap.add_argument("--criteria", default="magnitude", help="comma-separated, of magnitude and wina (magnitude)")
    ap.add_argument("--search-windows", type=int, default=8,
                    help="evaluation windows the global threshold's bisection measures on (8)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    setup_logging()

    loaded, program, evals, calib = load_protocol(args.model, args.eval_windows, args.calib_samples, args.seq_len,
                                                  args.calib_source)
    other = other_text_windows(loaded.tokenizer, args.ood_windows, args.seq_len)
    search = evals[: args.search_windows]
    groups = input_groups(program, ROLES)
    block_macs = sum(lin.in_features * lin.out_features for lin in program.structure.in_blocks())  # per token
    rows = []

    def measure(label: str, target, thresholded) -> None:
        measured = summarize_inputs(input_sparsity(thresholded, evals))
        rows.append(dict(method=label, target=target, sparsity=measured["sparsity"],
                         skippable_macs=measured["skippable_macs"],
                         skippable_mmacs_per_token=measured["skippable_macs"] * block_macs / 1e6,
                         **quality(thresholded, evals, other, f"{label} {target}")))
        print_table(rows, flush=True)

    def global_at(threshold: float):
        return insert_thresholds(program, [Threshold(block, names, threshold, 0.0) for block, names in groups])

    measure("dense", None, program)
    for target in (float(s) for s in args.sparsities.split(",")):
        calibrated = None
        for criterion in args.criteria.split(","):
            named = "" if criterion == "magnitude" else f" ({criterion})"
            for allocation in ("uniform", "greedy"):
                pruned = ActivationPass({"sparsity": target, "allocation": allocation, "criterion": criterion}).run(
                    program.fork(), PassContext(calibration_windows=calib)).program
                measure(f"per-input, {allocation}{named}", target, pruned)
                if criterion == "magnitude" and allocation == "uniform":
                    calibrated = pruned  # the global threshold below matches its measured sparsity
        if calibrated is None:  # the seed's row matches magnitude's uniform thresholds
            continue
        wanted = summarize_inputs(input_sparsity(calibrated, search))["sparsity"]  # the uniform one's
        low, high = 0.0, 1.0
        while summarize_inputs(input_sparsity(global_at(high), search))["sparsity"] < wanted:
            low, high = high, high * 2
        for _ in range(12):  # the global threshold zeroing as many entries as the calibrated ones, to ~0.1%
            mid = (low + high) / 2
            low, high = (mid, high) if summarize_inputs(input_sparsity(global_at(mid), search))["sparsity"] < wanted \
                else (low, mid)
        measure(f"global threshold {high:.4g} (seed)", target, global_at(high))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def print_table(rows: list[dict], flush: bool = False) -> None:
    dense = rows[0]
    lines = ["| thresholds | target | measured sparsity | block multiply-adds reading a zero (M per token) | "
             "ppl PyTorch (x dense) | ppl onnxruntime | ppl other text (x dense) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {cell(r['target'], '.0%')} | {r['sparsity']:.1%} | "
                     f"{r['skippable_macs']:.1%} ({r['skippable_mmacs_per_token']:.1f}) | "
                     f"{r['ppl']:.2f} ({r['ppl'] / dense['ppl']:.3f}x) | "
                     f"{r['ppl_onnx']:.2f} | {other_cell(r['ppl_other'], dense['ppl_other'])} |")
    print("\n".join(lines) + "\n", flush=flush)


if __name__ == "__main__":
    sys.exit(main())
