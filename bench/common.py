"""What every benchmark script shares: quiet, timestamped logging on stderr (tables go to stdout)."""

from __future__ import annotations

import logging
import sys


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("torch", "onnxscript", "onnx_ir", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
