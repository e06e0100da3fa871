"""The calibration engine: its statistics equal a plain forward pass; stages; checkpoints and resume."""

import pytest
import torch
from conftest import make_tiny, tiny_program

from nexus_export.engine.calibration import collect, stages
from nexus_export.errors import UserError
from nexus_export.graph.program import Program
from nexus_export.graph.runner import BlockRunner


def windows(n=3, seq=12, seed=0):
    return torch.randint(0, 300, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_statistics_equal_a_plain_forward_pass():
    model = make_tiny("llama")
    program = Program.from_model(model)
    ids = windows(n=4, seq=16)
    seen = {}

    def hook(name):
        def record(module, args):
            seen.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
        return record

    names = ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    for h in handles:
        h.remove()

    runner = BlockRunner(program, ids, batch_size=3)
    runner.step(0)
    lins = [program.linear(n) for n in names] + [program.linear("model.layers.1.self_attn.k_proj")]
    stats = collect(runner, 1, lins, hessian=True)
    for name in names:
        x = torch.cat(seen[name])
        assert stats[name].tokens == 64
        assert torch.allclose(stats[name].column_norms(), x.pow(2).sum(0).sqrt(), rtol=1e-5)
        assert stats[name].hessian().dtype == torch.float64  # narrow inputs: float64 (LEAN_HESSIAN_WIDTH)
        assert torch.allclose(stats[name].hessian().double(), 2 / 64 * x.t() @ x, rtol=1e-4, atol=1e-6)
    # q, k and v read one tensor: one statistic, whose Hessian is scaled once however often it is read
    assert stats["model.layers.1.self_attn.q_proj"] is stats["model.layers.1.self_attn.k_proj"]
    x = torch.cat(seen["model.layers.1.self_attn.q_proj"])
    assert torch.allclose(stats["model.layers.1.self_attn.k_proj"].hessian().double(), 2 / 64 * x.t() @ x, rtol=1e-4,
                          atol=1e-6)


def test_true_sequential_stages_follow_the_sublayers(tiny_program_factory):
    program = tiny_program_factory("llama")
    names = [[lin.name.rsplit(".", 1)[-1] for lin in stage] for stage in stages(program, 0, True)]
    assert names == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    assert len(stages(program, 0, False)) == 1


def test_resume_after_interruption_gives_the_same_result(tmp_path, monkeypatch):
    from nexus_export.engine import calibration
    from nexus_export.engine.pass_base import PassContext
    from passes.sparsegpt import SparseGPTPass

    ids = windows(n=4, seq=16)

    def run(ctx):
        program = tiny_program("llama", layers=3)
        report = SparseGPTPass({"pattern": "2:4", "blocksize": 32}).run(program, ctx).report
        return program, report

    reference, ref_report = run(PassContext(calibration_windows=ids))
    held = reference.store.resident_bytes()  # the reference's pruned weights (forks of one program share a budget)
    checkpointed, _ = run(PassContext(calibration_windows=ids, checkpoint_dir=tmp_path / "whole"))
    assert held > 0 and checkpointed.store.resident_bytes() == held  # its own blocks are read from their checkpoint
    for name in reference.structure.linears:
        assert torch.equal(reference.weight(name), checkpointed.weight(name)), name

    real_step = BlockRunner.step

    def interrupted(self, k, visit=None):
        if k == 2:
            raise KeyboardInterrupt
        real_step(self, k, visit)

    monkeypatch.setattr(BlockRunner, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(PassContext(calibration_windows=ids, checkpoint_dir=tmp_path))
    monkeypatch.setattr(BlockRunner, "step", real_step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block_0.safetensors", "block_1.safetensors", "state.json",
                                                         "streams_1.safetensors"]  # the stream entering block 2

    calls = []
    real_collect = calibration.collect
    monkeypatch.setattr(calibration, "collect", lambda runner, k, *a, **kw: calls.append(k) or real_collect(runner, k, *a, **kw))
    resumed, report = run(PassContext(calibration_windows=ids, checkpoint_dir=tmp_path, resume=True))
    assert calls == [2]  # only the unfinished block is calibrated again
    for name in reference.structure.linears:
        assert torch.equal(reference.weight(name), resumed.weight(name)), name
    assert report.changes["per_layer"] == ref_report.changes["per_layer"]

    with pytest.raises(UserError, match="different model, pass or calibration set"):
        run(PassContext(calibration_windows=windows(n=4, seq=16, seed=9), checkpoint_dir=tmp_path, resume=True))


def test_a_damaged_checkpoint_is_a_user_error(tmp_path):
    from nexus_export.engine.calibration import Checkpoint

    checkpoint = Checkpoint(tmp_path, "f")
    checkpoint.save(0, {"w": torch.ones(2)}, [torch.zeros(3)], {})
    checkpoint.save(1, {"v": torch.ones(2)}, [torch.ones(3)], {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block_0.safetensors", "block_1.safetensors", "state.json",
                                                         "streams_1.safetensors"]
    resumed = checkpoint.load()
    assert resumed.next == 2 and resumed.notes == {"a": 1} and torch.equal(resumed.streams[0], torch.ones(3))
    assert sorted(name for name, _ in resumed.tensors()) == ["v", "w"]
    (tmp_path / "streams_1.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(UserError, match="streams_1.safetensors cannot be read"):
        checkpoint.load()
    (tmp_path / "block_0.safetensors").unlink()
    with pytest.raises(UserError, match="lacks block_0.safetensors"):
        checkpoint.load()
    (tmp_path / "state.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="is damaged"):
        checkpoint.load()


LONG_PASSES = [("wanda", {"pattern": "2:4"}), ("sparsegpt", {"sparsity": 0.5}),
               ("shortgpt", {"remove": 2}), ("shortgpt", {"remove": 2, "strategy": "gradient"}),
               ("slicegpt", {"slicing": 0.25})]


@pytest.mark.slow
@pytest.mark.parametrize("name, options", LONG_PASSES)
def test_every_long_pass_resumes_to_the_same_result(tmp_path, monkeypatch, name, options):
    """Interrupted right after its second checkpoint, resumed, each pass ends with the uninterrupted run's result."""
    from nexus_export.engine.calibration import Checkpoint
    from nexus_export.engine.pass_base import PassContext
    from nexus_export.registry import get_pass

    ids = windows(n=8, seq=16)  # gradient ranking checkpoints after each of its 4 batches of 2 windows

    def run(ctx):
        return get_pass(name)(options).run(tiny_program("llama", layers=4), ctx)

    reference = run(PassContext(calibration_windows=ids))
    real_save = Checkpoint.save

    def save_then_stop(self, k, *args):
        real_save(self, k, *args)
        if k == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(PassContext(calibration_windows=ids, checkpoint_dir=tmp_path))
    saved = []
    monkeypatch.setattr(Checkpoint, "save", lambda self, k, *args: saved.append(k) or real_save(self, k, *args))
    resumed = run(PassContext(calibration_windows=ids, checkpoint_dir=tmp_path, resume=True))
    assert saved[0] == 2  # it went on from the checkpoint, not from the start
    timing = ("ranking_s",)  # wall time differs from run to run
    assert {k: v for k, v in resumed.report.changes.items() if k not in timing} == \
        {k: v for k, v in reference.report.changes.items() if k not in timing}
    ref, got = reference.program, resumed.program
    assert got.weight_names() == ref.weight_names()
    for param in ref.weight_names():
        assert torch.equal(got.parameter(param), ref.parameter(param)), param


def test_a_wide_input_accumulates_its_hessian_in_float32(tiny_program_factory, monkeypatch):
    """Past LEAN_HESSIAN_WIDTH (0 here) X^T X is accumulated in float32 in place: the same matrix up to rounding."""
    import nexus_export.engine.calibration as calibration

    program = tiny_program_factory("llama")
    ids = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(0))
    lins = [program.linear("model.layers.0.mlp.down_proj")]
    runner = BlockRunner(program, ids, batch_size=3)
    narrow = collect(runner, 0, lins, hessian=True)[lins[0].name].hessian()
    monkeypatch.setattr(calibration, "LEAN_HESSIAN_WIDTH", 0)
    lean = collect(runner, 0, lins, hessian=True)[lins[0].name].hessian()
    assert narrow.dtype == torch.float64 and lean.dtype == torch.float32
    assert torch.allclose(lean.double(), narrow, rtol=1e-5, atol=1e-6 * float(narrow.abs().max()))


def test_a_hessian_handed_over_is_no_longer_the_statistics():
    """take_hessian gives the scaled Hessian away: the statistics hold no reference to it and refuse to give it
    again (a pass may have overwritten it with its factor); the column norms stay."""
    from nexus_export.engine.calibration import InputStats

    stats = InputStats(8, hessian=True)
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    stats.add(x)
    taken = stats.take_hessian()
    assert torch.allclose(taken, 2 / 20 * x.double().t() @ x.double(), rtol=1e-5, atol=1e-6)
    assert stats.xtx is None
    with pytest.raises(RuntimeError, match="handed over"):
        stats.hessian()
    assert torch.allclose(stats.column_norms(), x.double().norm(dim=0), rtol=1e-6)
