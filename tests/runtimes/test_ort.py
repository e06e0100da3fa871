"""onnxruntime: perplexity equal to PyTorch's, latency, and errors a user can fix."""

from __future__ import annotations

import pytest
import torch

from nexus_export import metrics
from nexus_export.errors import UserError
from runtimes import ort


def test_available():
    ok, reason = ort.available()
    assert ok and "onnxruntime" in reason


@pytest.mark.parametrize("batch_size", [1, 2])
def test_perplexity_matches_pytorch(tiny_llama, batch_size):
    windows = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(7))
    logits = tiny_llama.program.logits(windows)
    expected = metrics.perplexity(*metrics.next_token_nll(logits, windows))
    calls = []
    ppl, tokens = ort.perplexity(
        ort.session(tiny_llama.onnx_path, threads=1), windows, batch_size, lambda d, t: calls.append((d, t))
    )
    assert tokens == 3 * 23
    assert ppl == pytest.approx(expected, rel=1e-4)
    assert 250 < ppl < 350  # a random model over 300 tokens is about uniform
    assert calls[-1] == (3, 3) and len(calls) == (3 + batch_size - 1) // batch_size


def test_latency_positive(tiny_llama):
    result = ort.latency_ms(ort.session(tiny_llama.onnx_path, threads=1), batch=2, seq=16, warmup=1, repeats=3)
    assert result["median_ms"] > 0 and result["p90_ms"] >= result["median_ms"] and result["runs"] == 3


def test_a_cpu_session_plans_no_memory_pattern(tiny_llama):
    """The memory pattern keeps one block per input shape for the intermediates: the CPU session goes without it."""
    sess = ort.session(tiny_llama.onnx_path, threads=1)
    assert sess.get_session_options().enable_mem_pattern is False
    assert sess.get_session_options().graph_optimization_level.name == "ORT_ENABLE_ALL"


def test_user_errors(tiny_llama, tmp_path):
    with pytest.raises(UserError, match="no ONNX file"):
        ort.session(tmp_path / "missing.onnx")
    sess = ort.session(tiny_llama.onnx_path, threads=1)
    with pytest.raises(UserError, match="sequence >= 2"):
        ort.perplexity(sess, torch.zeros(2, 1, dtype=torch.long))
