"""The token embedding and the lm_head on a low-bit grid, stored once when they are tied.

After the decoder's linears, the vocabulary-sized matrices are most of a small model's file (SmolLM2-135M: 28M of its
135M parameters, 108 MiB in float32, once, since its head is the embedding). ``quantize_head`` rounds them to
nearest on the quantization grid (each group's range searched, as GPTQ's clip search does) and writes the head as
MatMulNBits and the embedding lookup as GatherBlockQuantized. A tied pair reads one quantized tensor: the head's
[vocab, groups, bytes] codes, reshaped to [vocab, bytes] rows for the lookup, with one set of scales. Both operators
are onnxruntime's (com.microsoft), like MatMulNBits everywhere else in a quantized file.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from nexus_export.naming import layer_name
from passes.shared.quant_grid import Grid

from .onnx_constants import drop_unread, float_constants

log = logging.getLogger(__name__)

MS = "com.microsoft"


def quantize_head(model: onnx.ModelProto, grid: Grid, accuracy_level: int = 0,
                  read: Callable[[onnx.TensorProto], np.ndarray] = numpy_helper.to_array,
                  store: Callable[[np.ndarray, str], onnx.TensorProto] = numpy_helper.from_array) -> list[str]:
    """Put the lm_head and the token embedding of ``model`` (initializers, float32 or a 16-bit dtype behind a Cast)
    on ``grid`` in place; returns the layers quantized (none when the model has neither in a form this knows: a
    constant [vocab, width] table read by a Gather of ``input_ids``, and a MatMul by its transpose or by a constant
    [width, vocab] matrix). ``read`` gives an initializer's values (one whose data is in an external file: read from
    there, one matrix at a time); ``store`` makes an initializer of new values (``onnx_scratch.ScratchData.tensor``:
    written to a file, not held)."""
    graph = model.graph
    constants = float_constants(graph)
    producer = {out: node for node in graph.node for out in node.output}
    embedding = next((n for n in graph.node if n.op_type == "Gather" and n.input[0] in constants
                      and len(constants[n.input[0]].dims) == 2 and n.input[1] == "input_ids"), None)
    head, head_matrix, tied = _head(graph, constants, producer, embedding, read)
    done, drop = [], []
    grid = Grid(grid.bits, grid.group_size, sym=True, clip_search=True)
    if head is not None:
        rows = head_matrix if tied else head_matrix.T  # [vocab, width]: MatMulNBits' [N, K]
        name = constants[head.input[1] if not tied else embedding.input[0]].name  # the initializer's
        codes, scales = _quantized(rows, grid)
        q_name, s_name = f"{name}_Q{grid.bits}", f"{name}_scales"
        vocab, width = rows.shape
        rows = head_matrix = None  # a 128k vocabulary's matrix goes before the embedding's is read
        graph.initializer.extend([store(codes.reshape(vocab, width // grid.group_size, -1), q_name),
                                  store(scales, s_name)])
        _replace(graph, head, helper.make_node(
            "MatMulNBits", [head.input[0], q_name, s_name], list(head.output), name=f"{name}_MatMulNBits", domain=MS,
            K=width, N=vocab, bits=grid.bits, block_size=grid.group_size, accuracy_level=accuracy_level))
        drop.append(name)
        done.append(layer_name(name) + (" (head, tied)" if tied else " (head)"))
        if tied:
            transpose = producer[head.input[1]]
            graph.node.remove(transpose)
            rows_name = f"{name}_rows"
            shape = numpy_helper.from_array(np.array([vocab, codes.shape[1]], dtype=np.int64), f"{name}_rows_shape")
            graph.initializer.append(shape)
            graph.node.insert(0, helper.make_node("Reshape", [q_name, shape.name], [rows_name], name=f"{name}_rows"))
            _replace(graph, embedding, _lookup(embedding, rows_name, s_name, grid))
            embedding = None
    if embedding is not None:
        name = constants[embedding.input[0]].name
        codes, scales = _quantized(read(constants[name]), grid)
        graph.initializer.extend([store(codes, f"{name}_Q{grid.bits}"), store(scales, f"{name}_scales")])
        _replace(graph, embedding, _lookup(embedding, f"{name}_Q{grid.bits}", f"{name}_scales", grid))
        drop.append(name)
        done.append(layer_name(name) + " (embedding)")
    drop_unread(graph, set(drop))
    if done and not any(op.domain == MS for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS, 1))
    log.info("quantized to %d bits (groups of %d, round to nearest): %s", grid.bits, grid.group_size,
             ", ".join(done) or "nothing (no embedding table or head matrix found)")
    return done


def _head(graph, constants: dict, producer: dict, embedding, read: Callable) -> tuple:
    """(the head's MatMul node, its weight as [vocab, width] when tied else [width, vocab], tied) or (None, ...)."""
    vocab = _vocab(graph)
    for node in reversed(list(graph.node)):
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        weight = node.input[1]
        if weight in constants and len(constants[weight].dims) == 2 and constants[weight].dims[1] == vocab:
            return node, read(constants[weight]), False
        transpose = producer.get(weight)
        if (embedding is not None and transpose is not None and transpose.op_type == "Transpose"
                and transpose.input[0] == embedding.input[0]
                and _perm(transpose) in (None, [1, 0]) and constants[embedding.input[0]].dims[0] == vocab):
            return node, read(constants[embedding.input[0]]), True
    return None, None, False


def _vocab(graph) -> int | None:
    out = next((o for o in graph.output if o.name == "logits"), None)
    dims = out.type.tensor_type.shape.dim if out is not None else []
    return dims[-1].dim_value if dims and dims[-1].dim_value else None


def _perm(node) -> list[int] | None:
    for attr in node.attribute:
        if attr.name == "perm":
            return list(attr.ints)
    return None


def _quantized(rows: np.ndarray, grid: Grid, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Packed codes [rows, cols * bits / 8] (uint8; 4 bits: two a byte, low nibble first) and float32 scales
    [rows, cols / group] of ``rows`` on ``grid`` (symmetric: the zero point is the operators' default), ``chunk``
    rows at a time (the groups are independent; whole, a 128k vocabulary's temporaries are several GB each)."""
    n, cols = rows.shape
    codes = np.empty((n, cols * grid.bits // 8), dtype=np.uint8)
    scales = np.empty((n, cols // grid.group_size), dtype=np.float32)
    for i in range(0, n, chunk):
        w = torch.from_numpy(np.array(rows[i:i + chunk], dtype=np.float32))  # a chunk of its own (rows may be read-only)
        s, z = grid.group_params(w)
        part = grid.layer_codes(w, s, z).numpy()
        codes[i:i + chunk] = (part[:, 0::2] | (part[:, 1::2] << 4)) if grid.bits == 4 else part
        scales[i:i + chunk] = s.numpy()
    return codes, scales


def _lookup(gather, data: str, scales: str, grid: Grid):
    return helper.make_node("GatherBlockQuantized", [data, gather.input[1], scales], list(gather.output),
                            name=f"{gather.name or data}_GatherBlockQuantized", domain=MS, bits=grid.bits,
                            block_size=grid.group_size, gather_axis=0, quantize_axis=1)


def _replace(graph, old, new) -> None:
    """``new`` where ``old`` was in the node list (topological order kept)."""
    nodes = list(graph.node)
    index = nodes.index(old)
    graph.node.remove(old)
    graph.node.insert(index, new)
