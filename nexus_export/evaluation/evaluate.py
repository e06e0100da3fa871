"""Evaluation in PyTorch: perplexity of a Program on token windows (the onnxruntime twin lives in runtimes/).

The windows walk the program block by block (one block's weights loaded at a time), then the suffix scores them a
window at a time, so evaluation needs the memory of one block and the windows' activations, never the whole model.
In a distributed run each process scores its share of the windows and the sums are added.
"""

from __future__ import annotations

import torch

from nexus_export import distributed
from nexus_export.graph.program import Program
from nexus_export.graph.runner import BlockRunner
from nexus_export.metrics import perplexity
from nexus_export.progress import Progress


@torch.no_grad()
def program_perplexity(program: Program, windows: torch.Tensor, batch_size: int = 4,
                       what: str = "perplexity") -> tuple[float, int]:
    """exp(mean next-token NLL) over ``windows`` [n, seq_len], and the number of predicted tokens."""
    runner = BlockRunner(program, distributed.local(windows, batch_size), batch_size)
    runner.run_blocks(Progress(what, len(program.structure.blocks), "blocks"))
    total_nll, tokens = distributed.sum_float(*runner.nll())
    return perplexity(total_nll, int(tokens)), int(tokens)
