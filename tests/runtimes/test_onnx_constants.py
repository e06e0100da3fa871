"""Constant weights in either stored form: a float32 initializer, or a 16-bit one behind its Cast to float32."""

import numpy as np
import onnx
from onnx import helper, numpy_helper

from runtimes.onnx_constants import as_float32, drop_unread, float_constants, unit_roundoff


def graph():
    """x @ a (float32), x @ cast(b) (bfloat16 stored), cast(b) also read by an Add, cast(c) to float16 (not float)."""
    a = numpy_helper.from_array(np.ones((4, 4), np.float32), "a")
    b = helper.make_tensor("b", onnx.TensorProto.BFLOAT16, [4, 4], np.full(16, 0x3F80, np.uint16).tobytes(), raw=True)
    c = numpy_helper.from_array(np.ones((4, 4), np.float32), "c")
    nodes = [helper.make_node("Cast", ["b"], ["b.float"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Cast", ["c"], ["c.half"], to=onnx.TensorProto.FLOAT16),
             helper.make_node("MatMul", ["x", "a"], ["ya"]),
             helper.make_node("MatMul", ["x", "b.float"], ["yb"]),
             helper.make_node("Add", ["yb", "b.float"], ["y"])]
    return helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 4])],
                             [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 4])], [a, b, c])


def test_float_constants_see_through_a_cast_to_float32_only():
    g = graph()
    found = {value: tensor.name for value, tensor in float_constants(g).items()}
    assert found == {"a": "a", "b": "b", "c": "c", "b.float": "b"}  # c.half is not float32
    b = float_constants(g)["b.float"]
    assert unit_roundoff(b) == 2.0 ** -8 and unit_roundoff(float_constants(g)["a"]) == 0.0
    values = as_float32(numpy_helper.to_array(b))
    assert values.dtype == np.float32 and (values == 1.0).all()


def test_only_unread_weights_and_their_casts_are_dropped():
    g = graph()
    g.node.remove(next(n for n in g.node if n.output == ["yb"]))  # the MatMul replaced; the Add still reads b.float
    g.node.remove(next(n for n in g.node if n.output == ["ya"]))
    drop_unread(g, {"a", "b"})
    assert [t.name for t in g.initializer] == ["b", "c"] and [n.op_type for n in g.node] == ["Cast", "Cast", "Add"]
    g.node.remove(next(n for n in g.node if n.op_type == "Add"))
    drop_unread(g, {"b"})  # now nothing reads b's float copy: both go; c was not named, so it stays
    assert [t.name for t in g.initializer] == ["c"] and [n.output[0] for n in g.node] == ["c.half"]
