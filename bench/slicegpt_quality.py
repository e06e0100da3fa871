"""SliceGPT quality benchmark: rotation-only invariance, then perplexity, size and pruning time per slicing ratio.

Prints two Markdown tables. The first: with slicing 0 (norm fusion and rotations only), the largest |logits| difference
from the dense model on evaluation windows, in PyTorch and in onnxruntime. The second: per slicing ratio, perplexity on
the evaluation windows (PyTorch and onnxruntime), on text the calibration never saw (the license texts, when present),
parameters (shortcut matrices counted), pruning seconds and peak RSS. All runs start from one capture of the dense model.

    .venv/bin/python bench/slicegpt_quality.py --model smollm2-135m                     # default protocol, ~14 min
    .venv/bin/python bench/slicegpt_quality.py --model tiny-llama --eval-windows 4 --seq-len 64 --calib-samples 8
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from common import cell, load_protocol, other_cell, other_text_windows, protocol_parser, quality, setup_logging

from nexus_export.engine.pass_base import PassContext
from nexus_export.registry import get_pass
from runtimes import ort
from runtimes.onnx_export import lower_to_onnx


def main() -> int:
    ap = protocol_parser(__doc__.splitlines()[0], other_text=True)
    ap.add_argument("--slicings", default="0.25", help="comma-separated slicing ratios")
    ap.add_argument("--skip-invariance", action="store_true", help="leave out the slicing-0 check")
    args = ap.parse_args()
    setup_logging()

    loaded, program, evals, calib = load_protocol(args.model, args.eval_windows, args.calib_samples, args.seq_len,
                                                  args.calib_source)
    ood = other_text_windows(loaded.tokenizer, args.ood_windows, args.seq_len)
    ctx = PassContext(calibration_windows=calib)

    if not args.skip_invariance:
        probe = evals[:2]
        dense_logits = program.logits(probe)
        rotated = get_pass("slicegpt")({"slicing": 0.0}).run(program, ctx)
        torch_diff = float((rotated.program.logits(probe) - dense_logits).abs().max())
        with tempfile.TemporaryDirectory() as tmp:
            onnx = {}
            for label, prog in (("dense", program), ("rotated", rotated.program)):
                sess = ort.session(lower_to_onnx(prog, Path(tmp) / label / "model.onnx"))
                onnx[label] = torch.from_numpy(ort.logits(sess, probe))
        with torch.no_grad():  # the exact reference: the dense model in float64
            exact = program.materialize(torch.float64)(probe, torch.ones_like(probe))

        def diff(a: torch.Tensor, b: torch.Tensor) -> str:
            return f"{float((a.double() - b.double()).abs().max()):.2e}"

        print(f"Rotation only (slicing 0), {args.model}, {probe.shape[0]} x {probe.shape[1]} evaluation tokens; "
              f"{rotated.report.changes['shortcut_parameters']} shortcut parameters; largest |dense logit| "
              f"{float(dense_logits.abs().max()):.1f}. Max abs logits difference:\n")
        print("| runtime | rotated vs dense, same runtime | rotated vs dense float64 | dense vs dense float64 |\n"
              "|---|---|---|---|")
        print(f"| PyTorch float32 | {torch_diff:.2e} | {diff(rotated.program.logits(probe), exact)} | "
              f"{diff(dense_logits, exact)} |")
        print(f"| onnxruntime float32 | {diff(onnx['rotated'], onnx['dense'])} | {diff(onnx['rotated'], exact)} | "
              f"{diff(onnx['dense'], exact)} |\n", flush=True)
        del rotated

    if not args.slicings:
        return 0
    rows = [measure("dense", program, evals, ood, None)]
    print_table(rows)
    for ratio in (float(x) for x in args.slicings.split(",") if x):
        report_ = get_pass("slicegpt")({"slicing": ratio}).run(program, ctx)
        widths = sorted(set(report_.report.changes["widths"].values()))
        rows.append(measure(f"slicegpt {ratio:.0%} (width {'/'.join(map(str, widths))})", report_.program, evals, ood,
                            report_.report))
        print_table(rows)
    return 0


def measure(label: str, program, evals, ood, report) -> dict:
    return dict(label=label, **quality(program, evals, ood, label), params=program.num_parameters(),
                prune_s=report.wall_s if report else None, peak_rss_mb=report.peak_rss_mb if report else None)


def print_table(rows: list[dict]) -> None:
    lines = ["| model | ppl PyTorch | ppl onnxruntime | ppl other text (x dense) | parameters | prune s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['ppl']:.2f} | {r['ppl_onnx']:.2f} | "
                     f"{other_cell(r['ppl_other'], rows[0]['ppl_other'])} | {r['params'] / 1e6:.1f}M | "
                     f"{cell(r['prune_s'], '.0f')} | {cell(r['peak_rss_mb'], '.0f')} |")
    print("\n".join(lines) + "\n", flush=True)


if __name__ == "__main__":
    sys.exit(main())
