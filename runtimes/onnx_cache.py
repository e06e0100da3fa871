"""The two ONNX models of one program: the key/value-cache model that generates and the full-sequence model that scores.

Lowering exports the program once. A program captured with its cache marked (nexus_export/graph/kv_cache.py) exports to a
graph that builds an empty past for every attention layer, concatenates it with the new keys and values, and computes
the positions itself; those values are exported as extra outputs named ``cache.*``, which is how they are found.

- ``to_cache_model`` makes those values the cache model's inputs and outputs: ``position_ids`` [batch, sequence],
  ``past_key_values.{i}.key`` / ``.value`` [batch, heads, past_sequence, head_dim] in, ``present.{i}.key`` /
  ``.value`` out, ``attention_mask`` [batch, total_sequence], i counting the remaining layers in order. One model
  serves the prompt (past_sequence 0) and every new token; this is what onnxruntime-genai and ``generate`` run.
- ``to_full_model`` turns a cache model back into ``(input_ids, attention_mask) -> logits``: the past inputs go (each
  concatenation becomes its new half), the positions are computed from the sequence length, the presents are no
  longer outputs. Weights are untouched, so both files read one external data file, and every variant (fp16, int4)
  made from a cache model gives its full-sequence twin the same way.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common

from nexus_export.errors import UserError
from nexus_export.graph.kv_cache import OUTPUT_PREFIX, POSITION_TAG

POSITION_IDS = "position_ids"
PAST = "past_key_values.{}.{}"
PRESENT = "present.{}.{}"
KINDS = ("key", "value")
BATCH, SEQUENCE, PAST_SEQUENCE, TOTAL = "batch", "sequence", "past_sequence", "total_sequence"


def to_cache_model(model: ir.Model) -> None:
    """Rewire a full-sequence export whose cache values are extra outputs (``cache.*``, see kv_cache.cache_outputs)
    into the key/value-cache model, in place."""
    graph = model.graph
    marked = {value.name: value for value in graph.outputs if value.name.startswith(OUTPUT_PREFIX)}
    graph.outputs[:] = [value for value in graph.outputs if value.name not in marked]
    position = marked.get(OUTPUT_PREFIX + POSITION_TAG)
    pairs = sum(1 for name in marked if name.startswith(OUTPUT_PREFIX + "past.") and name.endswith(".key"))
    if position is None or not pairs:
        raise UserError(f"the export has no key/value cache outputs ({sorted(marked)}); lower with --lower logits")
    inputs = [_replace_with_input(position, POSITION_IDS, ir.DataType.INT64, [BATCH, SEQUENCE])]
    outputs = []
    for i in range(pairs):
        for kind in KINDS:
            value = marked[f"{OUTPUT_PREFIX}past.{i}.{kind}"]
            dims = list(value.shape) if value.shape is not None else []
            if len(dims) != 4 or not all(isinstance(d, int) for d in (dims[1], dims[3])):
                raise UserError(f"the past {kind}s of cache layer {i} export with shape {dims}; expected "
                                "[batch, heads, past, head_dim] with fixed heads and head_dim")
            inputs.append(_replace_with_input(value, PAST.format(i, kind), value.dtype or ir.DataType.FLOAT,
                                              [BATCH, dims[1], PAST_SEQUENCE, dims[3]]))
            out = marked[f"{OUTPUT_PREFIX}present.{i}.{kind}"]
            out.name = PRESENT.format(i, kind)
            out.shape = ir.Shape([BATCH, dims[1], TOTAL, dims[3]])
            outputs.append(out)
    graph.inputs.extend(inputs)
    graph.outputs.extend(outputs)
    _input(graph, "attention_mask").shape = ir.Shape([BATCH, TOTAL])
    common.RemoveUnusedNodesPass()(model)


def to_full_model(model: ir.Model) -> None:
    """Turn a key/value-cache model (as ``to_cache_model`` made it) into the full-sequence model, in place."""
    graph = model.graph
    pasts = [value for value in graph.inputs if value.name.startswith("past_key_values.")]
    presents = {value.name for value in graph.outputs if value.name.startswith("present.")}
    graph.outputs[:] = [value for value in graph.outputs if value.name not in presents]
    for past in pasts:
        for use in list(past.uses()):
            node = use.node
            if node.op_type == "Concat" and len(node.inputs) == 2 and node.outputs[0].name in presents:
                new = node.inputs[1 - use.idx]
                ir.convenience.replace_all_uses_with(node.outputs[0], new)
                graph.remove(node, safe=True)
        if past.uses():  # read for its shape: an empty past it stays (its layer's new keys, none of them)
            raise UserError(f"{past.name} is read by {[u.node.op_type for u in past.uses()]} besides its "
                            "concatenation; the full-sequence model cannot be made from this cache model")
    positions = _input(graph, POSITION_IDS)
    _replace_input_with_range(graph, positions)
    graph.inputs[:] = [value for value in graph.inputs if value not in pasts and value is not positions]
    _input(graph, "attention_mask").shape = ir.Shape([BATCH, SEQUENCE])
    common.RemoveUnusedNodesPass()(model)


def is_cache_model(input_names: list[str]) -> bool:
    """Whether a model with these inputs is a key/value-cache model."""
    return any(name.startswith("past_key_values.") for name in input_names)


def _replace_with_input(value: ir.Value, name: str, dtype: ir.DataType, dims: list) -> ir.Value:
    new = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(dims))
    ir.convenience.replace_all_uses_with(value, new)
    return new


def _input(graph: ir.Graph, name: str) -> ir.Value:
    found = [value for value in graph.inputs if value.name == name]
    if not found:
        raise UserError(f"the model has no input {name!r} (inputs: {[v.name for v in graph.inputs]})")
    return found[0]


def _replace_input_with_range(graph: ir.Graph, positions: ir.Value) -> None:
    """Every use of the ``position_ids`` input reads ``0 .. sequence - 1`` for every row instead."""
    ids = _input(graph, "input_ids")
    zero = ir.Value(name="positions.start", const_value=ir.tensor(0, dtype=ir.DataType.INT64))
    one = ir.Value(name="positions.step", const_value=ir.tensor(1, dtype=ir.DataType.INT64))
    axes = ir.Value(name="positions.axes", const_value=ir.tensor([0], dtype=ir.DataType.INT64))
    for constant in (zero, one, axes):
        graph.register_initializer(constant)
    shape = ir.node("Shape", [ids], name="positions.shape")
    length = ir.node("Shape", [ids], attributes={"start": 1, "end": 2}, name="positions.length")
    scalar = ir.node("Squeeze", [length.outputs[0], axes], name="positions.scalar")
    ramp = ir.node("Range", [zero, scalar.outputs[0], one], name="positions.range")
    row = ir.node("Unsqueeze", [ramp.outputs[0], axes], name="positions.row")
    full = ir.node("Expand", [row.outputs[0], shape.outputs[0]], name="positions")
    nodes = [shape, length, scalar, ramp, row, full]
    for node in nodes:
        node.outputs[0].name = node.name
    full.outputs[0].dtype = ir.DataType.INT64
    full.outputs[0].shape = ir.Shape([BATCH, SEQUENCE])
    ir.convenience.replace_all_uses_with(positions, full.outputs[0])
    graph.insert_before(graph.node(0), nodes)
