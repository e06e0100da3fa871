"""torch's ONNX exporter run in its steps, so that the two graphs of one lowering share the slowest step.

``torch.onnx.export(exported_program, dynamo=True)`` builds an operator registry for the opset (about 0.6 s), runs
the decompositions the registry asks for (a full retrace of the graph: about 2 s for a tiny two-block model, most of
an export), translates the decomposed graph to ONNX (0.1-0.2 s), converts the opset and renames inputs and outputs.
A lowering exports one graph twice: the cache model at opset 23 and the full-sequence model at opset 18. The
decompositions keep the operators the registry implements and decompose the others; opset 23 implements one more
(``aten.rms_norm``, as RMSNormalization), which a Hugging Face model's graph does not hold (its norms are written out
in elementwise ops). So ``Exporter`` decomposes once per graph when the implemented operators the graph calls are the
same at both opsets, and again when they are not; it keeps one registry per opset. The steps are torch's own private
functions, called in the order ``torch.onnx.export`` calls them (torch 2.13); ``STEPS`` is False where they are
missing, and ``Exporter.export`` then calls ``torch.onnx.export`` itself. tests/runtimes/test_torch_onnx_steps.py
checks that both give the same graph. Measured on SmolLM2-135M's two files: 36.9 s against 55.4 s
(bench/lowering_speed.py).
"""

from __future__ import annotations

import functools
import warnings
from typing import Sequence

import torch

try:
    from torch.onnx._internal._lazy_import import onnxscript_apis
    from torch.onnx._internal.exporter import _constants, _core, _decomp, _ir_passes, _registration
    STEPS = all(hasattr(_core, name) for name in ("_prepare_exported_program_for_export",
                                                   "_exported_program_to_onnx_program"))
except ImportError:  # another torch: the public export, step for step the same
    STEPS = False


@functools.lru_cache(maxsize=4)
def _registry(opset: int):
    """torch's registry of ONNX implementations for ``opset`` (built from torchlib at its own opset when lower)."""
    return _registration.ONNXRegistry.from_torchlib(opset_version=max(opset, _constants.TORCHLIB_OPSET))


class Exporter:
    """Exports of one graph at several opsets; the decomposed graph is kept between them (drop the exporter after)."""

    def __init__(self, exported: torch.export.ExportedProgram):
        self.exported = exported
        self._decomposed: tuple[frozenset, torch.export.ExportedProgram] | None = None

    def export(self, opset: int, input_names: Sequence[str], output_names: Sequence[str]) -> torch.onnx.ONNXProgram:
        """The ONNX program of the graph at ``opset``, its inputs and outputs named (``optimize=False``)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if not STEPS:
                return torch.onnx.export(self.exported, args=(), dynamo=True, input_names=list(input_names),
                                         output_names=list(output_names), opset_version=opset, optimize=False,
                                         verbose=False)
            registry = _registry(opset)
            program = _core._exported_program_to_onnx_program(self._decompose(registry), registry=registry)
        program.model = onnxscript_apis.convert_version(program.model, opset)
        _ir_passes.rename_inputs(program.model, list(input_names))
        _ir_passes.rename_outputs(program.model, list(output_names))
        return program

    def _decompose(self, registry) -> torch.export.ExportedProgram:
        called = {node.target for node in self.exported.graph.nodes if node.op == "call_function"}
        implemented = frozenset(called.intersection(_decomp.get_onnx_implemented_overloads(registry)))
        if self._decomposed is None or self._decomposed[0] != implemented:
            self._decomposed = None  # the previous one goes before the next is built
            self._decomposed = (implemented, _core._prepare_exported_program_for_export(self.exported,
                                                                                        registry=registry))
        return self._decomposed[1]

