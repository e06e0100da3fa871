"""How the Hessian is accumulated and factored, against the float64 reference: masks and perplexity.

SparseGPT 2:4 (and GPTQ 4-bit) on one model, each setting from the same dense weights: the reference accumulates
X^T X in float64 and factors it with torch (two [D, D] temporaries); the present code accumulates in float32 and
factors in place through LAPACK (nexus_export/engine/calibration.py, passes/shared/obs.py). For each setting: the
share of weights whose pruned/kept state agrees with the reference's, the share of weights that differ at all
(after GPTQ), perplexity on the evaluation windows and on the other text, and pruning seconds.

    .venv/bin/python bench/hessian_precision.py                     # SmolLM2-135M, the default protocol (~20 min)
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


def torch_factoring(a: torch.Tensor) -> bool:
    """The factoring before the in-place one: torch's Cholesky, inverse and Cholesky, two temporaries."""
    lower, info = torch.linalg.cholesky_ex(a)
    if int(info):
        return False
    a.copy_(torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True))
    return True


SETTINGS = {  # name: (accumulation dtype, factoring)
    "float64, torch (reference)": (torch.float64, torch_factoring),
    "float64, in place": (torch.float64, obs.inverse_upper_cholesky_),
    "float32, in place (default)": (torch.float32, obs.inverse_upper_cholesky_),
}
PASSES = {"sparsegpt 2:4": ("sparsegpt", {"pattern": "2:4"}),
          "gptq 4-bit": ("gptq", {"bits": 4, "group_size": 128})}


def main() -> int:
    ap = protocol_parser(__doc__.splitlines()[0], other_text=True)
    ap.add_argument("--passes", default=",".join(PASSES), help=f"comma-separated, of {', '.join(PASSES)}")
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
        for setting, (dtype, factoring) in SETTINGS.items():
            calibration.HESSIAN_DTYPE, obs.inverse_upper_cholesky_ = dtype, factoring
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
