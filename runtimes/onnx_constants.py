"""Constant weights of a lowered ONNX graph, whatever dtype they are stored in.

A float32 model reads its weights straight from initializers; a bfloat16 or float16 one stores each large weight in
that dtype behind a ``Cast`` to float32 (onnxruntime's CPU kernels compute in float32). The quantized writers
(``quantize.write_grids``, ``quantize_head``) replace the readers of such weights, so they need one view of both forms
and, once a weight has no reader left, to drop it with its Cast.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

FLOAT = onnx.TensorProto.FLOAT


def float_constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Every value of ``graph`` that is a constant float32 tensor, by value name -> the initializer holding it: the
    initializers themselves, and the float32 ``Cast`` of an initializer (a weight stored in a 16-bit dtype)."""
    inits = {t.name: t for t in graph.initializer}
    out = dict(inits)
    for node in graph.node:
        if node.op_type == "Cast" and node.input[0] in inits and \
                helper.get_attribute_value(next(a for a in node.attribute if a.name == "to")) == FLOAT:
            out[node.output[0]] = inits[node.input[0]]
    return out


def as_float32(values: np.ndarray) -> np.ndarray:
    """``values`` as float32 (bfloat16 arrays are ml_dtypes', which torch cannot take directly); float32 as it is."""
    return values if values.dtype == np.float32 else values.astype(np.float32)


def unit_roundoff(tensor: onnx.TensorProto) -> float:
    """The largest relative rounding error of storing a float32 value in ``tensor``'s dtype (0 for float32)."""
    significand = {onnx.TensorProto.BFLOAT16: 8, onnx.TensorProto.FLOAT16: 11}.get(tensor.data_type)
    return 0.0 if significand is None else 2.0 ** -significand


def drop_unread(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove the initializers in ``names`` that nothing reads any more, and first the Casts of them whose output
    nothing reads (a 16-bit weight's float32 copy whose reader was replaced)."""
    outputs = {o.name for o in graph.output}
    read = {name for node in graph.node for name in node.input} | outputs
    for node in [n for n in graph.node if n.op_type == "Cast" and n.input[0] in names and n.output[0] not in read]:
        graph.node.remove(node)
    read = {name for node in graph.node for name in node.input} | outputs
    for tensor in [t for t in graph.initializer if t.name in names and t.name not in read]:
        graph.initializer.remove(tensor)
