"""onnxruntime CPU latency of a dense model versus its structurally pruned version (ShortGPT block removal).

Both ONNX models are built from one capture and timed in the same process, interleaved run by run (dense, pruned,
dense, ...) so machine noise hits both alike; the table gives medians and the pruned/dense ratio.

    .venv/bin/python bench/structured_speed.py --model smollm2-135m --remove 7          # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


from common import interleaved_latency_ms, setup_logging
from nexus_export.data import calibration_windows
from nexus_export.passbase import PassContext
from nexus_export.program import Program
from nexus_export.registry import get_pass
from nexus_export.zoo import load_model
from runtimes import ort
from runtimes.onnx_export import lower_to_onnx


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--remove", type=int, default=7)
    ap.add_argument("--strategy", default="similarity")
    ap.add_argument("--shapes", default="1x128,8x512")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    setup_logging()

    loaded = load_model(args.model)
    program = Program.from_model(loaded.model, loaded.tokenizer, name=loaded.name)
    calib = calibration_windows(loaded.tokenizer, "austen", 64, 512, 0)
    shortgpt = get_pass("shortgpt")({"remove": args.remove, "strategy": args.strategy})
    pruned = shortgpt.run(program, PassContext(calibration_windows=calib)).program
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for label, prog in (("dense", program), ("pruned", pruned)):
            path = lower_to_onnx(prog.exported, Path(tmp) / label / "model.onnx")
            sessions[label] = ort.session(path, threads=args.threads)
        print(f"onnxruntime CPU, {args.threads} threads; {args.model} dense ({len(program.structure.blocks)} blocks) "
              f"vs {args.strategy} with {args.remove} removed ({len(pruned.structure.blocks)} blocks); "
              f"median of {args.repeats} interleaved runs\n")
        print("| batch x seq | dense ms | pruned ms | pruned / dense |")
        print("|---|---|---|---|")
        for shape in args.shapes.split(","):
            batch, seq = (int(x) for x in shape.split("x"))
            times = interleaved_latency_ms(sessions, batch, seq, args.repeats)
            dense, short = times["dense"], times["pruned"]
            print(f"| {batch} x {seq} | {dense:.0f} | {short:.0f} | {short / dense:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
