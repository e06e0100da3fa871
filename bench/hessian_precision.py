"""The two ways the Hessian is accumulated and factored, against each other and a control: masks and perplexity.

SparseGPT 2:4 (and GPTQ 4-bit) on one model, each setting from the same dense weights. The reference is what every
input up to LEAN_HESSIAN_WIDTH (16,384) gets: X^T X accumulated in float64, factored with torch (two [D, D]
temporaries). The lean Hessian of wider inputs is accumulated in float32 and factored in place, in blocks
(nexus_export/engine/calibration.py, passes/shared/obs.py); here it is forced on every input. The control is the
reference on a rescaled Hessian: the same result in exact arithmetic, so it shows how far rounding alone moves the
sweep (it amplifies near-ties: one flipped 2:4 choice changes every later update of its row). For each setting: the
share of weights whose pruned/kept state agrees with the reference's, the share of weights that differ at all
(after GPTQ), perplexity on the evaluation windows and on the other text, and pruning seconds.

    .venv/bin/python bench/hessian_precision.py                     # SmolLM2-135M, the default protocol (~30 min)
    .venv/bin/python bench/hessian_precision.py --passes "sparsegpt 2:4" --settings 0,1   # reference and control
    .venv/bin/python bench/hessian_precision.py --model tiny-llama --eval-windows 4 --seq-len 64 --calib-samples 4
"""

from __future__ import annotations

import sys
import time

import torch
from common import load_protocol, other_text_windows, protocol_parser, setup_logging

import nexus_export.engine.calibration as calibration
import passes.shared.obs as obs
from nexus_export.engine.pass_base import PassContext
from nexus_export.evaluation.evaluate import program_perplexity
from nexus_export.registry import get_pass

FACTOR = obs.inverse_upper_cholesky_


def rescaled(a: torch.Tensor) -> bool:
    """The reference's factoring of H times 1 + 2^-20: the same masks and weights in exact arithmetic (the sweep's
    w^2 / d^2 and err / d * Hinv do not change when H is scaled), so what moves is rounding alone: the control."""
    return FACTOR(a.mul_(1.0 + 2.0**-20))


NEVER = 10**9
SETTINGS = {  # name: (LEAN_HESSIAN_WIDTH, factoring)
    "float64, torch (reference; inputs up to 16,384 wide)": (NEVER, FACTOR),
    "float64, torch, H x (1 + 2^-20) (control)": (NEVER, rescaled),
    "float32, in place (the lean Hessian of wider inputs)": (0, FACTOR),
}
PASSES = {"sparsegpt 2:4": ("sparsegpt", {"pattern": "2:4"}),
          "gptq 4-bit": ("gptq", {"bits": 4, "group_size": 128})}


def main() -> int:
    ap = protocol_parser(__doc__.splitlines()[0], other_text=True)
    ap.add_argument("--passes", default=",".join(PASSES), help=f"comma-separated, of {', '.join(PASSES)}")
    ap.add_argument("--settings", default="", help="comma-separated indices into the settings (default: all; the "
                    "first is the reference every row is compared with)")
    args = ap.parse_args()
    setup_logging()
    loaded, program, evals, calib = load_protocol(args.model, args.eval_windows, args.calib_samples, args.seq_len)
    other = other_text_windows(loaded.tokenizer, args.ood_windows, args.seq_len)
    targets = [lin.name for lin in program.structure.in_blocks()]
    print("| pass | accumulation, factoring | masks agree | weights equal | ppl | ppl other text | prune s |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    for label in args.passes.split(","):
        name, options = PASSES[label]
        reference = None
        chosen = [int(i) for i in args.settings.split(",")] if args.settings else range(len(SETTINGS))
        for setting, (width, factoring) in [list(SETTINGS.items())[i] for i in chosen]:
            calibration.LEAN_HESSIAN_WIDTH = obs.LEAN_HESSIAN_WIDTH = width
            obs.inverse_upper_cholesky_ = factoring
            pruned = program.fork()
            start = time.perf_counter()
            get_pass(name)(options).run(pruned, PassContext(calibration_windows=calib))
            wall = time.perf_counter() - start
            weights = {n: pruned.weight(n).detach().clone() for n in targets}
            reference = reference or weights
            total = sum(w.numel() for w in weights.values())
            agree = sum(int(((w == 0) == (reference[n] == 0)).sum()) for n, w in weights.items()) / total
            equal = sum(int((w == reference[n]).sum()) for n, w in weights.items()) / total
            ppl = program_perplexity(pruned, evals, 2, setting)[0]
            ppl_other = program_perplexity(pruned, other, 2, setting)[0] if other is not None else float("nan")
            print(f"| {label} | {setting} | {agree:.4%} | {equal:.2%} | {ppl:.3f} | {ppl_other:.3f} | {wall:.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
