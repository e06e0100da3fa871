"""Capture: dynamic batch and sequence, and a clear error naming what torch.export rejected."""

import pytest
import torch

from conftest import make_tiny
from nexus_export.capture import capture
from nexus_export.errors import UserError


def test_captured_program_matches_eager_at_several_shapes():
    model = make_tiny("llama")
    exported = capture(model)
    module = exported.module()
    for batch, seq in ((1, 5), (3, 33)):
        ids = torch.randint(0, 300, (batch, seq), generator=torch.Generator().manual_seed(seq))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            eager = model(input_ids=ids, attention_mask=mask).logits
            captured = module(ids, mask)
        assert captured.shape == (batch, seq, 300)
        assert torch.allclose(eager, captured, atol=1e-5)


def test_attention_mask_is_an_input_that_matters():
    exported = capture(make_tiny("llama"))
    module = exported.module()
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
