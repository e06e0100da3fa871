"""GPTQ settings side by side: column order, range search, and the joint SparseGPT + GPTQ sweep, on one model.

Each row quantizes the same dense weights (captured once) to 4 bits with groups of 32 and prints the perplexity of
the dequantized weights in PyTorch on the evaluation windows and on text the calibration never saw (the license
texts), and the passes' seconds. The int4 files that onnxruntime runs hold exactly these weights (see
bench/compression.py for their onnxruntime perplexity, size and latency).

    .venv/bin/python bench/gptq_quality.py                                  # every row (~45 min)
    .venv/bin/python bench/gptq_quality.py --rows dense-act,dense-act-clip  # a subset
    .venv/bin/python bench/gptq_quality.py --model tiny-llama --eval-windows 4 --seq-len 64 --calib-samples 4
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from common import cell, load_protocol, other_text_windows, protocol_parser, setup_logging

from nexus_export.engine.pass_base import PassContext
from nexus_export.evaluation.evaluate import program_perplexity
from nexus_export.registry import get_pass

GRID = {"bits": 4, "group_size": 32}
TWO_FOUR = {"pattern": "2:4"}
ROWS = {  # label -> (settings in words, the passes it runs in order)
    "dense-stored": ("GPTQ, stored order, whole range",
                     [("gptq", {**GRID, "act_order": False, "clip_search": False})]),
    "dense-act": ("GPTQ, act-order, whole range", [("gptq", {**GRID, "act_order": True, "clip_search": False})]),
    "dense-act-clip": ("GPTQ, act-order, range searched (default)",
                       [("gptq", {**GRID, "act_order": True, "clip_search": True})]),
    "2:4-then-stored": ("SparseGPT 2:4, then GPTQ, stored order, whole range",
                        [("sparsegpt", TWO_FOUR), ("gptq", {**GRID, "act_order": False, "clip_search": False})]),
    "2:4-then-act-clip": ("SparseGPT 2:4, then GPTQ, act-order, range searched (default)",
                          [("sparsegpt", TWO_FOUR), ("gptq", {**GRID, "act_order": True, "clip_search": True})]),
    "2:4-joint": ("joint SparseGPT 2:4 + GPTQ sweep, whole range (default for --joint)",
                  [("gptq", {**GRID, "clip_search": False, "prune": {"method": "sparsegpt", **TWO_FOUR}})]),
    "2:4-joint-clip": ("joint SparseGPT 2:4 + GPTQ sweep, range searched",
                       [("gptq", {**GRID, "clip_search": True, "prune": {"method": "sparsegpt", **TWO_FOUR}})]),
}


def int4_perplexity(program, evals) -> float:
    """onnxruntime's perplexity of the int4 file written from ``program``'s GPTQ grids."""
    from passes.gptq import quantization_grids
    from passes.shared.quant_grid import Grid
    from runtimes import ort
    from runtimes.onnx_export import lower_to_onnx
    from runtimes.quantize import write_grids

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = lower_to_onnx(program, Path(tmp) / "model.onnx")
        int4 = write_grids(fp32, Path(tmp) / "model.q4.onnx", Grid(GRID["bits"], GRID["group_size"]),
                           quantization_grids(program))
        return ort.perplexity(ort.session(int4, threads=2), evals, batch_size=4)[0]


def main() -> int:
    ap = protocol_parser(__doc__.splitlines()[0], other_text=True)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--onnxruntime", action="store_true",
                    help="also write each row's int4 file (MatMulNBits) and its onnxruntime perplexity")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    setup_logging()
    wanted = args.rows.split(",")
    unknown = [r for r in wanted if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {', '.join(unknown)}; choose from {', '.join(ROWS)}")

    loaded, dense, evals, calib = load_protocol(args.model, args.eval_windows, args.calib_samples, args.seq_len,
                                                args.calib_source)
    other = other_text_windows(loaded.tokenizer, args.ood_windows, args.seq_len)
    ctx = PassContext(calibration_windows=calib)
    rows = []
    for label in wanted:
        program, start = dense.fork(), time.perf_counter()
        settings, steps = ROWS[label]
        for name, options in steps:
            program = get_pass(name)(options).run(program, ctx).program
        seconds = time.perf_counter() - start
        ppl = program_perplexity(program, evals, 2, label)[0]
        ppl_other = program_perplexity(program, other, 2, f"{label} (other text)")[0] if other is not None else None
        ppl_ort = int4_perplexity(program, evals) if args.onnxruntime else None
        rows.append({"row": label, "settings": settings, "ppl": ppl, "ppl_onnxruntime": ppl_ort,
                     "ppl_other": ppl_other, "pass_s": seconds})
        del program

    print(f"{args.model}; 4 bits, groups of 32, symmetric; {args.calib_samples} x {args.seq_len} calibration windows, "
          f"{len(evals)} evaluation windows{f', {len(other)} other-text windows' if other is not None else ''}; "
          "PyTorch perplexity of the dequantized weights\n")
    print("| row | settings | perplexity | int4 in onnxruntime | other text | passes s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['settings']} | {r['ppl']:.2f} | {cell(r['ppl_onnxruntime'], '.2f')} | "
              f"{cell(r['ppl_other'], '.2f')} | {r['pass_s']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
