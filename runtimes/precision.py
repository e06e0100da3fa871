"""fp16 weights: store an ONNX model's float32 weights as float16 (half the file), computing in float32 on the CPU.

Each large float32 initializer becomes float16 under its own name, followed by a Cast back to float32 that the
original readers now use, so onnxruntime's CPU kernels (mostly float32) run unchanged and the model is half the size.
GPU runtimes compute in fp16 themselves (TensorRT's FP16 flag). Exact zeros stay zero in float16.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_export import write_models

log = logging.getLogger(__name__)

MIN_ELEMENTS = 1024  # small tensors (norm scales, biases, constants) stay float32


def to_fp16_weights(src: str | Path, dst: str | Path, lower: str = "both") -> Path:
    """Write ``dst`` (+ external data): ``src`` with float32 weights of >= MIN_ELEMENTS stored as float16 (from a
    key/value-cache model: its cache twin too, as ``lower`` says; see onnx_export.write_models). Returns the first
    path written."""
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    graph = model.graph
    casts, converted = [], 0
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) < MIN_ELEMENTS:
            continue
        values = numpy_helper.to_array(init)
        half = numpy_helper.from_array(values.astype(np.float16), init.name)
        init.CopyFrom(half)
        restored = f"{init.name}.fp32"
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name == init.name:
                    node.input[i] = restored
        casts.append(helper.make_node("Cast", [init.name], [restored], to=onnx.TensorProto.FLOAT,
                                      name=f"cast_{init.name}"))
        converted += 1
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    written = write_models(model, dst, external_data=True, lower=lower)
    log.info("stored %d weights of %s as float16 in %s", converted, src.name, dst.name)
    return written[0]
