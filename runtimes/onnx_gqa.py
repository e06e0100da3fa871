"""Grouped key/value heads, read as they are: ONNX's Attention operator (opset 23) takes fewer key/value heads than
query heads, so the copies that repeat each key/value head for its query heads can go.

A model with grouped-query attention (several query heads per key/value head) repeats the keys and values before
attention (``repeat_kv``: Unsqueeze, Expand, Reshape). Exported at opset 23, that attention is one Attention node,
which groups the heads itself: ``drop_repeated_heads`` feeds it the unrepeated keys and values. The result is the
same to the last bit (the same products in the same order); the cache model stops copying its whole cache a second
time at every step.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common

KEY, VALUE = 1, 2  # the Attention node's key and value inputs


def drop_repeated_heads(model: ir.Model) -> int:
    """Rewire every Attention node whose keys or values are a repeat of fewer heads to read those heads directly;
    returns the number of inputs rewired."""
    rewired = 0
    for node in list(model.graph):
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            continue
        for index in (KEY, VALUE):
            source = _repeated(node.inputs[index])
            if source is not None:
                node.replace_input_with(index, source)
                rewired += 1
    if rewired:
        common.RemoveUnusedNodesPass()(model)
    return rewired


def _repeated(value: ir.Value | None) -> ir.Value | None:
    """The [batch, kv_heads, sequence, head_dim] tensor that ``value`` repeats along the heads (Reshape of an Expand
    of an Unsqueeze at axis 2, through Identity), or None for anything else."""
    reshape = value.producer() if value is not None else None
    if reshape is None or reshape.op_type != "Reshape":
        return None
    expanded = reshape.inputs[0]
    expand = expanded.producer()
    while expand is not None and expand.op_type == "Identity":
        expanded = expand.inputs[0]
        expand = expanded.producer()
    if expand is None or expand.op_type != "Expand":
        return None
    unsqueeze = expand.inputs[0].producer()
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or len(unsqueeze.inputs) < 2:
        return None
    axes = _constant(unsqueeze.inputs[1])
    if axes is None or list(axes.reshape(-1)) != [2]:
        return None
    source = unsqueeze.inputs[0]
    shape = source.shape
    if shape is None or len(shape) != 4 or value.shape is None or len(value.shape) != 4:
        return None
    heads, repeated = shape[1], value.shape[1]
    if not isinstance(heads, int) or not isinstance(repeated, int) or repeated % heads:
        return None
    return source


def _constant(value: ir.Value):
    """The numpy value of an initializer or of a Constant node's output, or None."""
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].as_tensor().numpy()
    return None
