"""Roles of every linear, read from the graph, for each supported tiny architecture."""

import pytest
import torch
from conftest import ARCHS, BlockStack, make_tiny

from nexus_export.errors import UserError
from nexus_export.graph.program import Program
from nexus_export.graph.structure import UnsupportedArchitecture

EXPECTED = {
    "llama": ("model.layers", {
        "self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
        "self_attn.o_proj": "attn_out", "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in",
        "mlp.down_proj": "mlp_out"}),
    "opt": ("model.decoder.layers", {
        "self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
        "self_attn.out_proj": "attn_out", "fc1": "mlp_in", "fc2": "mlp_out"}),
    "gpt2": ("transformer.h", {
        "attn.c_attn": "attn_in", "attn.c_proj": "attn_out", "mlp.c_fc": "mlp_in", "mlp.c_proj": "mlp_out"}),
}
EXPECTED["qwen2"] = EXPECTED["llama"]
EXPECTED["mistral"] = EXPECTED["llama"]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_linear_has_its_role(arch, tiny_program_factory):
    program = tiny_program_factory(arch)
    s = program.structure
    block_list, roles = EXPECTED[arch]
    expected = {f"{block_list}.{b}.{suffix}": (role, b) for b in range(2) for suffix, role in roles.items()}
    expected["lm_head"] = ("lm_head", None)
    assert {n: (l.role, l.block) for n, l in s.linears.items()} == expected
    assert s.block_list == block_list
    assert s.blocks == [f"{block_list}.0", f"{block_list}.1"]
    assert [sl.kind for sl in s.sublayers] == ["attention", "mlp", "attention", "mlp"]
    assert all(sl.norm for sl in s.sublayers) and s.final_norm


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_view_is_out_by_in(arch, tiny_program_factory):
    program = tiny_program_factory(arch)
    for lin in program.structure.linears.values():
        assert tuple(program.weight(lin.name).shape) == (lin.out_features, lin.in_features)
    gpt2_layout = {l.weight_layout for l in program.structure.in_blocks()}
    assert gpt2_layout == ({"in_out"} if arch == "gpt2" else {"out_in"})


def test_tied_embedding_detected(tiny_program_factory):
    assert tiny_program_factory("gpt2").structure.tied_embedding
    assert not tiny_program_factory("llama").structure.tied_embedding
    assert set(tiny_program_factory("gpt2").structure.embeddings) == {"transformer.wte", "transformer.wpe"}


def test_parameter_count_counts_tied_weights_once(tiny_program_factory):
    model = make_tiny("gpt2")
    program = tiny_program_factory("gpt2")
    assert program.num_parameters() == sum(p.numel() for p in model.parameters())


class ParallelBlock(torch.nn.Module):
    """GPT-J style: x + attn(ln(x)) + mlp(ln(x)); the stream cannot be split into sequential sublayers."""

    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(16)
        self.a = torch.nn.Linear(16, 16)
        self.m = torch.nn.Linear(16, 16)

    def forward(self, x):
        h = self.ln(x)
        return x + self.a(h) + self.m(h)


def test_unsupported_architecture_is_a_clear_error():
    with pytest.raises(UnsupportedArchitecture) as info:
        Program.from_model(BlockStack([ParallelBlock(), ParallelBlock()]))
    assert isinstance(info.value, UserError)
    assert "unsupported architecture" in str(info.value)


class NoHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)

    def forward(self, input_ids, attention_mask):
        return self.emb(input_ids)


def test_model_without_linears_is_rejected():
    with pytest.raises(UnsupportedArchitecture, match="no linear layers"):
        Program.from_model(NoHead())
