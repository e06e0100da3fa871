"""Tiny random models of every supported architecture, built from transformers config classes (no download)."""

from __future__ import annotations

import importlib.util
import os
import tempfile

import pytest
import torch
import transformers

ARCHS = ("llama", "qwen2", "mistral", "opt", "gpt2")
# Families whose blocks take other forms, tested in tests/nexus_export/models/test_architectures.py: Gemma's (1 + weight)
# norms, Gemma 2's post-sublayer norms and logit soft-capping, Gemma 3's and Qwen3's query/key norms, OLMo 2's norms
# after the sublayers only, Phi's and GPT-NeoX's parallel attention and MLP branches.
BLOCK_FORMS = {
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, sliding_window=32, final_logit_softcapping=30.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, sliding_window=32)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, tie_word_embeddings=False)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict()),
    "phi": ("PhiConfig", "PhiForCausalLM", dict()),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(use_parallel_residual=True)),
}


# lm-eval comes with the [eval] extra, which scripts/test.sh installs; elsewhere (a GPU machine's image) its tests skip
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed: pip install 'nexus-export[eval]'")


def archs(*names: str) -> list:
    """Architectures to parametrize over (all by default): LLaMA in the quick loop, the others marked slow."""
    return [name if name == "llama" else pytest.param(name, marks=pytest.mark.slow) for name in names or ARCHS]

# Dense perplexities cached by one run are read by the next (nexus_export/evaluation/eval_cache.py): each test process gets a
# fresh cache, so no result of an earlier session (or earlier code) is ever read.
os.environ["NEXUS_EXPORT_EVAL_CACHE"] = tempfile.mkdtemp(prefix="nexus-export-eval-cache-")
# ONNX graphs exported by one test are read by the next, across the workers of one run (xdist gives them one run id)
# but never from an earlier run: the export itself stays tested by every run.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
os.environ["NEXUS_EXPORT_GRAPH_CACHE"] = os.path.join(tempfile.gettempdir(), f"nexus-export-graphs-{_RUN}")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval's local test task reads a JSONL file: never the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):  # one process per core (scripts/test.sh runs -n auto): one thread each
    torch.set_num_threads(1)


def make_tiny(arch: str, layers: int = 2, seed: int = 0) -> transformers.PreTrainedModel:
    """A seeded tiny causal LM: hidden 64, 4 heads, vocab 300."""
    common = dict(vocab_size=300, max_position_embeddings=512)
    if arch in ("llama", "qwen2", "mistral"):
        config_cls, model_cls = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        }[arch]
        config = config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                            num_key_value_heads=2, tie_word_embeddings=False, **common)
    elif arch == "opt":
        config_cls, model_cls = transformers.OPTConfig, transformers.OPTForCausalLM
        config = config_cls(hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4,
                            word_embed_proj_dim=64, dropout=0.0, **common)
    elif arch == "gpt2":
        config_cls, model_cls = transformers.GPT2Config, transformers.GPT2LMHeadModel
        config = config_cls(n_embd=64, n_layer=layers, n_head=4, vocab_size=300, n_positions=512)
    elif arch in BLOCK_FORMS:
        config_cls, model_cls, extra = BLOCK_FORMS[arch]
        config = getattr(transformers, config_cls)(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                                   num_attention_heads=4, num_key_value_heads=2, bos_token_id=257,
                                                   eos_token_id=256, pad_token_id=256, **extra, **common)
        model_cls = getattr(transformers, model_cls)
    else:
        raise ValueError(arch)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.eval()


def with_random_norms(arch: str, layers: int = 2) -> torch.nn.Module:
    """A tiny model whose norms have non-trivial scales (and biases): fusing them then has something to fold."""
    model = make_tiny(arch, layers=layers)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if "Norm" in type(module).__name__ and getattr(module, "weight", None) is not None:
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=g))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
    return model


class BlockStack(torch.nn.Module):
    """A hand-made causal LM for structures no transformers family has: embedding, ``blocks`` in turn, head
    (vocabulary 50, width 16)."""

    def __init__(self, blocks: list[torch.nn.Module]):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.layers = torch.nn.ModuleList(blocks)
        self.head = torch.nn.Linear(16, 50)

    def forward(self, input_ids, attention_mask):
        x = self.emb(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def random_bases(n: int, width: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.linalg.qr(torch.randn(width, width, dtype=torch.float64, generator=g))[0] for _ in range(n)]


_CAPTURED: dict = {}


def tiny_program(arch: str = "llama", layers: int = 2, random_norms: bool = False):
    """A fork of a tiny program captured once per test process: each test prunes or slices its own fork (which never
    changes the captured one), and the capture (a second or two each) is paid once."""
    from nexus_export.graph.program import Program

    key = (arch, layers, random_norms)
    if key not in _CAPTURED:
        model = with_random_norms(arch, layers) if random_norms else make_tiny(arch, layers)
        _CAPTURED[key] = Program.from_model(model, name=f"tiny-{arch}")
    return _CAPTURED[key].fork()


@pytest.fixture(scope="session")
def tiny_program_factory():
    """``tiny_program`` as a fixture, for tests that take one per architecture."""
    return tiny_program


# The test files that take longest, first: pytest-xdist (--dist loadfile) hands files to its workers in collection
# order, so the long ones start at once and the short ones fill in at the end instead of one worker finishing a long
# file alone. Order only; every test still runs.
LONG_FIRST = ("test_distributed.py", "test_cli.py", "test_pipeline.py", "test_pruning.py", "test_architectures.py",
              "test_packaging.py", "test_sweep.py", "test_bos.py", "test_calibration.py", "test_bad_input.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))
