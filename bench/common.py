"""What every benchmark script shares: quiet, timestamped logging on stderr (tables go to stdout)."""

from __future__ import annotations

import logging
import sys


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


def load_protocol(model: str, eval_windows: int, calib_samples: int, seq_len: int):
    """The model, its captured program, and the default protocol's evaluation and calibration windows."""
    from nexus_export.data import calibration_windows, evaluation_windows
    from nexus_export.program import Program
    from nexus_export.zoo import load_model

    loaded = load_model(model)
    evals = evaluation_windows(loaded.tokenizer, "austen", eval_windows, seq_len)
    calib = calibration_windows(loaded.tokenizer, "austen", calib_samples, seq_len, 0)
    program = Program.from_model(loaded.model, loaded.tokenizer, name=loaded.name)
    return loaded, program, evals, calib
