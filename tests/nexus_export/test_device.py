"""The device: the same program run on a CUDA GPU gives the CPU's masks and perplexity (skipped, with the reason,
where torch sees no GPU). The device logic itself (weights moved per block, statistics on the device) runs on the
CPU in every other test."""

import pytest
import torch
from conftest import tiny_program

from nexus_export.engine.pass_base import PassContext
from nexus_export.evaluation.evaluate import program_perplexity
from nexus_export.graph.program import Program
from nexus_export.graph.runner import BlockRunner
from nexus_export.registry import get_pass

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=f"needs a CUDA GPU; torch {torch.__version__} sees none")
WINDOWS = torch.randint(0, 300, (8, 48), generator=torch.Generator().manual_seed(0))


def pruned(device: str, method: str, options: dict) -> Program:
    program = tiny_program("llama", layers=3)
    program.device = device
    return get_pass(method)(options).run(program, PassContext(calibration_windows=WINDOWS)).program


def test_an_explicit_cpu_device_runs_everything_there():
    program = tiny_program("llama")
    runner = BlockRunner(program, WINDOWS, 4, device="cpu")
    runner.run_blocks()
    assert {s.device.type for s in runner.streams()} == {"cpu"}


@cuda
@pytest.mark.parametrize("method, options", [("sparsegpt", {"pattern": "2:4"}), ("wanda", {"sparsity": 0.5})])
def test_masks_and_perplexity_on_cuda_match_the_cpu(method, options):
    cpu, gpu = pruned("cpu", method, options), pruned("cuda", method, options)
    same = total = 0
    for lin in cpu.structure.in_blocks():
        a, b = cpu.weight(lin.name) == 0, gpu.weight(lin.name) == 0
        same, total = same + int((a == b).sum()), total + a.numel()
    assert same / total >= 0.999
    p_cpu, _ = program_perplexity(cpu, WINDOWS, 2)
    p_gpu, _ = program_perplexity(gpu, WINDOWS, 2)
    assert abs(p_gpu - p_cpu) / p_cpu < 0.005


@cuda
@pytest.mark.parametrize("method, options", [("slicegpt", {"slicing": 0.25}), ("shortgpt", {"remove": 1})])
def test_structural_passes_on_cuda_match_the_cpu(method, options):
    cpu, gpu = pruned("cpu", method, options), pruned("cuda", method, options)
    gpu.device = "cpu"
    p_cpu, _ = program_perplexity(cpu, WINDOWS, 2)
    p_gpu, _ = program_perplexity(gpu, WINDOWS, 2)
    assert abs(p_gpu - p_cpu) / p_cpu < 0.005


@cuda
def test_activations_spill_to_pinned_host_memory(monkeypatch):
    program = tiny_program("llama")
    program.device = "cuda"
    expected, _ = program_perplexity(program, WINDOWS, 2)
    monkeypatch.setattr(BlockRunner, "_too_big_for_device", lambda self, windows: True)
    runner = BlockRunner(program, WINDOWS, 2)
    assert all(s.device.type == "cpu" and s.is_pinned() for s in runner.streams())
    got, _ = program_perplexity(program, WINDOWS, 2)
    assert abs(got - expected) / expected < 1e-5
