"""Compression table: dense and pruned SmolLM2, fp32 and int4 (block-wise weight-only), in onnxruntime on the CPU.

Rows: dense fp32, 2:4 fp32 (SparseGPT), dense int4, 2:4 int4, and ShortGPT (7 blocks removed) + int4. Columns: files
on disk (ONNX + external data), onnxruntime perplexity on the evaluation windows, and latency at 1 x 128 and 8 x 512
(median of runs interleaved across the models, so noise hits all alike).

    .venv/bin/python bench/compression.py --model smollm2-135m           # ~25 min on 2 cores
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path


from common import interleaved_latency_ms, load_protocol, protocol_parser, setup_logging
from nexus_export.passbase import PassContext
from nexus_export.registry import get_pass
from runtimes import ort
from runtimes.onnx_export import lower_to_onnx
from runtimes.quantize import quantize_onnx


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def main() -> int:
    ap = protocol_parser(__doc__.splitlines()[0])
    ap.add_argument("--remove", type=int, default=7)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--shapes", default="1x128,8x512")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    setup_logging()

    _, program, evals, calib = load_protocol(args.model, args.eval_windows, args.calib_samples, args.seq_len)
    ctx = PassContext(calibration_windows=calib)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {"dense fp32": lower_to_onnx(program, tmp / "dense" / "model.onnx")}
        short = get_pass("shortgpt")({"remove": args.remove}).run(program, ctx).program
        short_fp32 = lower_to_onnx(short, tmp / "short" / "model.onnx")
        del short
        get_pass("sparsegpt")({"pattern": "2:4"}).run(program, ctx)
        models["2:4 fp32"] = lower_to_onnx(program, tmp / "sparse" / "model.onnx")
        models["dense int4"] = quantize_onnx(models["dense fp32"], tmp / "dense" / "model.q4.onnx", 4, args.block_size)
        models["2:4 int4"] = quantize_onnx(models["2:4 fp32"], tmp / "sparse" / "model.q4.onnx", 4, args.block_size)
        models[f"ShortGPT -{args.remove} blocks int4"] = quantize_onnx(short_fp32, tmp / "short" / "model.q4.onnx", 4,
                                                                       args.block_size)
        sessions = {name: ort.session(path, threads=2) for name, path in models.items()}
        ppl = {name: ort.perplexity(sess, evals, batch_size=4)[0] for name, sess in sessions.items()}
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        latency = {shape: interleaved_latency_ms(sessions, *shape, args.repeats) for shape in shapes}
        print(f"{args.model}, onnxruntime CPU (2 threads); int4 = MatMulNBits block {args.block_size}, symmetric; "
              f"latency median of {args.repeats} interleaved runs\n")
        header = " | ".join(f"{b} x {s} ms" for b, s in shapes)
        print(f"| model | size MiB | perplexity | {header} |")
        print("|---|---|---|" + "---|" * len(shapes))
        for name, path in models.items():
            cells = " | ".join(f"{latency[shape][name]:.0f}" for shape in shapes)
            print(f"| {name} | {size(path) / 2**20:.1f} | {ppl[name]:.2f} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
