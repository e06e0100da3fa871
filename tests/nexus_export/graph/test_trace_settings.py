"""The tracing settings: what capture and the graph edits rely on, on any supported torch (torch 2.11 refuses each of
these without them; 2.13 does them by itself)."""

import torch
import torch._functorch.config as functorch_config
import torch.fx.experimental._config as fx_config
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from nexus_export.graph.trace_settings import tracing


def test_the_settings_hold_inside_the_block_only():
    before = (functorch_config.fake_tensor_prefer_device_type, fx_config.backed_size_oblivious)
    with tracing():
        assert functorch_config.fake_tensor_prefer_device_type == "meta"
        assert fx_config.backed_size_oblivious is True
    assert (functorch_config.fake_tensor_prefer_device_type, fx_config.backed_size_oblivious) == before


def test_meta_weights_and_cpu_ids_compute_on_meta():
    mode = FakeTensorMode()
    weight = mode.from_tensor(torch.empty(10, 4, device="meta"))
    ids = mode.from_tensor(torch.zeros(2, 3, dtype=torch.long))
    with mode, tracing():
        out = torch.ops.aten.embedding.default(weight, ids)
    assert out.device.type == "meta" and tuple(out.shape) == (2, 3, 4)


def test_an_op_on_symbolic_fake_values_keeps_the_symbols():
    mode = FakeTensorMode(shape_env=ShapeEnv())
    dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.DYNAMIC, DimDynamic.STATIC])
    x = mode.from_tensor(torch.zeros(2, 16, 64), symbolic_context=dynamic)
    w = mode.from_tensor(torch.zeros(32, 64))
    with mode, tracing():
        out = torch.ops.aten.linear.default(x, w)
    assert isinstance(out.shape[0], torch.SymInt) and isinstance(out.shape[1], torch.SymInt) and out.shape[2] == 32
