"""Prune, then quantize: block-wise weight-only quantization of an ONNX model's MatMul weights (MatMulNBits).

4-bit or 8-bit, symmetric, so a weight that pruning set to zero is stored as the zero code and dequantizes to exactly
zero: the sparsity survives quantization. Works on the ONNX that lowering wrote (constant [K, N] weights on MatMul).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from nexus_export.errors import UserError
from nexus_export.naming import layer_name

from .onnx_export import write_checked

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


def quantize_onnx(src: str | Path, dst: str | Path, bits: int = 4, block_size: int = 32) -> Path:
    """Write ``dst`` (+ external data): ``src`` with every constant MatMul weight quantized to ``bits`` bits."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    src, dst = Path(src), Path(dst)
    check_quantization(src, bits, block_size)
    start = time.perf_counter()
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node at INFO
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, block_size=block_size, is_symmetric=True)
    quantizer.process()
    model = quantizer.model.model
    quantized = sum(1 for n in model.graph.node if n.op_type == "MatMulNBits")
    write_checked(model, dst, external_data=True)
    log.info("quantized %s to %d-bit (block %d): %d MatMulNBits layers in %.1f s", src.name, bits, block_size,
             quantized, time.perf_counter() - start)
    return dst


def dequantized_weights(path: str | Path) -> dict[str, np.ndarray]:
    """The [K, N] float weights that each MatMulNBits node of a quantized model computes with (for checks)."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
        packed = inits[node.input[1]].reshape(n, -1)
        scales = inits[node.input[2]].reshape(n, -1).astype(np.float32)
        if bits == 4:
            codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)
        else:
            codes = packed.reshape(n, -1)
        codes = codes[:, : scales.shape[1] * block].reshape(n, -1, block).astype(np.float32)
        zero = 2 ** (bits - 1)
        if len(node.input) > 3 and node.input[3]:
            raise UserError("asymmetric MatMulNBits weights are not expected here")
        w = ((codes - zero) * scales[:, :, None]).reshape(n, -1)[:, :k]
        out[layer_name(node.input[1].split("_Q")[0])] = w.T
    return out


def zeros_kept(original: str | Path, quantized: str | Path, targets: set[str] | None = None) -> bool:
    """Whether every weight that is exactly zero in ``original`` dequantizes to exactly zero in ``quantized``; False
    when no quantized layer could be matched to an original weight (nothing was checked)."""
    model = onnx.load(str(original))
    inits = {t.name: t for t in model.graph.initializer}
    dense = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            name = layer_name(node.input[1])
            if targets is None or name in targets:
                dense[name] = numpy_helper.to_array(inits[node.input[1]])
    deq = dequantized_weights(quantized)
    matched = [name for name in dense if name in deq]
    if not matched:
        log.warning("zeros kept: no quantized layer of %s matches a weight of %s; nothing checked", quantized,
                    original)
        return False
    return all(bool((deq[name][dense[name] == 0] == 0).all()) for name in matched)
