"""Pruning quality benchmark: dense, magnitude, Wanda and SparseGPT at 50% unstructured and 2:4 on one model.

``--set permute``: Wanda and SparseGPT 2:4 without and with the channel permutation (--permute); ``--set refit``:
SparseGPT 2:4 without and with --refit-steps 30, each without and with --permute; ``--set activation``: 40% of the
activations by TEAL's and WINA's criterion (greedy allocation); ``--set owl``: Wanda
and SparseGPT at 60% and 70% unstructured, uniform and with OWL's per-block sparsities (--layerwise owl); ``--set
removal``: ShortGPT's 7 blocks by perplexity and sublayers removed to the same share of parameters, each with and
without --repair linear (``--set removal_iterative``: sublayers re-ranked after each removal).

Prints one Markdown table: perplexity on the evaluation windows in PyTorch and onnxruntime, perplexity on text the
calibration never saw (the license texts in /usr/share/common-licenses, when present), achieved sparsity, pruning
seconds and the pass's peak RSS. Every pruned model starts from the same dense weights, captured once.

    .venv/bin/python bench/prune_quality.py --model smollm2-135m            # the default protocol (~35 min)
    .venv/bin/python bench/prune_quality.py --model tiny-llama --eval-windows 4 --seq-len 64 --calib-samples 4
    .venv/bin/python bench/prune_quality.py --set permute
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common import cell, load_protocol, other_cell, other_text_windows, protocol_parser, quality, setup_logging

from nexus_export.engine.pass_base import PassContext
from nexus_export.registry import get_pass

SETS = {
    "methods": [("magnitude", {"sparsity": 0.5}), ("magnitude", {"pattern": "2:4"}),
                ("wanda", {"sparsity": 0.5}), ("wanda", {"pattern": "2:4"}),
                ("sparsegpt", {"sparsity": 0.5}), ("sparsegpt", {"pattern": "2:4"})],
    "permute": [(m, {"pattern": "2:4", **extra}) for m in ("wanda", "sparsegpt") for extra in ({}, {"permute": True})],
    # SparseGPT 2:4 with its kept weights re-solved for the chosen mask (30 conjugate-gradient steps), and with --permute
    "refit": [("sparsegpt", {"pattern": "2:4", **permute, **refit}) for permute in ({}, {"permute": True})
              for refit in ({}, {"refit_steps": 30})],
    # activation thresholds at 40%, greedy allocation, by TEAL's |x| and by WINA's |x| * ||W[:, i]|| (the weights stay
    # dense: the sparsity column is 0; the share of multiply-adds reading a zero is bench/activation_quality.py's)
    "activation": [("activation", {"sparsity": 0.4, "allocation": "greedy", "criterion": c}) for c in ("magnitude", "wina")],
    "owl": [(m, {"sparsity": s, **extra}) for m in ("wanda", "sparsegpt") for s in (0.6, 0.7)
            for extra in ({}, {"layerwise": "owl"})],
    # ShortGPT's best whole-block ranking at 7 of SmolLM2's 30 blocks, and sublayers to the same parameter share
    "removal": [(m, {**how, **repair}) for m in ("shortgpt",) for how in (
        {"remove": 7, "strategy": "perplexity"}, {"granularity": "sublayer", "remove_params": 0.2333})
        for repair in ({}, {"repair": "linear"})],
    # re-ranked after each removal, on 2 of the calibration windows (a ranking of 60 sublayers each round)
    "removal_iterative": [("shortgpt", {"granularity": "sublayer", "remove_params": 0.2333, "iterative": True,
                                        "rank_windows": 2, "repair": "linear"})],
}


def label(options: dict) -> str:
    """The pattern column: N:M or the unstructured sparsity, and what was added (permute, owl); what a removal took."""
    if "remove" in options or "remove_params" in options:
        unit = "sublayers" if options.get("granularity") == "sublayer" else "blocks"
        text = (f"{options['remove_params']:.1%} of parameters in sublayers" if "remove_params" in options
                else f"{options['remove']} {unit}")
        text += f", iterative on {options['rank_windows']} windows" if options.get("iterative") else ""
        return text + (" + linear repair" if options.get("repair") else "")
    if "criterion" in options:
        return f"{options['sparsity']:.0%} of activations, {options['criterion']}, {options['allocation']}"
    text = options.get("pattern") or f"{options['sparsity']:.0%} unstructured"
    text += " permuted" if options.get("permute") else ""
    text += f" refit {options['refit_steps']}" if options.get("refit_steps") else ""
    return text + (" owl" if options.get("layerwise") else "")


def main() -> int:
    ap = protocol_parser(__doc__.splitlines()[0], other_text=True)
    ap.add_argument("--methods", default="", help="comma-separated subset of magnitude,wanda,sparsegpt")
    ap.add_argument("--patterns", default="", help="comma-separated subset of unstructured,2:4")
    ap.add_argument("--set", default="methods", choices=sorted(SETS), help="which rows (default: methods)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    setup_logging()

    loaded, program, evals, calib = load_protocol(args.model, args.eval_windows, args.calib_samples, args.seq_len,
                                                  args.calib_source)
    ood = other_text_windows(loaded.tokenizer, args.ood_windows, args.seq_len)
    dense_total = sum(lin.in_features * lin.out_features for lin in program.structure.in_blocks())
    wanted = set(filter(None, args.methods.split(",")))
    patterns = set(filter(None, args.patterns.split(",")))
    rows = []

    def measure(pruned, label: str, pattern: str, wall, rss) -> None:
        """A row; its sparsity is the share of the dense blocks' linear weights that are zero or gone."""
        kept = sum(int((pruned.weight(lin.name) != 0).sum()) for lin in pruned.structure.in_blocks())
        rows.append(dict(method=label, pattern=pattern, **quality(pruned, evals, ood, f"{label} {pattern}"),
                         sparsity=1.0 - kept / dense_total, prune_s=wall, peak_rss_mb=rss))
        print_table(rows, flush=True)

    measure(program, "dense", "-", None, None)
    for name, options in SETS[args.set]:
        if (wanted and name not in wanted) or (patterns and options.get("pattern", "unstructured") not in patterns):
            continue
        result = get_pass(name)(options).run(program.fork(), PassContext(calibration_windows=calib))
        measure(result.program, name, label(options), result.report.wall_s, result.report.peak_rss_mb)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def print_table(rows: list[dict], flush: bool = False) -> None:
    lines = ["| method | pattern | ppl PyTorch | ppl onnxruntime | ppl other text (x dense) | sparsity | prune s | "
             "peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['pattern']} | {r['ppl']:.2f} | {r['ppl_onnx']:.2f} | "
                     f"{other_cell(r['ppl_other'], rows[0]['ppl_other'])} | {r['sparsity']:.1%} | "
                     f"{cell(r['prune_s'], '.0f')} | {cell(r['peak_rss_mb'], '.0f')} |")
    print("\n".join(lines) + "\n", flush=flush)


if __name__ == "__main__":
    sys.exit(main())
