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


def nm_groups_valid(weight_kn: np.ndarray, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive entries along K (axis 0) of every column has >= ``n`` zeros.

    ``(2, 4)`` is TensorRT's 2:4 rule (as in Wanda/SparseGPT, N counts the zeroed weights per group of M).
    False when K is not a multiple of ``m``. Exact (``== 0``) and vectorized, so it is cheap on large models.
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
        chunk = weight_kn[:, start:start + step] == 0
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
    """Every MatMul/Gemm of the ONNX file at ``path`` whose B input is a (possibly transformed) initializer."""
    path = Path(path)
    model = open_onnx(path)
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    layers = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        traced = _trace_weight(node.input[1], initializers, producers)
        if traced is None:
            continue
        weight, chain = traced
        matrix = _apply_chain(numpy_helper.to_array(initializers[weight], base_dir=str(path.parent)), chain)
        if node.op_type == "Gemm" and _attr(node, "transB", 0):
            matrix = matrix.T
        if matrix.ndim != 2:
            continue
        layers.append(_describe(node.op_type, weight, _form(chain), matrix, nm))
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


def _apply_chain(values: np.ndarray, chain: list[onnx.NodeProto]) -> np.ndarray:
    """The weight's zero pattern as the MatMul/Gemm sees it: transposes applied (as views); casts skipped, since a
    zero stays a zero in every dtype and a bf16 head cast to float32 would double its memory."""
    for node in chain:
        if node.op_type == "Transpose":
            values = np.transpose(values, _attr(node, "perm", None))
    return values


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


def _describe(op: str, weight: str, form: str, matrix: np.ndarray, nm: tuple[int, int] | None) -> OnnxLayer:
    k, n = matrix.shape
    zeros = matrix.size - np.count_nonzero(matrix)
    return OnnxLayer(
        layer=layer_name(weight),
        op=op,
        weight=weight,
        form=form,
        k=int(k),
        n=int(n),
        sparsity=float(zeros / matrix.size) if matrix.size else 0.0,
        nm_valid=None if nm is None else nm_groups_valid(matrix, *nm),
    )


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
