"""Tracing settings that make every torch the project supports capture the same graph.

Graphs are traced with float32 meta weights and CPU example inputs (capture.py), and retraced the same way (graph
edits, decompositions for ONNX). torch 2.13 decides two things itself that torch 2.11 (the CUDA image of a lent GPU
machine) does not:
- an op mixing meta weights and CPU inputs computes on meta; 2.11 raises "Unhandled FakeTensor Device Propagation for
  aten.embedding.default, found two different devices meta, cpu" unless fake tensors prefer the meta device;
- a Hugging Face model's key/value-cache length, traced as a symbol, may be 0 or 1; 2.11 specializes it away from
  both (guards past != 0, past != 1: "Constraints violated (total_sequence)") unless sizes are size-oblivious;
- an op run on fake values of symbolic shape outside a trace (graph_edit.call) needs the Python dispatcher for its
  composite kernels; 2.11 otherwise raises "Cannot call numel() on tensor with symbolic sizes/strides".
``tracing()`` sets all three while a trace runs. On 2.13 the captured graphs are the same with and without them
(checked on seven families).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch._functorch.config as functorch_config
import torch.fx.experimental._config as fx_config
from torch._dispatch.python import enable_python_dispatcher


@contextmanager
def tracing() -> Iterator[None]:
    """Within the block, fake tensors of mixed devices compute on meta, backed sizes are size-oblivious (each where
    this torch has the setting) and the Python dispatcher is on."""
    with ExitStack() as stack:
        stack.enter_context(enable_python_dispatcher())
        if hasattr(functorch_config, "fake_tensor_prefer_device_type"):
            stack.enter_context(functorch_config.patch(fake_tensor_prefer_device_type="meta"))
        if hasattr(fx_config, "backed_size_oblivious"):
            stack.enter_context(fx_config.patch(backed_size_oblivious=True))
        yield
