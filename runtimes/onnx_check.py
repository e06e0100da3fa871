"""Read an ONNX file's linear layers back: which weight, in what form, how sparse, and whether it meets N:M.

TensorRT uses 2:4 sparse tactics only for constant weights of MatMul/Gemm (and Conv) where every group of 4
consecutive elements along the reduction dim K has at least 2 zeros. For ``MatMul(X, B[K, N])`` the groups run
along B's rows; for ``Gemm`` with ``transB=1`` B is stored [N, K]. This module checks exactly that, per layer,
from the file (external data included), so a report can say which layers a 2:4 engine could use.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from nexus_export.errors import UserError
from nexus_export.naming import layer_name

log = logging.getLogger(__name__)

# Ops allowed between an initializer and the MatMul/Gemm that reads it; all are evaluated exactly here.
_PASS_THROUGH = ("Transpose", "Identity", "Cast")


@dataclass(frozen=True)
class OnnxLayer:
    """One MatMul/Gemm with a constant weight, described in its [K, N] (reduction, output channels) layout."""

    layer: str
    op: str
    weight: str
    form: str  # "constant": initializer on the op; "transposed": behind Transpose; "other": behind other ops
    k: int
    n: int
    sparsity: float
    nm_valid: bool | None  # None when no N:M pattern was asked for


def nm_groups_valid(weight_kn: np.ndarray, n: int, m: int, zeros_given: bool = False) -> bool:
    """True when every group of ``m`` consecutive entries along K (axis 0) of every column has >= ``n`` zeros.

    ``(2, 4)`` is TensorRT's 2:4 rule (as in Wanda/SparseGPT, N counts the zeroed weights per group of M).
    False when K is not a multiple of ``m``. Exact (``== 0``) and vectorized, so it is cheap on large models.
    ``zeros_given``: ``weight_kn`` already says where the zeros are (bool, True = zero).
    """
    if weight_kn.ndim != 2:
        raise ValueError(f"expected a [K, N] matrix, got shape {weight_kn.shape}")
    if not 0 <= n <= m or m < 1:
        raise UserError(f"N:M pattern {n}:{m} is invalid: expected 0 <= N <= M and M >= 1, e.g. 2:4")
    k, cols = weight_kn.shape
    if k % m:
        return False
    step = max(1, 2**24 // max(k, 1))  # columns at a time: the temporaries stay small for a 128k-vocabulary head
    for start in range(0, cols, step):
        chunk = weight_kn[:, start:start + step]
        chunk = chunk if zeros_given else chunk == 0
        zeros = chunk.reshape(k // m, m, chunk.shape[1]).sum(axis=1, dtype=np.int32)
        if not (zeros >= n).all():
            return False
    return True


def open_onnx(path: str | Path) -> onnx.ModelProto:
    """The ONNX model at ``path`` without its weights' data, after checking that it is an ONNX model with a graph and
    that every external data file it names is there and long enough; a UserError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no ONNX file at {path}: lower the model first or pass the path of a .onnx file")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes), not an ONNX model; lower the model again")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends for anything that is not ONNX
        raise UserError(f"{path} is not an ONNX model ({type(exc).__name__}); pass the .onnx file of a lowered "
                        "model") from None
    if not model.graph.node or not model.opset_import:
        raise UserError(f"{path} is not an ONNX model (it parses, but holds no graph); pass the .onnx file of a "
                        "lowered model")
    sizes: dict[str, int] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        name = info.get("location", "")
        data = path.parent / name
        if name not in sizes:
            if not data.is_file():
                raise UserError(f"{path.name} keeps its weights in {name}, which is missing next to it; copy it "
                                "there or lower the model again")
            sizes[name] = data.stat().st_size
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > sizes[name]:
            raise UserError(f"{data} is truncated: {tensor.name} needs bytes up to {end}, the file has "
                            f"{sizes[name]}; copy it again or lower the model again")
    return model


def inspect_onnx(path: str | Path, nm: tuple[int, int] | None = (2, 4)) -> list[OnnxLayer]:
    """Every MatMul/Gemm of the ONNX file at ``path`` whose B input is a (possibly transformed) initializer, and every
    MatMulNBits (quantized weights: zero where the code is the zero point)."""
    path = Path(path)
    model = open_onnx(path)
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    layers = []
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            layers.append(_describe_nbits(node, initializers, path.parent, nm))
            continue
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        traced = _trace_weight(node.input[1], initializers, producers)
        if traced is None:
            continue
        weight, chain = traced
        tensor = initializers[weight]
        if len(tensor.dims) != 2:
            continue
        transposed = _transposes(chain) ^ bool(node.op_type == "Gemm" and _attr(node, "transB", 0))
        layers.append(_describe(node.op_type, weight, _form(chain), tensor, path.parent, transposed, nm))
    log.info("inspected %s: %d linear layers", path.name, len(layers))
    return layers


def _trace_weight(
    name: str, initializers: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto]
) -> tuple[str, list[onnx.NodeProto]] | None:
    """Follow ``name`` back through pass-through ops to an initializer: (initializer, ops in data-flow order)."""
    chain: list[onnx.NodeProto] = []
    while name not in initializers:
        node = producers.get(name)
        if node is None or node.op_type not in _PASS_THROUGH:
            return None
        chain.insert(0, node)
        name = node.input[0]
    return name, chain


def _transposes(chain: list[onnx.NodeProto]) -> bool:
    """Whether the chain's transposes swap the two axes of a 2-D weight (casts are skipped: a zero stays a zero in
    every dtype)."""
    swapped = False
    for node in chain:
        if node.op_type == "Transpose":
            swapped ^= list(_attr(node, "perm", None) or [1, 0]) == [1, 0]
    return swapped


CHUNK_BYTES = 64 * 2**20  # the most of one weight's data read at once


def zero_chunks(tensor: onnx.TensorProto, base_dir: Path, multiple: int = 1) -> Iterator[np.ndarray]:
    """Where a 2-D initializer is exactly zero (+0 or -0), as bool arrays over consecutive rows of its stored layout,
    ``multiple`` rows or a multiple of them at a time. External data is read chunk by chunk (a 128k-vocabulary head
    is never in memory whole); floats are compared as bits with the sign masked, so bf16 and fp8 need no upcast."""
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    rows, cols = (int(d) for d in tensor.dims)
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        yield _is_zero(numpy_helper.to_array(tensor).reshape(rows, cols), np_dtype)
        return
    info = {entry.key: entry.value for entry in tensor.external_data}
    row_bytes = cols * np_dtype.itemsize
    step = max(multiple, CHUNK_BYTES // max(row_bytes, 1) // multiple * multiple)
    with open(base_dir / info["location"], "rb") as fh:
        for r0 in range(0, rows, step):
            count = min(step, rows - r0)
            fh.seek(int(info.get("offset", 0)) + r0 * row_bytes)
            raw = np.fromfile(fh, dtype=np_dtype, count=count * cols)
            yield _is_zero(raw.reshape(count, cols), np_dtype)


def _is_zero(values: np.ndarray, np_dtype: np.dtype) -> np.ndarray:
    if np_dtype.kind in "iub":
        return values == 0
    bits = values.view(f"u{np_dtype.itemsize}")
    return (bits & np.array((1 << (8 * np_dtype.itemsize - 1)) - 1, dtype=bits.dtype)) == 0  # all but the sign bit


def _form(chain: list[onnx.NodeProto]) -> str:
    if all(node.op_type == "Cast" for node in chain):
        return "constant"  # a weight stored in fp16/bf16 and cast: a constant every runtime folds
    if all(node.op_type in ("Transpose", "Identity") for node in chain):
        return "transposed"
    return "other"


def _attr(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _describe(op: str, weight: str, form: str, tensor: onnx.TensorProto, base_dir: Path, transposed: bool,
              nm: tuple[int, int] | None) -> OnnxLayer:
    """A weight's layer facts, read chunk by chunk: ``transposed`` when the op's reduction axis K is the stored
    layout's axis 1 (Transpose, Gemm transB), else axis 0."""
    rows, cols = (int(d) for d in tensor.dims)
    k, n = (cols, rows) if transposed else (rows, cols)
    m = nm[1] if nm else 1
    zeros, valid = 0, nm is not None and k % m == 0
    for chunk in zero_chunks(tensor, base_dir, multiple=1 if transposed else m):
        zeros += int(chunk.sum())
        if valid:
            valid = nm_groups_valid(chunk.T if transposed else chunk, *nm, zeros_given=True)
    return OnnxLayer(
        layer=layer_name(weight),
        op=op,
        weight=weight,
        form=form,
        k=k,
        n=n,
        sparsity=float(zeros / (k * n)) if k * n else 0.0,
        nm_valid=None if nm is None else bool(valid),
    )


def _describe_nbits(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto], base_dir: Path,
                    nm: tuple[int, int] | None) -> OnnxLayer:
    """A quantized layer's facts: a weight is zero where its code is the zero point (it dequantizes to exactly 0)."""
    from .quantize import nbits_codes, nbits_layer

    arrays = {name: numpy_helper.to_array(initializers[name], str(base_dir)) for name in node.input[1:4]
              if name in initializers}
    codes, zero, k, n = nbits_codes(node, arrays)
    zeros_kn = (codes == zero).reshape(n, -1)[:, :k].T
    valid = nm is not None and nm_groups_valid(zeros_kn, *nm, zeros_given=True)
    return OnnxLayer(layer=nbits_layer(node), op="MatMulNBits", weight=node.input[1], form="quantized", k=k, n=n,
                     sparsity=float(zeros_kn.mean()) if k * n else 0.0, nm_valid=None if nm is None else bool(valid))


def summarize(layers: list[OnnxLayer], targets: set[str] | None = None) -> dict:
    """Counts by op and form, overall sparsity (weighted by size), and N:M validity of the targeted layers.

    ``targets`` are the layer names a pruning pass targeted (None: every layer); ``all_nm_valid`` is about them.
    """
    total = sum(layer.k * layer.n for layer in layers)
    zeros = round(sum(layer.sparsity * layer.k * layer.n for layer in layers))
    targeted = [layer for layer in layers if targets is None or layer.layer in targets]
    checked = [layer for layer in targeted if layer.nm_valid is not None]
    return {
        "layers": len(layers),
        "by_op": dict(Counter(layer.op for layer in layers)),
        "by_form": dict(Counter(layer.form for layer in layers)),
        "parameters": total,
        "sparsity": zeros / total if total else 0.0,
        "targeted_layers": len(targeted),
        "nm_valid_layers": sum(1 for layer in checked if layer.nm_valid),
        "nm_invalid": [layer.layer for layer in checked if not layer.nm_valid],
        "all_nm_valid": bool(targeted) and len(checked) == len(targeted) and all(l.nm_valid for l in checked),
    }


def report_rows(layers: list[OnnxLayer], targets: set[str] | None = None) -> list[dict]:
    """Per-layer rows for report.json: layer, op, k, n, sparsity, nm_valid, form, targeted."""
    keys = ("layer", "op", "k", "n", "sparsity", "nm_valid", "form")
    return [{**{key: asdict(layer)[key] for key in keys}, "targeted": targets is None or layer.layer in targets}
            for layer in layers]
