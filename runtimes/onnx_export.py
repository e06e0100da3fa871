"""Lower a captured program to ONNX: export, graph cleanup, checker, atomic write.

``torch.onnx.export(..., dynamo=True, optimize=False)`` keeps every parameter under its program name
(``lm.model.layers.0.mlp.down_proj.weight``) but puts a ``Transpose`` between a ``nn.Linear`` weight and its
``MatMul``. (With ``optimize=True`` the onnxscript optimizer folds those Transposes itself, but only for small
weights, and renames the folded constants ``val_<n>``, so weights could no longer be traced to layers.)
The cleanup here folds such ops into the initializer and keeps the parameter's name, so every MatMul/Gemm has a
constant weight directly on it, named after its layer: what TensorRT needs for 2:4 sparse tactics and what
``onnx_check`` needs to map weights back to layers.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from nexus_export.errors import UserError

log = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
DYNAMIC_AXES = ("batch", "sequence")
# Ops on a constant weight that cleanup folds into the initializer itself.
FOLDABLE_OPS = ("Transpose", "Identity")
PROTOBUF_LIMIT = 2**31 - 1
MIN_OPSET = 18  # the lowest opset torchlib implements; lower requests come back as 18 anyway


def lower_to_onnx(
    exported: torch.export.ExportedProgram, out_path: Path, opset: int = 18, external_data: bool = True
) -> Path:
    """Export ``exported`` to ONNX at ``out_path`` (plus ``<name>.data`` when ``external_data``) and return the path.

    Inputs are ``input_ids`` and ``attention_mask``, the output is ``logits``, with symbolic ``batch`` and
    ``sequence`` dims. Files appear at ``out_path`` only once complete and checked.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = _export(exported, opset)
    model = cleanup(model)
    write_checked(model, out_path, external_data)
    return out_path


def _export(exported: torch.export.ExportedProgram, opset: int) -> onnx.ModelProto:
    """torch.onnx.export of the ExportedProgram, with axes renamed to batch/sequence."""
    if opset < MIN_OPSET:
        raise UserError(f"opset {opset} is not supported: torch's ONNX exporter needs opset >= {MIN_OPSET}")
    start = time.perf_counter()
    # The exporter notes once per process that torchvision's ops are not registered: noise for a language model.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            exported,
            args=(),
            dynamo=True,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            optimize=False,
            verbose=False,
        )
    _name_dynamic_axes(program)
    model = program.model_proto
    actual = {entry.domain: entry.version for entry in model.opset_import}.get("", None)
    if actual != opset:
        raise UserError(f"the exporter produced opset {actual}, not the requested {opset}: lower with opset {actual}")
    log.info("onnx export: %d nodes, opset %d in %.1f s", len(model.graph.node), opset, time.perf_counter() - start)
    return model


def _name_dynamic_axes(program: torch.onnx.ONNXProgram) -> None:
    """Rename the exporter's symbols (``s43``, ``s53``) to ``batch`` and ``sequence``; fixed dims are an error."""
    inputs = program.model.graph.inputs
    if [value.name for value in inputs] != list(INPUT_NAMES):
        raise UserError(
            f"the program's inputs lower to {[v.name for v in inputs]}, expected {list(INPUT_NAMES)}: "
            "capture the model as forward(input_ids, attention_mask) -> logits"
        )
    mapping = {}
    for value in inputs:
        dims = list(value.shape)
        if len(dims) != 2 or any(isinstance(dim, int) for dim in dims):
            raise UserError(
                f"{value.name} lowers with shape {dims}, expected symbolic [batch, sequence]: "
                "capture the program with dynamic batch and sequence dims (torch.export Dim)"
            )
        mapping.update(zip(dims, DYNAMIC_AXES))
    program.rename_axes(mapping)


def cleanup(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold ops on constant weights into initializers (names kept), remove dead nodes, sort topologically."""
    start = time.perf_counter()
    graph = gs.import_onnx(model)
    graph.toposort()
    folded = fold_weight_ops(graph)
    graph.cleanup().toposort()
    cleaned = gs.export_onnx(graph)
    log.info(
        "cleanup: folded %d ops on weights, %d nodes left in %.1f s",
        folded,
        len(cleaned.graph.node),
        time.perf_counter() - start,
    )
    return cleaned


def fold_weight_ops(graph: gs.Graph) -> int:
    """Replace ``Transpose``/``Identity`` of an initializer by the initializer holding the result; return the count.

    The folded initializer keeps the parameter's name (the usual ``nn.Linear`` case: the Transpose was its only
    reader). A Transpose of a weight that other nodes also read (a tied embedding: Gather reads [vocab, hidden], the
    lm_head reads it transposed) is kept, so the matrix is stored once; onnx_check reports that layer as "transposed".
    ``graph`` must be topologically sorted so that chains fold in one sweep.
    """
    count = 0
    for node in list(graph.nodes):
        if node.op not in FOLDABLE_OPS or len(node.inputs) != 1 or len(node.outputs) != 1:
            continue
        source, result = node.inputs[0], node.outputs[0]
        if not isinstance(source, gs.Constant) or result in graph.outputs:
            continue
        if node.op == "Transpose" and len(source.outputs) > 1:
            continue
        if node.op == "Transpose":
            source.values = _apply(node.op, source.values, node.attrs.get("perm"))
        replacement = source
        for consumer in list(result.outputs):
            for index, tensor in enumerate(consumer.inputs):
                if tensor is result:
                    consumer.inputs[index] = replacement
        node.inputs.clear()
        node.outputs.clear()
        count += 1
    return count


def _apply(op: str, values: np.ndarray, perm: list[int] | None) -> np.ndarray:
    """The value of a foldable op on a constant."""
    if op == "Transpose":
        return np.ascontiguousarray(np.transpose(values, perm))
    return values



def write_checked(model: onnx.ModelProto, out_path: Path, external_data: bool) -> None:
    """Save into a temporary folder next to ``out_path``, run the checker, then move the files into place."""
    start = time.perf_counter()
    data_name = out_path.name + ".data"
    if not external_data and model.ByteSize() > PROTOBUF_LIMIT:
        raise UserError(f"{out_path.name} would exceed protobuf's 2 GB limit: lower it with external_data=True")
    tmp_dir = Path(tempfile.mkdtemp(prefix=".lower-", dir=out_path.parent))
    try:
        tmp_model = tmp_dir / out_path.name
        if external_data:
            onnx.save_model(
                model, tmp_model, save_as_external_data=True, all_tensors_to_one_file=True, location=data_name
            )
        else:
            onnx.save_model(model, tmp_model)
        saved = time.perf_counter()
        onnx.checker.check_model(str(tmp_model))
        if external_data:
            os.replace(tmp_dir / data_name, out_path.parent / data_name)
        elif (out_path.parent / data_name).exists():
            (out_path.parent / data_name).unlink()
        os.replace(tmp_model, out_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info(
        "saved %s%s: write %.1f s, checker %.1f s",
        out_path,
        f" (+ {data_name})" if external_data else "",
        saved - start,
        time.perf_counter() - saved,
    )
