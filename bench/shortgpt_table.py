"""ShortGPT table: perplexity versus number of blocks (or attention sublayers) removed, for each strategy.

Blocks are scored once per strategy on the calibration windows of the default protocol (perplexity: on the first
--rank-windows of them, re-ranked after each removal with --iterative); each row removes the n lowest-scoring ones
from the dense program and measures perplexity on the evaluation windows (PyTorch). The last row is the ranking time.

    .venv/bin/python bench/shortgpt_table.py --model smollm2-135m          # ~20 min on 2 cores
"""

from __future__ import annotations

import logging
import sys
import time

from common import load_protocol, protocol_parser, setup_logging

from nexus_export.evaluation.evaluate import program_perplexity
from nexus_export.graph.surgery import remove_attention, remove_blocks
from passes.shortgpt import DEFAULT_RANK_WINDOWS, STRATEGIES, rank_by_loss, score_blocks


def main() -> int:
    ap = protocol_parser(__doc__.splitlines()[0])
    ap.add_argument("--counts", default="0,2,4,7,10")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--rank-windows", type=int, default=DEFAULT_RANK_WINDOWS, help="perplexity: windows scored")
    ap.add_argument("--iterative", action="store_true", help="perplexity: re-rank after each removal")
    args = ap.parse_args()
    setup_logging()

    _, program, evals, calib = load_protocol(args.model, args.eval_windows, args.calib_samples, args.seq_len,
                                             args.calib_source)
    counts = [int(c) for c in args.counts.split(",")]
    strategies = args.strategies.split(",")
    table: dict[int, dict[str, str]] = {n: {} for n in counts}
    removed: dict[str, list[int]] = {}
    timing: dict[str, float] = {}
    for strategy in strategies:
        start = time.perf_counter()
        if strategy == "perplexity":
            ranking = calib[:args.rank_windows]
            _, ranked = rank_by_loss(program, ranking, max(counts), args.iterative)
            strategy = "perplexity, iterative" if args.iterative else "perplexity"
        else:
            scores = score_blocks(program, calib, strategy)
            ranked = sorted(scores, key=scores.get)
        timing[strategy] = time.perf_counter() - start
        for n in counts:
            chosen = sorted(ranked[:n])
            surgery = remove_attention if strategy == "attention" else remove_blocks
            new = surgery(program, chosen) if chosen else program
            ppl, _ = program_perplexity(new, evals, 4, f"{strategy} -{n}")
            table[n][strategy] = f"{ppl:.2f}"
            removed[f"{strategy} {n}"] = chosen
            logging.info("%s, %d removed %s: perplexity %.2f", strategy, n, chosen, ppl)
    strategies = list(timing)
    print("| removed | " + " | ".join(strategies) + " |")
    print("|---|" + "---|" * len(strategies))
    for n in counts:
        print(f"| {n} | " + " | ".join(table[n][s] for s in strategies) + " |")
    print("| ranking s | " + " | ".join(f"{timing[s]:.0f}" for s in strategies) + " |")
    print()
    for key, chosen in removed.items():
        print(f"- {key}: {chosen}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
