"""torch_onnx_steps: torch's exporter in its steps gives the graph torch.onnx.export gives, at both opsets of a
lowering, decomposing once."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_program

from nexus_export.graph.graph_edit import with_outputs
from nexus_export.graph.kv_cache import cache_layout, cache_outputs
from runtimes import torch_onnx_steps
from runtimes.onnx_export import INPUT_NAMES, OUTPUT_NAME


def signature(model) -> list:
    """Every node (op, inputs, outputs, attributes), the inputs' and outputs' shapes and the opset."""
    nodes = [(n.op_type, n.domain, [v.name if v is not None else None for v in n.inputs], [v.name for v in n.outputs],
              sorted((k, str(a.value)) for k, a in n.attributes.items())) for n in model.graph]
    values = [(v.name, str(v.shape), v.dtype) for v in (*model.graph.inputs, *model.graph.outputs)]
    return [nodes, values, dict(model.opset_imports)]


def test_the_steps_are_torchs_available_ones():
    assert torch_onnx_steps.STEPS  # on the pinned torch the shared decomposition is what runs


@pytest.mark.slow
def test_both_opsets_give_torchs_own_export_and_decompose_once(monkeypatch):
    program = tiny_program("llama")
    nodes, outputs = zip(*cache_outputs(cache_layout(program.exported)))
    marked = with_outputs(program.exported, list(nodes))
    names = [OUTPUT_NAME, *outputs]
    calls, stepped_calls = [], []
    prepare = torch_onnx_steps._core._prepare_exported_program_for_export
    monkeypatch.setattr(torch_onnx_steps._core, "_prepare_exported_program_for_export",
                        lambda *a, **k: calls.append(1) or prepare(*a, **k))
    exporter = torch_onnx_steps.Exporter(marked)
    for opset in (23, 18):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            public = torch.onnx.export(marked, args=(), dynamo=True, input_names=list(INPUT_NAMES), output_names=names,
                                       opset_version=opset, optimize=False, verbose=False)
        before = len(calls)
        stepped = exporter.export(opset, INPUT_NAMES, names)
        stepped_calls.append(len(calls) - before)
        assert signature(stepped.model) == signature(public.model), opset
    assert stepped_calls == [1, 0]  # the first opset decomposes, the second reuses it


@pytest.mark.slow
def test_a_graph_whose_operators_differ_between_the_opsets_is_decomposed_for_each():
    """Opset 23 implements aten.rms_norm (RMSNormalization), opset 18 decomposes it: a graph calling it gets its
    own decomposition per opset, each the graph torch.onnx.export gives."""
    class Norm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.RMSNorm(8)

        def forward(self, x):
            return self.norm(x) * 2

    exported = torch.export.export(Norm(), (torch.randn(2, 8),))
    exporter = torch_onnx_steps.Exporter(exported)
    ops = {}
    for opset in (23, 18):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            public = torch.onnx.export(exported, args=(), dynamo=True, input_names=["x"], output_names=["y"],
                                       opset_version=opset, optimize=False, verbose=False)
        stepped = exporter.export(opset, ["x"], ["y"])
        assert signature(stepped.model) == signature(public.model), opset
        ops[opset] = {node.op_type for node in stepped.model.graph}
    assert "RMSNormalization" in ops[23] and "RMSNormalization" not in ops[18]
