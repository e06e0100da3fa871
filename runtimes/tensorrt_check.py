"""Static TensorRT 2:4 check of an ONNX file: which linear layers a sparse engine could run with sparse tactics.

No TensorRT needed. A layer is *eligible* when its weight is a constant directly on the MatMul/Gemm (the form lowering
produces; a weight behind a Transpose is reported as such), its reduction dim K and output channels N are multiples of
4, and every group of 4 consecutive weights along K has at least 2 zeros. Eligible is not used: TensorRT picks a sparse
tactic only where it is faster, mostly for layers with >= 256 channels and larger batches; ``likely_sparse`` marks those.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .onnx_check import inspect_onnx

MIN_CHANNELS = 256


@dataclass(frozen=True)
class TrtLayer:
    layer: str
    op: str
    form: str
    k: int
    n: int
    sparsity: float
    groups_2_4: bool  # every group of 4 along K has >= 2 zeros
    k_multiple_of_4: bool
    n_multiple_of_4: bool
    eligible: bool
    likely_sparse: bool  # eligible and K, N >= MIN_CHANNELS
    reason: str  # why not eligible ("" when eligible)


def check_tensorrt(path: str | Path) -> list[TrtLayer]:
    """Every MatMul/Gemm with a constant weight in the ONNX file at ``path``, judged against TensorRT's 2:4 rules."""
    rows = []
    for layer in inspect_onnx(path, nm=(2, 4)):
        reasons = []
        if layer.form == "quantized":
            reasons.append("MatMulNBits (onnxruntime's weight-only int4/int8 op): TensorRT builds from the float "
                           "model.onnx")
        elif layer.form != "constant":
            reasons.append(f"weight is {layer.form}, not a constant on the op")
        if layer.k % 4:
            reasons.append(f"K={layer.k} is not a multiple of 4")
        if layer.n % 4:
            reasons.append(f"N={layer.n} is not a multiple of 4")
        if not layer.nm_valid:
            reasons.append("some groups of 4 along K have fewer than 2 zeros")
        eligible = not reasons
        rows.append(TrtLayer(
            layer=layer.layer, op=layer.op, form=layer.form, k=layer.k, n=layer.n, sparsity=layer.sparsity,
            groups_2_4=bool(layer.nm_valid), k_multiple_of_4=layer.k % 4 == 0, n_multiple_of_4=layer.n % 4 == 0,
            eligible=eligible, likely_sparse=eligible and min(layer.k, layer.n) >= MIN_CHANNELS,
            reason="; ".join(reasons),
        ))
    return rows


def summarize_tensorrt(rows: list[TrtLayer], targets: set[str] | None = None) -> dict:
    """Counts over all layers and over the targeted ones (None: all); ``targets_all_eligible`` is what --strict checks."""
    targeted = [r for r in rows if targets is None or r.layer in targets]
    return {
        "layers": len(rows),
        "eligible": sum(r.eligible for r in rows),
        "likely_sparse": sum(r.likely_sparse for r in rows),
        "targeted": len(targeted),
        "targeted_eligible": sum(r.eligible for r in targeted),
        "targeted_ineligible": [r.layer for r in targeted if not r.eligible],
        "targets_all_eligible": bool(targeted) and all(r.eligible for r in targeted),
    }


def rows_as_dicts(rows: list[TrtLayer]) -> list[dict]:
    return [asdict(r) for r in rows]
