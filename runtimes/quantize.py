"""Prune, then quantize: block-wise weight-only quantization of an ONNX model's MatMul weights (MatMulNBits).

Two ways in, one format out (onnxruntime's MatMulNBits, 4 or 8 bits, a scale per block of K):
- ``quantize_onnx``: round to nearest (RTN), every constant MatMul weight, on the grid onnxruntime's own quantizer
  uses (the same weights it writes: tests/runtimes/test_quantize.py);
- ``write_grids``: the weights a GPTQ pass already put on its grids, written with that pass's scales and zero
  points (the ONNX weights must lie on them: exactly in float32, to within their rounding in bf16 or fp16, stored
  behind a Cast; the layers without a grid stay float).
Both read one weight at a time from the source's external data and write its codes to a scratch file as they are
made (onnx_scratch.py), so a model larger than memory can be quantized. Either grid holds zero exactly, so a weight
that pruning set to zero dequantizes to exactly zero: the sparsity survives quantization. Works on the ONNX that
lowering wrote (constant [K, N] weights on MatMul, float32 or behind a Cast from a 16-bit dtype).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import helper, numpy_helper

from nexus_export.errors import UserError
from nexus_export.naming import layer_name
from passes.shared.quant_grid import Grid

from .onnx_constants import as_float32, drop_unread, float_constants, unit_roundoff
from .onnx_export import write_models
from .onnx_scratch import ScratchData
from .quantize_head import quantize_head

log = logging.getLogger(__name__)

BITS = (4, 8)


def check_quantization(onnx_path: str | Path, bits: int, block_size: int) -> None:
    """Refuse bits other than 4/8 and a block size that does not divide a layer's reduction dimension (named)."""
    if bits not in BITS:
        raise UserError(f"quantization bits must be 4 or 8, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise UserError(f"block_size must be a power of two >= 16 (e.g. 32, 64, 128), got {block_size}")
    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            k = inits[node.input[1]].dims[0]
            if k % block_size:
                raise UserError(f"block_size {block_size} does not divide the reduction dimension {k} of "
                                f"{layer_name(node.input[1])}; choose a block size that divides it")


def quantize_onnx(src: str | Path, dst: str | Path, bits: int = 4, block_size: int = 32, sym: bool = True,
                  lower: str = "both", head: bool = False, accuracy_level: int = 0) -> Path:
    """Write ``dst`` (+ external data): ``src`` with every constant MatMul weight rounded to ``bits`` bits (a scale
    per block of ``block_size`` inputs; ``sym`` False adds a zero point per block), and with ``head`` the embedding
    and lm_head too (quantize_head.py, each group's range searched). ``accuracy_level``: MatMulNBits' (4: int8
    activations, onnxruntime's fastest on the CPU; 0: float32). From a key/value-cache model the cache twin is
    written too (see onnx_export.write_models); returns the first path written."""
    check_quantization(src, bits, block_size)
    grid = Grid(bits, block_size, sym)
    return _write_nbits(src, dst, grid, lambda layer, weight: grid.group_params(weight), None, lower, head,
                        accuracy_level, "rounded to nearest")


def dequantized_weights(path: str | Path) -> dict[str, np.ndarray]:
    """The [K, N] float weights that each MatMulNBits node of a quantized model computes with (for checks)."""
    model, base = load_graph(path)
    inits = {t.name: t for t in model.graph.initializer}
    return {nbits_layer(node): _dequantized(node, inits, base) for node in model.graph.node
            if node.op_type == "MatMulNBits"}


def load_graph(path: str | Path) -> tuple[onnx.ModelProto, Path]:
    """The model at ``path`` without its external data, and the folder its external data locations are relative to:
    a tensor is then read when it is needed (``initializer_array``), so a model larger than memory can be worked on
    one tensor at a time."""
    return onnx.load(str(path), load_external_data=False), Path(path).resolve().parent


def initializer_array(tensor: onnx.TensorProto, base: Path) -> np.ndarray:
    """The values of ``tensor``, read from its external data file under ``base`` when it has one (``tensor`` is not
    changed, so the model keeps pointing at that file)."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {entry.key: entry.value for entry in tensor.external_data}
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims, dtype=np.int64))
    array = np.fromfile(base / info["location"], dtype=dtype, count=count, offset=int(info.get("offset", 0)))
    if array.size != count:
        raise UserError(f"{base / info['location']} is truncated: {tensor.name} needs {count} values")
    return array.reshape(tuple(tensor.dims))


def _dequantized(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], base: Path) -> np.ndarray:
    """The [K, N] float weight one MatMulNBits node computes with, read from its initializers."""
    arrays = {name: initializer_array(inits[name], base) for name in node.input[1:] if name}
    codes, zero, k, n = nbits_codes(node, arrays)
    scales = arrays[node.input[2]].reshape(n, -1).astype(np.float32)
    return ((codes.astype(np.float32) - zero) * scales[:, :, None]).reshape(n, -1)[:, :k].T


def nbits_layer(node: onnx.NodeProto) -> str:
    """The layer a MatMulNBits node computes (its weight's name before quantization)."""
    return layer_name(node.input[1].split("_Q")[0])


def nbits_codes(node: onnx.NodeProto, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """A MatMulNBits node's codes [N, blocks, block] (uint8), zero points broadcastable to them, K and N."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    blocks = -(-k // block)
    codes = _unpack(arrays[node.input[1]].reshape(n, -1), bits)[:, : blocks * block].reshape(n, blocks, block)
    if len(node.input) > 3 and node.input[3]:
        zero = _unpack(arrays[node.input[3]].reshape(n, -1), bits)[:, :blocks][:, :, None]
    else:
        zero = np.full((1, 1, 1), 2 ** (bits - 1), dtype=np.uint8)
    return codes, zero, k, n


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes from MatMulNBits bytes (4 bits: two per byte, the low nibble first)."""
    if bits == 8:
        return packed
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits bytes from uint8 codes [rows, cols] (cols even for 4 bits)."""
    if bits == 8:
        return codes
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def write_grids(src: str | Path, dst: str | Path, grid: Grid,
                grids: dict[str, tuple[torch.Tensor, torch.Tensor]], lower: str = "both", head: bool = False,
                accuracy_level: int = 0) -> Path:
    """Write ``dst`` (+ external data): ``src`` with the MatMul of every layer in ``grids`` (name -> scales and zero
    points [N, K / group]) replaced by MatMulNBits holding its codes on those grids. Every layer must be found and its
    weight must lie on its grid (it does when the program's weights came from the GPTQ pass; a bf16 or fp16 weight,
    read through its Cast, to within that dtype's rounding). By default the file computes exactly the grid values in
    float32 (``head`` and ``accuracy_level`` as for ``quantize_onnx``)."""
    return _write_nbits(src, dst, grid, lambda layer, weight: grids[layer], set(grids), lower, head, accuracy_level,
                        "from their GPTQ grids")


def _write_nbits(src: str | Path, dst: str | Path, grid: Grid,
                 params: Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]], layers: set[str] | None,
                 lower: str, head: bool, accuracy_level: int, how: str) -> Path:
    """``src`` written at ``dst`` with the MatMul of each layer in ``layers`` (every constant [K, N] MatMul weight
    when None) as MatMulNBits on the grids ``params(layer, weight [N, K])`` gives. With ``layers`` given, each
    weight must already lie on its grid (it is checked, and a layer not found is refused). One weight is read at a
    time, and its codes go to a scratch file beside the source's data, not into memory."""
    src, dst = Path(src), Path(dst)
    start = time.perf_counter()
    model, base = load_graph(src)  # each weight is read when its node is written; the rest stays on disk
    graph = model.graph
    read = lambda tensor: initializer_array(tensor, base)  # noqa: E731
    done, nodes, replaced = set(), [], set()
    with ScratchData(base) as scratch:  # each layer's codes go to disk as they are made, not all held until saved
        if head:  # first: with every MatMul quantized below, the untied head would be found as one more
            quantize_head(model, grid, accuracy_level, read=read, store=scratch.tensor)
        constants = float_constants(graph)  # a 16-bit weight is read through its Cast to float32
        for node in graph.node:
            tensor = constants.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
            layer = layer_name(tensor.name) if tensor is not None else None
            if tensor is None or len(tensor.dims) != 2 or (layers is not None and layer not in layers):
                nodes.append(node)
                continue
            weight = torch.from_numpy(as_float32(read(tensor))).t()  # [N, K]
            roundoff = unit_roundoff(tensor) if layers is not None else None
            nodes.append(_nbits_node(node, weight, grid, *params(layer, weight), graph, layer, tensor.name,
                                     scratch.tensor, accuracy_level, roundoff))
            replaced.add(tensor.name)
            done.add(layer)
        missing = sorted(set(layers or ()) - done)
        if missing:
            raise UserError(f"{len(missing)} quantized layers have no constant MatMul weight in {src.name} (e.g. "
                            f"{missing[0]}); the lowering did not produce the expected form")
        del graph.node[:]
        graph.node.extend(nodes)
        drop_unread(graph, replaced)
        if not any(op.domain == "com.microsoft" for op in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        scratch.close()
        graph_ir = ir.serde.deserialize_model(model)
        ir.external_data.set_base_dir(graph_ir.graph, base)  # every tensor is copied from a file, one at a time
        written = write_models(graph_ir, dst, external_data=True, lower=lower)
        del graph_ir
    log.info("wrote %s: %d MatMulNBits layers %s (%d-bit, groups of %d) in %.1f s", dst.name, len(done), how,
             grid.bits, grid.group_size, time.perf_counter() - start)
    return written[0]


def _nbits_node(node, w: torch.Tensor, grid: Grid, scales: torch.Tensor, zeros: torch.Tensor, graph, layer: str,
                base: str, store: Callable[[np.ndarray, str], onnx.TensorProto], accuracy_level: int = 0,
                roundoff: float | None = 0.0, rows: int = 1024):
    """The MatMulNBits node (and its initializers, named after ``base``, made by ``store`` and added to ``graph``)
    for one MatMul whose weight ``w`` [N, K] lies on its grid, to within ``roundoff`` of each value (the relative
    rounding error of the 16-bit dtype it was stored in; 0 for float32; None: rounded to the grid, not checked);
    its codes are taken ``rows`` rows at a time (whole, their temporaries are several times the weight)."""
    n, k = w.shape
    scales, zeros = scales.float(), zeros.float()
    codes = torch.empty(n, k, dtype=torch.uint8)
    off = 0.0
    for i in range(0, n, rows):
        part = w[i:i + rows].float()
        codes[i:i + rows] = grid.layer_codes(part, scales[i:i + rows], zeros[i:i + rows])
        if roundoff is not None:
            exact = grid.dequantize(codes[i:i + rows], scales[i:i + rows], zeros[i:i + rows])
            off = max(off, float(((exact - part).abs() - roundoff * exact.abs()).max()))
    if off > 1e-6 * max(float(scales.abs().max()), 1e-12):
        raise UserError(f"the weight of {layer} is not on its quantization grid (off by {off:.3g}); was it changed "
                        "after the GPTQ pass?")
    blocks = k // grid.group_size
    packed = _pack(codes.numpy().reshape(n * blocks, grid.group_size), grid.bits).reshape(n, blocks, -1)
    tensors = [store(packed, f"{base}_Q{grid.bits}"), store(scales.numpy().reshape(-1), f"{base}_scales")]
    if not grid.sym:
        zp = zeros.numpy().astype(np.uint8)
        if grid.bits == 4 and zp.shape[1] % 2:
            zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
        tensors.append(store(_pack(zp, grid.bits).reshape(-1), f"{base}_zero_points"))
    graph.initializer.extend(tensors)
    return helper.make_node("MatMulNBits", [node.input[0], *(t.name for t in tensors)], list(node.output),
                            name=(node.name or base) + f"_Q{grid.bits}", domain="com.microsoft", K=k, N=n,
                            bits=grid.bits, block_size=grid.group_size, accuracy_level=accuracy_level)


def zeros_kept(original: str | Path, quantized: str | Path, targets: set[str] | None = None) -> bool:
    """Whether every weight that is exactly zero in ``original`` dequantizes to exactly zero in ``quantized``; False
    when no quantized layer could be matched to an original weight (nothing was checked)."""
    model, base = load_graph(original)  # one layer of each model in memory at a time
    constants = float_constants(model.graph)
    dense = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in constants:
            name = layer_name(constants[node.input[1]].name)
            if targets is None or name in targets:
                dense[name] = constants[node.input[1]]
    q_model, q_base = load_graph(quantized)
    q_inits = {t.name: t for t in q_model.graph.initializer}
    matched = [node for node in q_model.graph.node if node.op_type == "MatMulNBits" and nbits_layer(node) in dense]
    if not matched:
        log.warning("zeros kept: no quantized layer of %s matches a weight of %s; nothing checked", quantized,
                    original)
        return False
    return all(bool((_dequantized(node, q_inits, q_base)[initializer_array(dense[nbits_layer(node)], base) == 0] == 0)
                    .all()) for node in matched)
