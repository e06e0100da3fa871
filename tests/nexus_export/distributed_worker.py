"""Run by torchrun from test_distributed.py (and in process for the single-process reference): each pass on a tiny
2-block LLaMA, distributed over the processes torchrun started; rank 0 saves what each pass produced.

Usage: torchrun --nproc-per-node N tests/nexus_export/distributed_worker.py OUT METHOD[,METHOD...] [CHECKPOINT]
(with CHECKPOINT: resume each method from CHECKPOINT/METHOD)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's tiny models
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: passes/, runtimes/

from conftest import make_tiny  # noqa: E402

from nexus_export import distributed  # noqa: E402
from nexus_export.engine.pass_base import PassContext  # noqa: E402
from nexus_export.evaluation.evaluate import program_perplexity  # noqa: E402
from nexus_export.graph.program import Program  # noqa: E402
from nexus_export.registry import get_pass  # noqa: E402

CALIB = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(21))
EVAL = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(22))
METHODS = {
    "wanda": ("wanda", {"sparsity": 0.5, "pattern": "2:4"}),
    "sparsegpt": ("sparsegpt", {"sparsity": 0.5, "pattern": "2:4"}),
    "shortgpt": ("shortgpt", {"remove": 1}),
    "slicegpt": ("slicegpt", {"slicing": 0.25}),
}


def run(out: Path, methods: list[str], checkpoint: Path | None = None, resume: bool = False) -> None:
    """Each method on a fork of the same program; rank 0 (or the only process) writes OUT/METHOD.safetensors (the
    blocks' weights and the logits on EVAL) and OUT/METHOD.json (perplexity, the pass's changes). ``checkpoint``:
    each method checkpoints into CHECKPOINT/METHOD (and resumes from there with ``resume``)."""
    program = Program.from_model(make_tiny("llama", layers=2))
    for method in methods:
        name, options = METHODS[method]
        ctx = PassContext(calibration_windows=CALIB, checkpoint_dir=checkpoint / method if checkpoint else None,
                          resume=resume)
        result = get_pass(name)(get_pass(name).config_class.from_options(options, name)).run(program.fork(), ctx)
        pruned = result.program
        ppl, _ = program_perplexity(pruned, EVAL)
        if not distributed.world().writer:
            continue
        out.mkdir(parents=True, exist_ok=True)
        tensors = {lin.name: pruned.weight(lin.name).float().contiguous() for lin in pruned.structure.in_blocks()}
        tensors["logits"] = pruned.logits(EVAL[:2])
        save_file(tensors, str(out / f"{method}.safetensors"))
        (out / f"{method}.json").write_text(json.dumps({"perplexity": ppl, "world_size": distributed.world().size,
                                                        "changes": result.report.changes}, default=str))


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("nexus_export.engine.calibration").setLevel(logging.INFO)  # "resuming from ..." for the test to see
    distributed.init(torch.device("cpu"))
    resume_from = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    run(Path(sys.argv[1]), sys.argv[2].split(","), resume_from, resume=resume_from is not None)
    distributed.shutdown()
