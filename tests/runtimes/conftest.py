"""Tiny random causal LMs captured (nexus_export.Program) and lowered to ONNX once per test session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers

from nexus_export.graph.program import Program
from runtimes.onnx_export import lower_to_onnx

VOCAB = 300
# Decoder linear that gets only 1 zero per group of 4 (so it must fail the 2:4 check); all others get 2:4.
ONE_OF_FOUR_LAYER = "model.layers.1.mlp.down_proj"


def keep_largest(weight: torch.Tensor, keep: int, group: int) -> torch.Tensor:
    """Zero all but the ``keep`` largest |w| in every ``group`` consecutive inputs (torch weight [out, in], dim 1)."""
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // group, group)
    top = groups.abs().topk(keep, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return (groups * mask).reshape(out_features, in_features)


@dataclass
class Lowered:
    model: torch.nn.Module
    program: Program
    onnx_path: Path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Lowered:
    """A 2-layer LLaMA with 2:4 zeros in every decoder linear except ONE_OF_FOUR_LAYER (1 zero per 4), lowered."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=1024,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                keep = 3 if name == ONE_OF_FOUR_LAYER else 2
                module.weight.copy_(keep_largest(module.weight, keep, 4))
    program = Program.from_model(model)
    path = lower_to_onnx(program, tmp_path_factory.mktemp("llama") / "model.onnx")
    return Lowered(model, program, path)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Lowered:
    """A 2-layer GPT-2 (Conv1D weights [in, out], lm_head tied to the token embedding), lowered."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    program = Program.from_model(model)
    path = lower_to_onnx(program, tmp_path_factory.mktemp("gpt2") / "model.onnx")
    return Lowered(model, program, path)
