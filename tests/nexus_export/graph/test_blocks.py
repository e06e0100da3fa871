"""The program cut at block boundaries: parts are functions of their own weights, with devices rewritten."""

import torch

from nexus_export.graph.blocks import cut_blocks, output_only, set_device


def test_prefix_and_blocks_are_separate_graphs_with_their_own_weights(tiny_program_factory):
    program = tiny_program_factory("llama")
    graphs = cut_blocks(program)
    assert len(graphs.blocks) == 2
    prefix_ops = {str(n.target) for n in graphs.prefix.module.graph.nodes if n.op == "call_function"}
    assert not any("linear" in op for op in prefix_ops)  # no block work in the prefix
    assert all(sum("linear" in str(n.target) for n in b.module.graph.nodes) == 7 for b in graphs.blocks)
    assert graphs.prefix.weights == ["lm.model.embed_tokens.weight", "lm.model.rotary_emb.inv_freq"]
    for k, block in enumerate(graphs.blocks):
        assert len(block.weights) == 9 and all(f".layers.{k}." in name for name in block.weights)
    assert graphs.suffix.weights == ["lm.model.norm.weight", "lm.lm_head.weight"]


def test_device_literals_are_rewritten(tiny_program_factory):
    graph = tiny_program_factory("llama").exported.graph
    devices = {str(v) for n in graph.nodes for v in list(n.args) + list(n.kwargs.values())
               if isinstance(v, torch.device)}
    assert devices  # the capture recorded where tensors were made
    part = cut_blocks(tiny_program_factory("llama"), "cpu").prefix
    found = {str(v) for n in part.module.graph.nodes for v in list(n.args) + list(n.kwargs.values())
             if isinstance(v, torch.device)}
    assert found == {"cpu"}
    set_device(part.module.graph, torch.device("meta"))
    assert {str(v) for n in part.module.graph.nodes for v in n.kwargs.values() if isinstance(v, torch.device)} \
        <= {"meta"}


def test_output_only_keeps_what_leads_to_one_output(tiny_program_factory):
    graphs = cut_blocks(tiny_program_factory("llama"))
    index = graphs.residuals[0]["attention"]
    cut = output_only(graphs.blocks[0], index)
    ops = [str(n.target) for n in cut.module.graph.nodes if n.op == "call_function"]
    assert sum("linear" in op for op in ops) == 4  # q, k, v, o: the MLP is gone
    assert cut.weights == graphs.blocks[0].weights
