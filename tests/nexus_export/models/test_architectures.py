"""Block forms beyond LLaMA's, on tiny random models of other families: what the structure reads, and every pass end
to end to onnxruntime or one named refusal. The README's architecture table is these tests' outcome."""

import copy

import pytest
import torch
import transformers
from conftest import ARCHS, BLOCK_FORMS, make_tiny, with_random_norms

from nexus_export.engine.pass_base import PassContext
from nexus_export.errors import UserError
from nexus_export.evaluation.evaluate import program_perplexity
from nexus_export.graph.program import Program
from nexus_export.graph.slicing import NormNotFusable, find_norms
from passes.magnitude import MagnitudePass
from passes.shared.sparsity import NMPattern, nm_valid
from passes.shortgpt import ShortGPTPass
from passes.slicegpt import SliceGPTPass
from passes.sparsegpt import SparseGPTPass
from passes.wanda import WandaPass
from runtimes import ort
from runtimes.onnx_export import lower_to_onnx

CALIB = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(11))
EVAL = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(12))

# what the structure reads per family: sublayer kinds, linears per role per block, post-sublayer norms, the ops after
# the lm_head, whether the head shares the embedding's matrix
EXPECTED = {
    "gemma": (["attention", "mlp"], (3, 1, 2, 1), 0, [], True),
    "gemma2": (["attention", "mlp"], (3, 1, 2, 1), 4, ["div", "tanh", "mul"], True),
    "gemma3": (["attention", "mlp"], (3, 1, 2, 1), 4, [], True),
    "qwen3": (["attention", "mlp"], (3, 1, 2, 1), 0, [], False),
    "olmo2": (["attention", "mlp"], (3, 1, 2, 1), 4, [], False),
    "phi": (["parallel"], (3, 1, 1, 1), 0, [], False),
    "gpt_neox": (["parallel"], (1, 1, 1, 1), 0, [], False),
}
POST_NORM_FAMILIES = {"gemma2": "model.layers.0.post_attention_layernorm",
                      "gemma3": "model.layers.0.post_attention_layernorm",
                      "olmo2": "model.layers.0.post_attention_layernorm"}


def forms() -> list:
    """Every family of BLOCK_FORMS: phi (parallel branches) in the quick loop, the others marked slow."""
    return [a if a == "phi" else pytest.param(a, marks=pytest.mark.slow) for a in BLOCK_FORMS]


_PROGRAMS: dict = {}


def program_of(arch: str) -> Program:
    """A fork of the tiny model of ``arch`` (random norm scales) captured once per test process."""
    if arch not in _PROGRAMS:
        _PROGRAMS[arch] = Program.from_model(with_random_norms(arch), name=f"tiny-{arch}")
    return _PROGRAMS[arch].fork()


def onnx_matches(program: Program, folder) -> float:
    """Lower ``program``, run it in onnxruntime, and return |ORT - PyTorch| / PyTorch perplexity on EVAL."""
    torch_ppl, _ = program_perplexity(program, EVAL)
    sess = ort.session(lower_to_onnx(program, folder / "model.onnx"))
    ort_ppl, _ = ort.perplexity(sess, EVAL)
    return abs(ort_ppl - torch_ppl) / torch_ppl


@pytest.mark.parametrize("arch", forms())
def test_the_structure_reads_every_block_form(arch):
    structure = program_of(arch).structure
    kinds, per_block, post_norms, head_ops, tied = EXPECTED[arch]
    summary = structure.summary()
    assert summary["sublayer_kinds"] == kinds
    assert tuple(summary["roles"][r] for r in ("attn_in", "attn_out", "mlp_in", "mlp_out")) == tuple(
        2 * n for n in per_block)
    assert summary["post_norms"] == post_norms and summary["head_postprocess"] == head_ops
    assert summary["tied_embedding"] == tied and summary["roles"]["lm_head"] == 1


@pytest.mark.parametrize("arch", forms())
def test_slicegpt_reads_every_norm_or_names_the_norm_in_the_way(arch):
    program = program_of(arch)
    if arch in POST_NORM_FAMILIES:
        with pytest.raises(NormNotFusable, match=f"{POST_NORM_FAMILIES[arch]} normalizes the output of block 0's "
                                                 "attention sublayer"):
            SliceGPTPass({"slicing": 0.25}).check(program)
        return
    # what these forms add to the fusion: (1 + weight) scales, one norm per parallel branch, q/k norms (slicing 0
    # keeping the function is checked in the chain below)
    assert len(find_norms(program, program.exported)) == 2 * (2 if arch != "phi" else 1) + 1


@pytest.mark.slow  # llama's chain runs in tests/passes/test_slicegpt.py and the CLI tests (SliceGPT, ShortGPT, 2:4)
@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "llama"] + list(BLOCK_FORMS))
def test_every_pass_runs_and_onnxruntime_matches(arch, tmp_path):
    """Each masking pass on the dense model (the five families of ARCHS: tests/passes, per family); then ShortGPT,
    SliceGPT (where the form allows it: at slicing 0 the function is kept, then 0.25) and SparseGPT 2:4 in one chain,
    lowered once: masking rewrites weights only (every masking result lowers through the graph checked here), and
    the chain's graph holds every structural rewrite."""
    model = with_random_norms(arch, layers=2)
    program = Program.from_model(model)
    ctx = PassContext(calibration_windows=CALIB)
    steps = {} if arch in ARCHS else {"magnitude 2:4": MagnitudePass({"sparsity": 0.5, "pattern": "2:4"}),
                                      "wanda 2:4": WandaPass({"sparsity": 0.5, "pattern": "2:4"}),
                                      "sparsegpt 0.5": SparseGPTPass({"sparsity": 0.5})}
    for label, step in steps.items():
        pruned = step.run(program.fork(), ctx).program
        for lin in pruned.structure.in_blocks():
            w = pruned.weight(lin.name)
            assert float(w.eq(0).float().mean()) == pytest.approx(0.5, abs=0.02), (label, lin.name)
            assert "2:4" not in label or nm_valid(w, NMPattern(2, 4)), (label, lin.name)
        assert pruned.exported.graph_module.code == program.exported.graph_module.code, label

    short = ShortGPTPass({"layers": "1"}).run(program, ctx).program
    reference = copy.deepcopy(model)  # the same model with the block deleted by hand
    del reference.get_submodule(program.structure.block_list)[1]
    with torch.no_grad():  # no cache: the remaining blocks keep their layer indices
        expected = reference(input_ids=EVAL, use_cache=False).logits
    assert torch.allclose(short.logits(EVAL), expected, atol=1e-5)
    assert len(short.structure.blocks) == 1
    chain = short
    if arch not in POST_NORM_FAMILIES:
        if arch in BLOCK_FORMS:  # every norm fused, the stream rotated (ARCHS: tests/nexus_export/graph/test_slicing.py)
            rotated = SliceGPTPass({"slicing": 0.0}).run(short, ctx).program
            assert float((rotated.logits(EVAL) - expected).abs().max() / expected.abs().max()) < 1e-5
        chain = SliceGPTPass({"slicing": 0.25}).run(chain, ctx).program
        assert all(chain.linear(n).in_features == 48 for s in chain.structure.sublayers for n in s.readers)
    chain = SparseGPTPass({"sparsity": 0.5, "pattern": "2:4"}).run(chain, ctx).program
    assert all(nm_valid(chain.weight(lin.name), NMPattern(2, 4)) for lin in chain.structure.in_blocks())
    assert onnx_matches(chain, tmp_path) < 1e-3


class SoftCapped(transformers.LlamaForCausalLM):
    """A LLaMA with Gemma 2's final logit soft-capping after its head."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = torch.tanh(out.logits / 3.0) * 3.0
        return out


@pytest.mark.slow
def test_the_head_is_sliced_and_its_post_processing_kept(tmp_path):
    base = with_random_norms("llama")
    model = SoftCapped(base.config)
    model.load_state_dict(base.state_dict())
    program = Program.from_model(model.eval())
    assert program.structure.head_postprocess == ("div", "tanh", "mul")
    sliced = SliceGPTPass({"slicing": 0.25}).run(program, PassContext(calibration_windows=CALIB)).program
    assert sliced.linear("lm_head").in_features == 48
    assert float(sliced.logits(EVAL).abs().max()) <= 3.0  # the capping is still there
    assert onnx_matches(sliced, tmp_path) < 1e-3


def test_a_head_the_structure_cannot_trace_is_named():
    class Cumulative(torch.nn.Module):  # logits summed along the vocabulary after the head: not elementwise
        def __init__(self):
            super().__init__()
            self.inner = make_tiny("llama")
            self.config = self.inner.config

        def forward(self, input_ids, attention_mask=None):
            logits = self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            return torch.cumsum(logits, dim=-1)

    with pytest.raises(UserError, match=r"meets cumsum .*not an elementwise post-processing op"):
        Program.from_model(Cumulative())


@pytest.mark.slow
def test_inspect_says_what_the_structure_read(tmp_path, capsys):
    from nexus_export.cli import main
    from nexus_export.models.zoo import byte_level_tokenizer

    make_tiny("gemma2").save_pretrained(tmp_path, safe_serialization=True)
    byte_level_tokenizer(512).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sublayers: attention, mlp; 4 with a norm after the sublayer (slicegpt refuses these); after the lm_head: " \
           "div, tanh, mul" in out
