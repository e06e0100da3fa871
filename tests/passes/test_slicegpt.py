"""SliceGPT: rotation-only invariance on every architecture, widths and schedules, PCA against random bases, ONNX and
onnxruntime, a masking pass after it, and bad input."""

import pytest
import torch
from conftest import archs, random_bases, tiny_program

from nexus_export.engine.pass_base import PassContext
from nexus_export.errors import UserError
from nexus_export.graph.slicing import fuse_norms, rotate_and_slice, with_projections
from nexus_export.metrics import next_token_nll, perplexity
from passes.shared.sparsity import NMPattern, nm_valid
from passes.slicegpt import SliceGPTPass, kept_width, pca_basis
from passes.sparsegpt import SparseGPTPass
from runtimes import ort
from runtimes.onnx_export import lower_to_onnx

CALIB = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(5))
IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(6))


def ctx(windows=CALIB):
    return PassContext(calibration_windows=windows)


_SLICED: dict = {}


def quarter_sliced(arch: str = "llama", random_norms: bool = False):
    """The dense program and the result of slicing it by 0.25 on CALIB, computed once per test process (a fork of the
    program each time, so a later pass never changes the cached one)."""
    key = (arch, random_norms)
    if key not in _SLICED:
        program = tiny_program(arch, random_norms=random_norms)
        _SLICED[key] = program, SliceGPTPass({"slicing": 0.25}).run(program, ctx())
    program, result = _SLICED[key]
    return program, result.program.fork(), result.report


@pytest.mark.parametrize("arch", archs("llama", "gpt2"))  # RMSNorm and LayerNorm; fusion and rotation of every
def test_rotation_only_keeps_logits(arch):  # family: tests/nexus_export/graph/test_slicing.py and test_architectures.py
    program = tiny_program(arch, random_norms=True)
    result = SliceGPTPass({"slicing": 0.0}).run(program, ctx())
    assert float((result.program.logits(IDS) - program.logits(IDS)).abs().max()) < 1e-4
    assert result.report.changes["widths"] == {"0": 64, "1": 64}
    assert result.report.changes["shortcut_parameters"] == 0  # nothing sliced: one basis, no shortcut


@pytest.mark.parametrize("arch", archs())
def test_quarter_slicing_on_every_architecture(arch):
    program, sliced, report = quarter_sliced(arch, random_norms=True)
    changes = report.changes
    assert changes["hidden_before"] == 64 and changes["embedding_width"] == 48
    assert changes["widths"] == {"0": 48, "1": 48}
    assert changes["shortcut_parameters"] == 4 * 48 * 48  # the stream's subspace changes at every residual add
    assert changes["head_untied"] == (arch in ("opt", "gpt2"))
    assert all(sliced.linear(n).in_features == 48 for s in sliced.structure.sublayers for n in s.readers)
    # the report counts what the program holds: shortcuts in, the norm scales folded away
    assert report.params_after == sliced.num_parameters() < program.num_parameters()
    logits = sliced.logits(IDS)
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_pca_beats_a_random_basis_on_the_calibration_text():
    program = tiny_program("llama", random_norms=True)
    windows = torch.randint(0, 300, (16, 32), generator=torch.Generator().manual_seed(7))
    pca = SliceGPTPass({"slicing": 0.5}).run(program, ctx(windows)).program
    fused = fuse_norms(program)
    _, matrices = with_projections(fused)
    random = rotate_and_slice(fused, [q[:, :32] for q in random_bases(len(matrices), 64)])

    dense = program.logits(windows)

    def error(p):  # how far the sliced model's logits are from the dense model's
        return float((p.logits(windows) - dense).norm() / dense.norm())

    with_pca, with_random = error(pca), error(random)
    assert with_pca < 0.6 * with_random


@pytest.mark.slow
def test_schedule_sets_block_widths():
    program = tiny_program("llama", layers=3)
    result = SliceGPTPass({"slicing": 0.25, "schedule": {"layer_1-2": 0.5}}).run(program, ctx())
    assert result.report.changes["widths"] == {"0": 48, "1": 32, "2": 32}
    readers = {sub.block: result.program.linear(sub.readers[0]).in_features
               for sub in result.program.structure.sublayers if sub.kind == "mlp"}
    assert readers == {0: 48, 1: 32, 2: 32}


def test_kept_width_rounds_down():
    assert kept_width(576, 0.25, 8) == 432
    assert kept_width(576, 0.0, 8) == 576
    assert kept_width(100, 0.25, 8) == 72
    assert kept_width(100, 0.25, 1) == 75


def test_pca_basis_orders_by_variance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 3, dtype=torch.float64, generator=g) * torch.tensor([1.0, 5.0, 0.1], dtype=torch.float64)
    q = pca_basis(x.t() @ x, 0.01)
    assert torch.allclose(q.t() @ q, torch.eye(3, dtype=torch.float64), atol=1e-10)
    assert [int(i) for i in q.abs().argmax(dim=0)] == [1, 0, 2]


@pytest.mark.slow
@pytest.mark.parametrize("arch", archs("llama", "gpt2"))
def test_sliced_onnx_runs_in_onnxruntime(arch, tmp_path):
    _, sliced, _ = quarter_sliced(arch, random_norms=True)
    path = lower_to_onnx(sliced, tmp_path / "model.onnx")
    windows = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(8))
    torch_ppl = perplexity(*next_token_nll(sliced.logits(windows), windows))
    onnx_ppl, _ = ort.perplexity(ort.session(path), windows)
    assert abs(onnx_ppl - torch_ppl) / torch_ppl < 1e-3


@pytest.mark.slow
def test_masking_pass_after_slicing_gives_valid_two_four():
    _, sliced, _ = quarter_sliced()
    pruned = SparseGPTPass({"pattern": "2:4"}).run(sliced, ctx()).program
    for lin in pruned.structure.in_blocks():
        assert nm_valid(pruned.weight(lin.name), NMPattern(2, 4)), lin.name
    shortcuts = [lin for lin in pruned.structure.linears.values() if lin.role == "shortcut"]
    assert shortcuts and all(float((pruned.weight(s.name) == 0).float().mean()) < 0.01 for s in shortcuts)
    assert torch.isfinite(pruned.logits(IDS)).all()


@pytest.mark.parametrize("options, message", [
    ({"slicing": 1.0}, "slicing must be a fraction in"),
    ({"slicing": -0.1}, "slicing must be a fraction in"),
    ({"slicing": 0.25, "schedule": {"mlp_out": 0.3}}, "is not a block range"),
    ({"slicing": 0.25, "schedule": {"layer_0": 1.5}}, "schedule value for 'layer_0'"),
])
def test_bad_options(options, message):
    with pytest.raises(UserError, match=message):
        SliceGPTPass(options)


def test_bad_input_for_the_model():
    program = tiny_program("llama")
    with pytest.raises(UserError, match="leaves no dimension"):
        SliceGPTPass({"slicing": 0.9}).run(program, ctx())  # floor(0.1 * 64) = 6 -> 0 at multiples of 8
    with pytest.raises(UserError, match="names blocks outside 0-1"):
        SliceGPTPass({"schedule": {"layer_0-5": 0.3}}).run(program, ctx())
    too_few = r"at least as many calibration tokens as the hidden width \(64\) for a stable PCA, got 32"
    with pytest.raises(UserError, match=too_few):
        SliceGPTPass({"slicing": 0.25}).run(program, ctx(CALIB[:1]))
    with pytest.raises(UserError, match="already sliced"):
        SliceGPTPass({"slicing": 0.25}).run(quarter_sliced()[1], ctx())


def test_shortgpt_after_slicing_is_refused():
    from passes.shortgpt import ShortGPTPass

    with pytest.raises(UserError, match="put shortgpt before slicegpt"):
        ShortGPTPass({"remove": 1}).run(quarter_sliced()[1], ctx())
