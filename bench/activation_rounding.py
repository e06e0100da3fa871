"""How far rounding alone moves an activation-sparse model: PyTorch against itself with nudged thresholds.

A hard threshold turns a rounding-sized change of its input into a different set of zeros, and every later block
sees that. This script places the thresholds once (the activation pass's calibration), then scores the evaluation
windows in PyTorch with every threshold multiplied by 1, 1 + nudge and 1 - nudge (nudge 1e-6: about ten float32
ulps), and in onnxruntime with the thresholds as placed. It prints each perplexity's distance from PyTorch's own, and how
much the nudge changes each token's NLL and the last block's output: the spread inside which onnxruntime and PyTorch
cannot be told apart.

    .venv/bin/python bench/activation_rounding.py --eval-windows 16 --sparsity 0.5
    .venv/bin/python bench/activation_rounding.py --model tiny-llama --eval-windows 4 --seq-len 64 --calib-samples 4
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from common import load_protocol, protocol_parser, setup_logging

from nexus_export.graph.runner import BlockRunner
from passes.activation import IN_BLOCK_ROLES, Threshold, insert_thresholds, place_thresholds


def token_nll(program, windows: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each predicted token's NLL [windows * (seq - 1)] and the stream after the last block [windows, seq, hidden]."""
    runner = BlockRunner(program, windows, batch_size)
    runner.run_blocks()
    nll, streams = [], []
    with torch.no_grad():
        for i in range(runner.batches):
            logits = runner.logits(i).float()
            ids = windows[i * runner.micro:(i + 1) * runner.micro]
            nll.append(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                                         reduction="none"))
            streams.append(runner.state.streams[i].float())
    return torch.cat(nll).double(), torch.cat(streams)


def main() -> int:
    from runtimes import ort
    from runtimes.onnx_export import lower_to_onnx

    ap = protocol_parser(__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--allocation", default="uniform", choices=["uniform", "greedy"])
    ap.add_argument("--nudge", type=float, default=1e-6, help="relative change of every threshold (1e-6)")
    args = ap.parse_args()
    setup_logging()

    _, program, evals, calib = load_protocol(args.model, args.eval_windows, args.calib_samples, args.seq_len,
                                             args.calib_source)
    placed = place_thresholds(program, calib, args.sparsity, list(IN_BLOCK_ROLES), allocation=args.allocation)

    def scaled(factor: float):
        return insert_thresholds(program, [Threshold(t.block, t.linears, t.value * factor, t.calibration_sparsity)
                                           for t in placed])

    base_nll, base_stream = token_nll(scaled(1.0), evals, 4)
    base = float(base_nll.mean().exp())
    lines = [f"activation sparsity {args.sparsity:.0%} ({args.allocation}), {args.model}, {base_nll.numel()} tokens",
             "", "| thresholds | runtime | perplexity | vs PyTorch as placed | token NLL change (median / p99) | "
             "last block's output change (median) |", "|---|---|---|---|---|---|",
             f"| as placed | PyTorch | {base:.2f} | - | - | - |"]
    for factor in (1 + args.nudge, 1 - args.nudge):
        nll, stream = token_nll(scaled(factor), evals, 4)
        ppl = float(nll.mean().exp())
        change = (nll - base_nll).abs()
        drift = ((stream - base_stream).norm(dim=-1) / base_stream.norm(dim=-1)).flatten()
        lines.append(f"| x {factor:.7g} | PyTorch | {ppl:.2f} | {ppl / base - 1:+.2%} | {change.median():.3f} / "
                     f"{change.quantile(0.99):.3f} | {drift.median():.1%} |")
    with tempfile.TemporaryDirectory() as tmp:
        onnx = ort.perplexity(ort.session(lower_to_onnx(scaled(1.0), Path(tmp) / "model.onnx")), evals, 1)[0]
    lines.append(f"| as placed | onnxruntime | {onnx:.2f} | {onnx / base - 1:+.2%} | - | - |")
    print("\n".join(lines) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
