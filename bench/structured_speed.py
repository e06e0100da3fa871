"""onnxruntime CPU latency of a dense model versus its structurally pruned versions (ShortGPT block removal and
SliceGPT slicing).

Every ONNX model is built from one capture and timed in the same process, interleaved run by run (dense, shortgpt,
slicegpt, dense, ...) so machine noise hits all alike; the table gives medians and the ratios to dense.

    .venv/bin/python bench/structured_speed.py --model smollm2-135m --remove 7 --slicing 0.25     # ~8 min on 2 cores
    .venv/bin/python bench/structured_speed.py --remove 0 --slicing 0.25                          # SliceGPT only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import interleaved_latency_ms, setup_logging

from nexus_export.data import calibration_windows
from nexus_export.engine.pass_base import PassContext
from nexus_export.graph.program import Program
from nexus_export.models.zoo import open_model
from nexus_export.registry import get_pass
from runtimes import ort
from runtimes.onnx_export import lower_to_onnx


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--remove", type=int, default=7)
    ap.add_argument("--strategy", default="similarity")
    ap.add_argument("--slicing", type=float, default=0.25, help="SliceGPT slicing ratio (0 = leave SliceGPT out)")
    ap.add_argument("--shapes", default="1x128,8x512")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    setup_logging()

    loaded = open_model(args.model)
    program = Program.from_loaded(loaded)
    calib = calibration_windows(loaded.tokenizer, "austen", 64, 512, 0)
    ctx = PassContext(calibration_windows=calib)
    models = {"dense": program}
    if args.remove:
        shortgpt = get_pass("shortgpt")({"remove": args.remove, "strategy": args.strategy})
        models[f"shortgpt -{args.remove} blocks"] = shortgpt.run(program, ctx).program
    if args.slicing:
        models[f"slicegpt {args.slicing:.0%}"] = get_pass("slicegpt")({"slicing": args.slicing}).run(program, ctx).program
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for i, (label, prog) in enumerate(models.items()):
            path = lower_to_onnx(prog, Path(tmp) / str(i) / "model.onnx")
            sessions[label] = ort.session(path, threads=args.threads)
        print(f"onnxruntime CPU, {args.threads} threads; {args.model}; median of {args.repeats} interleaved runs\n")
        others = [label for label in models if label != "dense"]
        print("| batch x seq | dense ms | " + " | ".join(f"{o} ms | {o} / dense" for o in others) + " |")
        print("|---|---|" + "---|---|" * len(others))
        for shape in args.shapes.split(","):
            batch, seq = (int(x) for x in shape.split("x"))
            times = interleaved_latency_ms(sessions, batch, seq, args.repeats)
            cells = " | ".join(f"{times[o]:.0f} | {times[o] / times['dense']:.3f}" for o in others)
            print(f"| {batch} x {seq} | {times['dense']:.0f} | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
