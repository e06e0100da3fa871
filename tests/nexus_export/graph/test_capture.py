"""Capture: without weights, dynamic batch and sequence, and a clear error naming what torch.export rejected."""

import pytest
import torch
from conftest import make_tiny, tiny_program

from nexus_export.errors import UserError
from nexus_export.graph.capture import capture, parameters_on_meta
from nexus_export.graph.program import Program


def test_capture_holds_no_weights_and_leaves_the_model_as_it_was():
    model = make_tiny("llama").to(torch.bfloat16)
    before = {n: (p.data_ptr(), p.dtype) for n, p in model.named_parameters()}
    exported = capture(model)
    assert {t.device.type for t in exported.state_dict.values()} == {"meta"}
    assert {t.dtype for t in exported.state_dict.values()} == {torch.float32}  # the graph computes in float32
    assert {n: (p.data_ptr(), p.dtype) for n, p in model.named_parameters()} == before


def test_a_model_built_on_meta_captures_and_keeps_real_rotary_buffers():
    with parameters_on_meta():
        model = type(make_tiny("llama"))(make_tiny("llama").config)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert all(b.device.type == "cpu" for b in model.buffers())
    exported = capture(model)
    assert len(exported.state_dict) == len(list(model.parameters()))


def test_captured_program_matches_eager_at_several_shapes():
    model = make_tiny("llama")
    module = Program.from_model(model).module()
    for batch, seq in ((1, 5), (3, 33)):
        ids = torch.randint(0, 300, (batch, seq), generator=torch.Generator().manual_seed(seq))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            eager = model(input_ids=ids, attention_mask=mask).logits
            captured = module(ids, mask)
        assert captured.shape == (batch, seq, 300)
        assert torch.allclose(eager, captured, atol=1e-5)


def test_attention_mask_is_an_input_that_matters():
    module = tiny_program("llama").module()
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(1))
    full = module(ids, torch.ones_like(ids))
    left_padded = module(ids, torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]]))
    assert not torch.allclose(full[:, -1], left_padded[:, -1], atol=1e-4)


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(8, 50)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        if h.sum() > 0:  # Python control flow on a tensor value: torch.export cannot capture this
            h = h * 2
        return self.head(h)


def test_untraceable_model_names_the_failing_construct():
    with pytest.raises(UserError) as info:
        capture(DataDependent())
    message = str(info.value)
    assert "torch.export could not capture DataDependent" in message
    assert "test_capture.py" in message  # the user source line of the data-dependent branch


class CachedWrapper(torch.nn.Module):
    """A module around a transformers model that calls it with its KV cache on (the default)."""

    def __init__(self, use_cache: bool):
        super().__init__()
        self.inner, self.use_cache = make_tiny("llama"), use_cache

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=self.use_cache).logits


@pytest.mark.slow
def test_a_wrapper_that_builds_a_cache_while_traced_is_refused_with_the_fix():
    with pytest.raises(UserError, match=r"capturing CachedWrapper kept 4 tensor\(s\) computed while tracing "
                                        r"\(lm\.inner\.model\.layers\.0\.self_attn\.lifted_tensor_0.*use_cache=False"):
        capture(CachedWrapper(use_cache=True))
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(0))
    wrapper = CachedWrapper(use_cache=False)
    with torch.no_grad():
        assert torch.allclose(Program.from_model(wrapper).logits(ids), wrapper(ids), atol=1e-5)


def test_a_model_captured_again_reuses_the_graph_and_a_changed_one_does_not(caplog, monkeypatch):
    """The same architecture and config capture to the same graph whatever the weights: the second capture is a copy
    of the first (passes editing it leave the kept one alone); another config or depth is captured afresh."""
    from collections import OrderedDict

    import nexus_export.graph.capture as capture_module

    monkeypatch.setattr(capture_module, "_CAPTURES", OrderedDict())
    first = capture(make_tiny("llama", seed=0))
    with caplog.at_level("INFO", logger="nexus_export.graph.capture"):
        again = capture(make_tiny("llama", seed=1))
    assert any("reused" in r.message for r in caplog.records)
    assert again.graph_module.code == first.graph_module.code and again.graph is not first.graph
    again.graph.erase_node(next(iter(reversed(again.graph.nodes))))  # a pass editing its program's graph in place
    assert capture(make_tiny("llama")).graph_module.code == first.graph_module.code

    caplog.clear()
    with caplog.at_level("INFO", logger="nexus_export.graph.capture"):
        fewer = capture(make_tiny("llama", layers=1))
        model = make_tiny("llama")
        model.config.rope_theta = 500.0  # the rotary frequencies the graph keeps as constants differ ...
        model.model.rotary_emb.inv_freq.mul_(2.0)
        other = capture(model)
    assert not any("reused" in r.message for r in caplog.records)
    assert len(fewer.graph.nodes) < len(first.graph.nodes)
    inv = next(name for name in other.constants if "inv_freq" in name)
    assert not torch.equal(other.constants[inv], first.constants[inv])  # ... and so do the captured ones
