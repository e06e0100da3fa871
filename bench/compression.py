"""Compression table: dense and pruned SmolLM2, fp32 and int4 (RTN and GPTQ), in onnxruntime on the CPU.

Rows: dense fp32; 2:4 fp32 (SparseGPT); dense int4 by round to nearest (onnxruntime's quantizer) and by GPTQ (in
stored column order, and with act-order); 2:4 int4 by RTN, by GPTQ after SparseGPT (both orders), and by the joint
SparseGPT + GPTQ sweep; ShortGPT (7 blocks removed) + RTN int4. Columns: files on disk (ONNX + external data),
onnxruntime perplexity on the evaluation windows and on other text (the license texts), with --pytorch the PyTorch
perplexity of the dequantized GPTQ weights beside it, the pass's time, and latency at 1 x 128 and 8 x 512 (median of
runs interleaved across the models, so noise hits all alike).

    .venv/bin/python bench/compression.py --model smollm2-135m           # ~55 min on 2 cores
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from common import cell, interleaved_latency_ms, load_protocol, other_text_windows, protocol_parser, setup_logging

from nexus_export.engine.pass_base import PassContext
from nexus_export.evaluation.evaluate import program_perplexity
from nexus_export.registry import get_pass
from passes.gptq import quantization_grids
from passes.shared.quant_grid import Grid
from runtimes import ort
from runtimes.onnx_export import lower_to_onnx
from runtimes.quantize import quantize_onnx, write_grids


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def main() -> int:
    ap = protocol_parser(__doc__.splitlines()[0], other_text=True)
    ap.add_argument("--remove", type=int, default=7)
    ap.add_argument("--group-size", "--block-size", dest="group_size", type=int, default=32)
    ap.add_argument("--pytorch", action="store_true", help="also the PyTorch perplexity of each GPTQ model")
    ap.add_argument("--shapes", default="1x128,8x512")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    setup_logging()

    loaded, dense, evals, calib = load_protocol(args.model, args.eval_windows, args.calib_samples, args.seq_len,
                                                args.calib_source)
    other = other_text_windows(loaded.tokenizer, args.ood_windows, args.seq_len)
    ctx = PassContext(calibration_windows=calib)
    grid = Grid(4, args.group_size)
    gptq = {"bits": 4, "group_size": args.group_size}
    models: dict[str, Path] = {}
    facts: dict[str, dict] = {}

    def run(program, name: str, options: dict, label: str):
        result = get_pass(name)(options).run(program, ctx)
        facts[label] = {"pass_s": result.report.wall_s}
        return result.program

    def quantized(program, label: str, folder: Path) -> None:
        """Lower a GPTQ program, write its MatMulNBits from its own grids (and note its PyTorch perplexity)."""
        if args.pytorch:
            facts[label]["ppl_pytorch"] = program_perplexity(program, evals, 2, f"{label} (PyTorch)")[0]
        fp32 = lower_to_onnx(program, folder / "model.onnx")
        models[label] = write_grids(fp32, folder / "model.q4.onnx", grid, quantization_grids(program))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models["dense fp32"] = lower_to_onnx(dense, tmp / "dense" / "model.onnx")
        models["dense int4 RTN"] = quantize_onnx(models["dense fp32"], tmp / "dense" / "model.q4.onnx", 4,
                                                 args.group_size)
        quantized(run(dense.fork(), "gptq", gptq, "dense int4 GPTQ"), "dense int4 GPTQ", tmp / "dense-gptq")
        label = "dense int4 GPTQ act-order"
        quantized(run(dense.fork(), "gptq", {**gptq, "act_order": True}, label), label, tmp / "dense-gptq-act")
        sparse = run(dense.fork(), "sparsegpt", {"pattern": "2:4"}, "2:4 fp32")
        models["2:4 fp32"] = lower_to_onnx(sparse, tmp / "sparse" / "model.onnx")
        models["2:4 int4 RTN"] = quantize_onnx(models["2:4 fp32"], tmp / "sparse" / "model.q4.onnx", 4,
                                               args.group_size)
        label = "2:4 int4 SparseGPT then GPTQ"
        quantized(run(sparse.fork(), "gptq", gptq, label), label, tmp / "sparse-gptq")
        label = "2:4 int4 SparseGPT then GPTQ act-order"
        quantized(run(sparse.fork(), "gptq", {**gptq, "act_order": True}, label), label, tmp / "sparse-gptq-act")
        del sparse
        label = "2:4 int4 joint sweep"
        joint = {**gptq, "prune": {"method": "sparsegpt", "pattern": "2:4"}}
        quantized(run(dense.fork(), "gptq", joint, label), label, tmp / "joint")
        short = run(dense.fork(), "shortgpt", {"remove": args.remove}, f"ShortGPT -{args.remove} blocks int4 RTN")
        short_fp32 = lower_to_onnx(short, tmp / "short" / "model.onnx")
        del short
        models[f"ShortGPT -{args.remove} blocks int4 RTN"] = quantize_onnx(short_fp32, tmp / "short" / "model.q4.onnx",
                                                                           4, args.group_size)
        sessions = {name: ort.session(path, threads=2) for name, path in models.items()}
        ppl = {name: ort.perplexity(sess, evals, batch_size=4)[0] for name, sess in sessions.items()}
        ppl_other = {name: ort.perplexity(sess, other, batch_size=4)[0] if other is not None else None
                     for name, sess in sessions.items()}
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        latency = {shape: interleaved_latency_ms(sessions, *shape, args.repeats) for shape in shapes}
        print(f"{args.model}, onnxruntime CPU (2 threads); int4 = MatMulNBits, groups of {args.group_size}, "
              f"symmetric; {args.calib_samples} x {args.seq_len} calibration windows, {len(evals)} evaluation windows"
              f"{f', {len(other)} other-text windows' if other is not None else ''}; latency median of {args.repeats} "
              "interleaved runs\n")
        header = " | ".join(f"{b} x {s} ms" for b, s in shapes)
        print(f"| model | size MiB | ppl onnxruntime | ppl PyTorch | ppl other text | pass s | {header} |")
        print("|---|---|---|---|---|---|" + "---|" * len(shapes))
        for name, path in models.items():
            cells = " | ".join(f"{latency[shape][name]:.0f}" for shape in shapes)
            f = facts.get(name, {})
            print(f"| {name} | {size(path) / 2**20:.1f} | {ppl[name]:.2f} | {cell(f.get('ppl_pytorch'), '.2f')} | "
                  f"{cell(ppl_other[name], '.2f')} | {cell(f.get('pass_s'), '.0f')} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
