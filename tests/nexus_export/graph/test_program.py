"""Program: built from a model in memory or from checkpoint shards, weights read and written through the store."""

import pytest
import torch
from conftest import archs, make_tiny, tiny_program

from nexus_export.errors import UserError
from nexus_export.graph.capture import parameters_on_meta
from nexus_export.graph.program import Program
from nexus_export.weights.shards import checkpoint_files, index_checkpoint


def saved(tmp_path, arch, dtype=torch.float32):
    model = make_tiny(arch)
    model.to(dtype).save_pretrained(tmp_path, safe_serialization=True)
    with parameters_on_meta():
        meta = type(model)(model.config)
    return model, meta, index_checkpoint(checkpoint_files(tmp_path))


@pytest.mark.parametrize("arch", archs("llama", "opt"))  # opt: a tied head stored once, under the embedding's name
def test_from_checkpoint_equals_the_model_in_memory(tmp_path, arch):
    model, meta, index = saved(tmp_path, arch)
    program = Program.from_checkpoint(meta, index)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert torch.allclose(program.logits(ids), expected, atol=1e-5)
    assert program.num_parameters() == sum(p.numel() for p in model.parameters())  # tied counted once


def test_checkpoint_dtype_is_kept_and_math_is_float32(tmp_path):
    model, meta, index = saved(tmp_path, "llama", torch.bfloat16)
    program = Program.from_checkpoint(meta, index)
    name = "model.layers.0.mlp.down_proj"
    assert program.main_dtype() == torch.bfloat16 and program.weight(name).dtype == torch.bfloat16
    assert program.weight(name, torch.float32).dtype == torch.float32
    program.set_weight(name, torch.zeros(64, 128))
    assert program.weight(name).dtype == torch.bfloat16  # written back in the checkpoint's dtype
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(0))
    assert program.logits(ids).dtype == torch.float32


def test_a_tensor_missing_from_the_checkpoint_is_named(tmp_path):
    model, meta, index = saved(tmp_path, "llama")
    del index["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(UserError, match="lack 1 tensor.*model.layers.1.mlp.up_proj.weight"):
        Program.from_checkpoint(meta, index)


def test_write_through_prunes_the_callers_model_in_place():
    model = make_tiny("llama")
    weight = model.get_submodule("model.layers.0.mlp.up_proj").weight
    Program.from_model(model).set_weight("model.layers.0.mlp.up_proj", torch.zeros(128, 64))
    assert float(weight.detach().abs().sum()) > 0  # by default the model is never changed
    Program.from_model(model, write_through=True).set_weight("model.layers.0.mlp.up_proj", torch.zeros(128, 64))
    assert float(weight.detach().abs().sum()) == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_materialize_in_half_precision_computes_the_linears_in_it(arch, dtype):
    """The float32-traced graph with half-precision weights: every linear reads its input in that dtype (as torch's
    2:4 kernels need) and the logits stay those of the float32 model to half precision."""
    program = tiny_program(arch)
    ids = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(0))
    module = program.materialize(dtype)
    weights = {n.target: n for n in module.graph.nodes if n.op == "get_attr"}
    block_weights = [weights[lin.weight] for lin in program.structure.in_blocks()]
    for weight in block_weights:  # every block linear multiplies a weight in dtype by an input cast to dtype
        assert module.get_parameter(weight.target).dtype == dtype
        (matmul,) = weight.users
        cast = [a for a in matmul.args if isinstance(a, torch.fx.Node) and a.op != "get_attr"]
        assert [(c.target, c.args[1]) for c in cast] == [(torch.ops.aten.to.dtype, dtype)]
    with torch.no_grad():
        half, full = module(ids, torch.ones_like(ids)), program.logits(ids)
    assert half.dtype == torch.float32
    assert float((half - full).abs().max()) < 0.02 * float(full.abs().max())
    assert float((half - full).abs().max()) > 0  # the linears really ran in half precision


def test_materialize_gives_the_whole_model_as_one_module():
    program = tiny_program("gpt2")
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    module = program.materialize()
    with torch.no_grad():
        assert torch.allclose(module(ids, torch.ones_like(ids)), program.logits(ids), atol=1e-5)
