"""ShortGPT table: perplexity versus number of blocks (or attention sublayers) removed, for each strategy.

Blocks are scored once per strategy on the calibration windows of the default protocol; each row removes the n
lowest-scoring ones from the dense program and measures perplexity on the evaluation windows (PyTorch).

    .venv/bin/python bench/shortgpt_table.py --model smollm2-135m          # ~20 min on 2 cores
"""

from __future__ import annotations

import logging
import sys

from common import load_protocol, protocol_parser, setup_logging
from nexus_export.evaluate import program_perplexity
from nexus_export.surgery import remove_attention, remove_blocks
from passes.shortgpt import STRATEGIES, score_blocks


def main() -> int:
    ap = protocol_parser(__doc__.splitlines()[0])
    ap.add_argument("--counts", default="0,2,4,7,10")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    args = ap.parse_args()
    setup_logging()

    _, program, evals, calib = load_protocol(args.model, args.eval_windows, args.calib_samples, args.seq_len)
    counts = [int(c) for c in args.counts.split(",")]
    strategies = args.strategies.split(",")
    table: dict[int, dict[str, str]] = {n: {} for n in counts}
    removed: dict[str, list[int]] = {}
    for strategy in strategies:
        scores = score_blocks(program, calib, strategy)
        ranked = sorted(scores, key=scores.get)
        for n in counts:
            chosen = sorted(ranked[:n])
            surgery = remove_attention if strategy == "attention" else remove_blocks
            new = surgery(program, chosen) if chosen else program
            ppl, _ = program_perplexity(new, evals, 4, f"{strategy} -{n}")
            table[n][strategy] = f"{ppl:.2f}"
            removed[f"{strategy} {n}"] = chosen
            logging.info("%s, %d removed %s: perplexity %.2f", strategy, n, chosen, ppl)
    print("| removed | " + " | ".join(strategies) + " |")
    print("|---|" + "---|" * len(strategies))
    for n in counts:
        print(f"| {n} | " + " | ".join(table[n][s] for s in strategies) + " |")
    print()
    for key, chosen in removed.items():
        print(f"- {key}: {chosen}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
