"""Lower a program to ONNX without holding its weights: export the graph, fold weight transposes, stream the weights.

``torch.onnx.export(..., dynamo=True, optimize=False)`` runs on the program's graph, whose weights are meta tensors,
and gives an onnx_ir model whose initializers are named after the program's parameters
(``lm.model.layers.0.mlp.down_proj.weight``) and hold no data. Each initializer is then bound to a lazy tensor that
reads the weight from the program's store when the file is written, so the external data file is written one tensor
at a time and no full in-memory model (ModelProto or otherwise) ever exists.

On the way, a ``Transpose`` (or ``Identity``) whose only input is a weight read by nothing else is folded into that
weight, which keeps its name: every linear's MatMul/Gemm then has a constant weight directly on it, named after its
layer, which is what TensorRT needs for 2:4 sparse tactics and what ``onnx_check`` needs to map weights to layers. A
tied embedding read by two nodes keeps its Transpose, so the matrix is stored once.

Weights are written in the output dtype (by default the checkpoint's). The graph computes in float32 everywhere, so a
weight stored in float16 or bfloat16 is followed by a ``Cast`` to float32 (onnxruntime's CPU kernels are float32;
TensorRT folds the cast into its own precision choice).

A program captured with its key/value cache marked lowers to two files over one external data file (onnx_cache.py):
``model.kv.onnx``, the cache model that generates, and ``model.onnx``, the full-sequence model that scores
(``lower``: both, or only one of them).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import onnx
import onnx_ir as ir
import torch
from onnx_ir.passes import common

from nexus_export.errors import UserError
from nexus_export.graph.graph_edit import with_outputs
from nexus_export.graph.kv_cache import cache_layout, cache_outputs
from nexus_export.graph.program import Program
from nexus_export.memory import forget_last_trace
from nexus_export.outdir import file_mode
from nexus_export.run.recipe import LOWER, MIN_OPSET

from . import onnx_graph_cache, torch_onnx_steps
from .onnx_cache import is_cache_model, to_cache_model, to_full_model
from .onnx_gqa import drop_repeated_heads
from .torch_onnx_steps import Exporter

log = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
DYNAMIC_AXES = ("batch", "sequence")
FOLDABLE_OPS = ("Transpose", "Identity")  # ops on a constant weight folded into the initializer itself
PROTOBUF_LIMIT = 2**31 - 1
MIN_CAST_ELEMENTS = 1024  # smaller float tensors (norm scales, biases) stay float32
# The cache model's opset at least: its attention lowers to ONNX's Attention operator, which reads grouped key/value
# heads without copying them (on SmolLM2-135M, onnxruntime CPU: decode 45.3 tokens/s against 25.8 with opset 18's
# decomposed attention, in one run). The full-sequence model keeps the opset asked for (TensorRT's parser).
GENERATION_OPSET = 23
ONNX_DTYPES = {torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16,
               torch.bfloat16: ir.DataType.BFLOAT16}


def lower_to_onnx(program: Program, out_path: Path, opset: int = 18, external_data: bool = True,
                  dtype: torch.dtype | None = None, lower: str = "both") -> Path:
    """Export ``program`` to ONNX at ``out_path`` (plus ``<name>.data`` when ``external_data``) and return the path
    of the full-sequence model (of the cache model with ``lower="generate"``).

    The full-sequence model's inputs are ``input_ids`` and ``attention_mask``, its output ``logits``, with symbolic
    ``batch`` and ``sequence`` dims; a program with a marked cache also gives ``cache_path(out_path)`` (see
    onnx_cache.py). Large float weights are stored in ``dtype`` (None: each as the store holds it). Files appear
    only once complete and checked.
    """
    if lower not in LOWER:
        raise UserError(f"lower must be one of {', '.join(LOWER)}, got {lower!r}")
    layout = cache_layout(program.exported)
    if layout is None and lower == "generate":
        raise UserError(f"{program.name} was captured without a key/value cache (not a Hugging Face causal LM), so "
                        "it has no generation model: lower with --lower logits")
    out_path = Path(out_path)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write {out_path}: {exc.strerror or exc} ({out_path.parent}); choose another path") \
            from None
    if out_path.is_dir():
        raise UserError(f"{out_path} is a folder; give the path of the .onnx file to write")
    if layout is None:
        model = _lowered(program, Exporter(program.exported), opset, [], dtype)
        return write_models(model, out_path, external_data, "logits")[0]
    nodes, outputs = zip(*cache_outputs(layout))  # the cache's values leave the graph as extra outputs, named
    exporter = Exporter(with_outputs(program.exported, list(nodes)))  # one graph, decomposed once for both opsets
    cache = full = None
    if lower != "logits" or opset >= GENERATION_OPSET:
        cache = _lowered(program, exporter, max(opset, GENERATION_OPSET), list(outputs), dtype)
        to_cache_model(cache)
    if lower != "generate" and opset < GENERATION_OPSET:  # the full-sequence model keeps the opset asked for
        full = _lowered(program, exporter, opset, list(outputs), dtype)
        to_cache_model(full)
        to_full_model(full)
    del exporter  # its decomposed graph goes before the weights are written
    if cache is None:
        return write_models(full, out_path, external_data, "logits")[0]
    return write_models(cache, out_path, external_data, lower, full=full)[0]


def _lowered(program: Program, exporter: Exporter, opset: int, outputs: list[str], dtype: torch.dtype | None
             ) -> ir.Model:
    """The exporter's graph (the program's, or it with named extra outputs) as ONNX with the program's weights bound
    lazily in ``dtype``."""
    model = export_graph(exporter.exported, opset, outputs, exporter)
    folded = bind_weights(model, program, dtype)
    # the exporter's per-node metadata (stack traces, module paths) would be most of the file of a small model
    common.ClearMetadataAndDocStringPass()(model)
    common.RemoveUnusedNodesPass()(model)
    grouped = drop_repeated_heads(model)
    log.info("onnx (opset %d): folded %d transposes into weights, %d repeated key/value heads read as they are; %d "
             "nodes", opset, folded, grouped, len(model.graph))
    return model


def cache_path(path: str | Path) -> Path:
    """Where the key/value-cache twin of the full-sequence model ``path`` lives: model.onnx -> model.kv.onnx."""
    path = Path(path)
    return path.with_name(f"{path.stem}.kv{path.suffix}")


_EXPORTS: OrderedDict[str, ir.Model] = OrderedDict()  # graphs exported in this process, by graph_key
KEEP_EXPORTS = 2  # a lowering's two graphs (the two opsets): a masking run's dense model reuses both


def export_graph(exported: torch.export.ExportedProgram, opset: int, extra_outputs: list[str] = (),
                 exporter: Exporter | None = None) -> ir.Model:
    """torch.onnx.export of the program's graph (its weights are meta: nothing is computed or copied), with the
    dynamic axes named batch/sequence; outputs after the logits get the names ``extra_outputs``.

    The export depends only on the graph, not on the weights' values, and masking passes leave the graph as it was:
    a graph this process exported already (a sweep's next point, another masking run) is cloned from the last
    exports kept instead of exported again (seconds to tens of seconds saved per lowering), and one an earlier
    process exported is read from the graph cache on disk (onnx_graph_cache.py). An ``exporter`` of ``exported``
    shared by calls at several opsets decomposes the graph once (torch_onnx_steps.py)."""
    if opset < MIN_OPSET:
        raise UserError(f"opset {opset} is not supported: torch's ONNX exporter needs opset >= {MIN_OPSET}")
    key = graph_key(exported, opset) + ",".join(extra_outputs)
    if key in _EXPORTS:
        _EXPORTS.move_to_end(key)
        log.info("onnx export: the graph of an earlier lowering in this process, reused")
        return _independent_clone(_EXPORTS[key])
    stored_key = onnx_graph_cache.entry_key(key, [Path(__file__), Path(torch_onnx_steps.__file__)])
    model = onnx_graph_cache.load(stored_key)
    if model is not None:
        log.info("onnx export: the graph an earlier run exported, read from %s", onnx_graph_cache.folder())
    else:
        model = _export(exporter or Exporter(exported), opset, list(extra_outputs))
        onnx_graph_cache.save(stored_key, model)
    _EXPORTS[key] = _independent_clone(model)
    while len(_EXPORTS) > KEEP_EXPORTS:
        _EXPORTS.popitem(last=False)
    return model


def _independent_clone(model: ir.Model) -> ir.Model:
    """A clone that shares nothing mutable with ``model``: onnx_ir's clone shares each value's type object, so setting
    a dtype on a clone (binding bf16 weights) changed the kept export too, and the next lowering of the same graph in
    float32 declared its weights bf16 (found as the cache and full-sequence models disagreeing on a weight's dtype)."""
    clone = model.clone()
    values = [*clone.graph.inputs, *clone.graph.initializers.values(), *(o for n in clone.graph for o in n.outputs)]
    for value in values:
        if value.type is not None:
            value.type = copy.copy(value.type)
    return clone


def graph_key(exported: torch.export.ExportedProgram, opset: int) -> str:
    """What the exported ONNX graph depends on: the graph's code and signature, the dynamic dims, the inputs and
    outputs, every parameter's and constant's name, shape and dtype, and the values of those that are not meta (a
    buffer such as rotary frequencies can be written into the graph as it is)."""
    digest = hashlib.sha256()
    for part in (str(opset), exported.graph_module.code, str(exported.graph_signature),
                 str(exported.range_constraints), str(exported.call_spec)):
        digest.update(part.encode())
    for name, value in [*exported.state_dict.items(), *exported.constants.items()]:
        if isinstance(value, torch.Tensor):
            digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
            if value.device.type != "meta":
                digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(f"{name}:{type(value).__name__}".encode())
    return digest.hexdigest()


def _export(exporter: Exporter, opset: int, extra_outputs: list[str]) -> ir.Model:
    start = time.perf_counter()
    # The exporter notes once per process that torchvision's ops are not registered: noise for a language model.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    program = exporter.export(opset, INPUT_NAMES, [OUTPUT_NAME, *extra_outputs])
    forget_last_trace()  # the exporter's decomposed graph would otherwise outlive the lowering
    _name_dynamic_axes(program)
    model = program.model
    actual = model.opset_imports.get("")
    if actual != opset:
        raise UserError(f"the exporter produced opset {actual}, not the requested {opset}: lower with opset {actual}")
    log.info("onnx export: %d nodes, opset %d in %.1f s", len(model.graph), opset, time.perf_counter() - start)
    return model


def _name_dynamic_axes(program: torch.onnx.ONNXProgram) -> None:
    """Rename the exporter's symbols (``s43``, ``s53``) to ``batch`` and ``sequence`` (and ``total_sequence``, the
    mask's length, when the program was captured with a cache: past plus new tokens); fixed dims are an error."""
    inputs = program.model.graph.inputs
    if [value.name for value in inputs] != list(INPUT_NAMES):
        raise UserError(
            f"the program's inputs lower to {[v.name for v in inputs]}, expected {list(INPUT_NAMES)}: "
            "capture the model as forward(input_ids, attention_mask) -> logits"
        )
    mapping = {}
    for value, axes in zip(inputs, (DYNAMIC_AXES, (DYNAMIC_AXES[0], "total_sequence"))):
        dims = list(value.shape)
        if len(dims) != 2 or any(isinstance(dim, int) for dim in dims):
            raise UserError(
                f"{value.name} lowers with shape {dims}, expected symbolic [batch, sequence]: "
                "capture the program with dynamic batch and sequence dims (torch.export Dim)"
            )
        for dim, axis in zip(dims, axes):
            mapping.setdefault(dim, axis)
    program.rename_axes(mapping)


def bind_weights(model: ir.Model, program: Program, dtype: torch.dtype | None) -> int:
    """Fold single-use Transpose/Identity of weights into them, then bind every initializer the store holds to a lazy
    read in its output dtype (with a Cast to float32 after a non-float32 weight). Returns the number of folds."""
    graph = model.graph
    store = program.store
    perms: dict[str, list[int]] = {}
    folded = 0
    for node in list(graph):
        if node.op_type not in FOLDABLE_OPS or len(node.inputs) != 1 or len(node.outputs) != 1:
            continue
        source, result = node.inputs[0], node.outputs[0]
        if source is None or not source.is_initializer() or result.is_graph_output() or len(source.uses()) != 1:
            continue
        if node.op_type == "Transpose":
            perm = list(node.attributes["perm"].as_ints()) if "perm" in node.attributes else None
            perm = perm or list(reversed(range(len(source.shape))))
            base = perms.get(source.name, list(range(len(source.shape))))
            perms[source.name] = [base[p] for p in perm]
            source.shape = ir.Shape([source.shape[p] for p in perm])
        ir.convenience.replace_all_uses_with(result, source)
        graph.remove(node, safe=True)
        folded += 1
    casts = []
    for name, value in list(graph.initializers.items()):
        if name not in store:
            continue
        stored = store.stored_dtype(name)
        target = dtype if dtype is not None and stored.is_floating_point else stored
        if target.is_floating_point and (target == torch.float64 or math.prod(store.shape(name)) < MIN_CAST_ELEMENTS):
            target = torch.float32  # small tensors (norm scales, biases) stay in the graph's dtype
        value.const_value = _lazy(store, name, target, perms.get(name), value.shape)
        if target.is_floating_point and target != torch.float32:
            value.dtype = ONNX_DTYPES[target]
            casts.append(value)
    for value in casts:
        uses = list(value.uses())
        cast = ir.node("Cast", inputs=[value], attributes={"to": ir.DataType.FLOAT}, name=f"cast_{value.name}")
        cast.outputs[0].name = f"{value.name}.float"
        cast.outputs[0].dtype = ir.DataType.FLOAT
        cast.outputs[0].shape = value.shape
        for use in uses:
            use.node.replace_input_with(use.idx, cast.outputs[0])
        graph.insert_before(graph.node(0), cast)
    return folded


def _lazy(store, name: str, dtype: torch.dtype, perm: list[int] | None, shape: ir.Shape) -> ir.LazyTensor:
    """The weight ``name`` read from the store only when the file is written (permuted by ``perm``)."""
    def load() -> ir.Tensor:
        tensor = store.get(name, dtype)
        if perm is not None:
            tensor = tensor.permute(perm)
        return to_ir(tensor.contiguous(), name)

    onnx_dtype = ONNX_DTYPES.get(dtype) or ir.DataType.from_numpy(torch.empty((), dtype=dtype).numpy().dtype)
    return ir.LazyTensor(load, dtype=onnx_dtype, shape=ir.Shape(list(shape)), name=name)


def to_ir(tensor: torch.Tensor, name: str) -> ir.Tensor:
    """An onnx_ir tensor sharing the torch tensor's memory (bfloat16 through ml_dtypes)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return ir.Tensor(tensor.view(torch.uint16).numpy().view(ml_dtypes.bfloat16), name=name)
    return ir.Tensor(tensor.numpy(), name=name)


def write_models(model: ir.Model | onnx.ModelProto, out_path: Path, external_data: bool,
                 lower: str = "both", full: ir.Model | None = None) -> list[Path]:
    """Write ``model`` at ``out_path`` and return the paths written, the full-sequence model first.

    A key/value-cache model is written at ``cache_path(out_path)`` (``lower`` both or generate) and the full-sequence
    model at ``out_path`` (both or logits): ``full`` when given (the same weights, exported on its own), else the
    cache model turned back into it; both read one external data file, ``<out_path>.data``. Any other model is
    written at ``out_path``. Everything is saved in a temporary folder beside ``out_path`` (external data one tensor
    at a time), checked with the ONNX checker, then moved into place; files are readable like any other output (0644
    under the usual umask)."""
    start = time.perf_counter()
    out_path = Path(out_path)
    data_name = out_path.name + ".data"
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    if not external_data:
        size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
        if size > PROTOBUF_LIMIT:
            raise UserError(f"{out_path.name} would exceed protobuf's 2 GB limit: lower it with external_data=True")
    cached = is_cache_model([value.name for value in model.graph.inputs])
    tmp_dir = Path(tempfile.mkdtemp(prefix=".lower-", dir=out_path.parent))
    try:
        names = []
        if cached and lower in ("both", "generate"):
            kv = cache_path(out_path).name
            ir.save(model, tmp_dir / kv, external_data=data_name if external_data else None)
            names.append(kv)
            if lower == "both":  # the full-sequence model over the same external data (no tensor is written twice)
                written = ir.load(tmp_dir / kv)
                if full is None:
                    model = written
                else:
                    _share_initializers(full, written)
                    model = full
        if not cached or lower in ("both", "logits"):
            if cached and full is None:
                to_full_model(model)
            external = data_name if external_data and not (cached and lower == "both") else None
            ir.save(model, tmp_dir / out_path.name, external_data=external)
            names.insert(0, out_path.name)
        del model
        saved = time.perf_counter()
        for name in names:
            onnx.checker.check_model(str(tmp_dir / name))
        mode = file_mode()
        for path in tmp_dir.iterdir():
            os.chmod(path, mode)
        if external_data:
            os.replace(tmp_dir / data_name, out_path.parent / data_name)
        elif (out_path.parent / data_name).exists():
            (out_path.parent / data_name).unlink()
        for name in reversed(names):  # the full-sequence model last: its presence means the set is complete
            os.replace(tmp_dir / name, out_path.parent / name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info("saved %s%s: write %.1f s, checker %.1f s", ", ".join(names), f" (+ {data_name})" if external_data else "",
             saved - start, time.perf_counter() - saved)
    return [out_path.parent / name for name in names]


def _share_initializers(model: ir.Model, written: ir.Model) -> None:
    """Point every initializer of ``model`` at the tensor of the same name in ``written`` (a model just saved: its
    tensors are references into its external data file), so saving ``model`` writes no weight again."""
    saved = written.graph.initializers
    for name, value in model.graph.initializers.items():
        if name in saved and value.const_value is not None:
            if tuple(saved[name].shape) != tuple(value.shape) or saved[name].dtype != value.dtype:
                raise RuntimeError(f"initializer {name} differs between the two models ({value.shape} {value.dtype}, "
                                   f"{saved[name].shape} {saved[name].dtype})")
            value.const_value = saved[name].const_value
