"""Lowering speed: torch's exporter called once per opset against its steps with one decomposition for both.

A lowering writes the cache model (opset 23) and the full-sequence model (opset 18) of one graph. Rows: ``public``
(``torch.onnx.export`` per opset, as before runtimes/torch_onnx_steps.py) and ``steps`` (the graph decomposed once,
registries kept per opset). Each run lowers the dense model with both graph caches empty (a fresh on-disk folder,
the in-process exports cleared), so the exporter runs every time; runs alternate between the rows, and the table
gives the median seconds of the whole lowering (export, weights written, files checked) and the ratio.

    .venv/bin/python bench/lowering_speed.py                 # SmolLM2-135M, 3 runs each: ~6 min on 2 cores
    .venv/bin/python bench/lowering_speed.py --model tiny-llama --runs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

from common import setup_logging

from nexus_export.graph.program import Program
from nexus_export.models.zoo import open_model
from runtimes import onnx_export, torch_onnx_steps


def lower_once(program: Program, steps: bool, folder: Path) -> float:
    """Seconds to lower ``program`` into ``folder`` with every graph cache empty."""
    os.environ["NEXUS_EXPORT_GRAPH_CACHE"] = str(folder / "graphs")
    onnx_export._EXPORTS = OrderedDict()
    torch_onnx_steps.STEPS = steps
    start = time.perf_counter()
    onnx_export.lower_to_onnx(program, folder / "model.onnx")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    setup_logging()
    if not torch_onnx_steps.STEPS:
        raise SystemExit("this torch lacks the exporter's steps: nothing to compare")
    program = Program.from_loaded(open_model(args.model))
    seconds: dict[str, list[float]] = {"public": [], "steps": []}
    for run in range(args.runs):
        for row in seconds:
            with tempfile.TemporaryDirectory(prefix="nexus-lowering-") as tmp:
                seconds[row].append(lower_once(program, row == "steps", Path(tmp)))
    torch_onnx_steps.STEPS = True
    base = statistics.median(seconds["public"])
    print(f"lowering {args.model} (both models, graph caches empty), median of {args.runs} runs, alternating")
    print("| exporter | median s | runs (s) | ratio |")
    print("|---|---:|---|---:|")
    for row, values in seconds.items():
        median = statistics.median(values)
        print(f"| {row} | {median:.1f} | {', '.join(f'{v:.1f}' for v in values)} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
