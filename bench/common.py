"""What every benchmark script shares: quiet, timestamped logging on stderr (tables go to stdout)."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("torch", "onnxscript", "onnx_ir", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def interleaved_latency_ms(sessions: dict, batch: int, seq: int, repeats: int, seed: int = 0) -> dict[str, float]:
    """Median ms per onnxruntime session on the same random tokens, run round-robin after one warm-up each, so noise
    on this shared machine hits every model alike."""
    import statistics
    import time

    import numpy as np

    vocab = int(next(iter(sessions.values())).get_outputs()[0].shape[-1])
    ids = np.random.default_rng(seed).integers(0, min(vocab, 1000), (batch, seq), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    runs: dict[str, list[float]] = {name: [] for name in sessions}
    for sess in sessions.values():
        sess.run(["logits"], feeds)
    for _ in range(repeats):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(["logits"], feeds)
            runs[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in runs.items()}


def load_protocol(model: str, eval_windows: int, calib_samples: int, seq_len: int, calib_source: str = "austen"):
    """The model (its weights left on disk), its captured program, and the default protocol's evaluation and
    calibration windows (``calib_source``: another calibration source or a mix, e.g. austen:0.5,FILE:0.5)."""
    from nexus_export.data import calibration_windows, evaluation_windows
    from nexus_export.graph.program import Program
    from nexus_export.models.zoo import open_model

    loaded = open_model(model)
    evals = evaluation_windows(loaded.tokenizer, "austen", eval_windows, seq_len)
    calib = calibration_windows(loaded.tokenizer, calib_source, calib_samples, seq_len, 0)
    program = Program.from_loaded(loaded)
    return loaded, program, evals, calib


def protocol_parser(description: str, other_text: bool = False) -> argparse.ArgumentParser:
    """An argument parser with the default protocol's options (and, when asked, the other-text windows)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-source", default="austen", help="calibration text, or a mix such as austen:0.5,FILE:0.5")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=64)
    if other_text:
        ap.add_argument("--ood-windows", type=int, default=32, help="windows of the license texts (0 = skip)")
    return ap


def other_text_windows(tokenizer, windows: int, seq_len: int):
    """Windows of text the calibration never saw: the license texts in /usr/share/common-licenses joined into one
    file (regular files only: the symlinks repeat them); None when there are none or ``windows`` is 0."""
    from nexus_export.data import evaluation_windows

    if not windows or not LICENSES.is_dir():
        return None
    files = sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink())
    out = Path(tempfile.mkdtemp()) / "licenses.txt"
    out.write_text("\n\n".join(p.read_text(errors="replace") for p in files))
    return evaluation_windows(tokenizer, out, windows, seq_len)


def quality(program, evals, other, label: str) -> dict:
    """Perplexity of ``program`` on the evaluation windows in PyTorch and in onnxruntime, and on the other text."""
    from nexus_export.evaluation.evaluate import program_perplexity
    from runtimes import ort
    from runtimes.onnx_export import lower_to_onnx

    ppl, _ = program_perplexity(program, evals, 2, label)
    ppl_other = program_perplexity(program, other, 2, f"{label} (other text)")[0] if other is not None else None
    with tempfile.TemporaryDirectory() as tmp:
        sess = ort.session(lower_to_onnx(program, Path(tmp) / "model.onnx"))
        ppl_onnx, _ = ort.perplexity(sess, evals, 1)
    return dict(ppl=ppl, ppl_onnx=ppl_onnx, ppl_other=ppl_other)


def cell(value, fmt: str) -> str:
    """``value`` formatted, or "-" when there is none."""
    return "-" if value is None else format(value, fmt)


def other_cell(value, dense) -> str:
    """Other-text perplexity with its ratio to the dense model's."""
    return "-" if value is None else f"{value:.2f} ({value / dense:.2f}x)"
