"""Running a model sublayer by sublayer, with any attention or MLP sublayer skipped, for sublayer removal and repair.

A block of attention then MLP is run through its own graph, or that graph cut down to the stream after its attention
(the block without its MLP), and the block without its attention is the same block of a twin program whose
attention sublayers are all removed (its MLP on the stream that entered the block). Only blocks of that form are
supported (``check_sublayers``).
"""

from __future__ import annotations

import torch

from nexus_export.errors import UserError
from nexus_export.graph.blocks import Part, output_only
from nexus_export.graph.program import Program
from nexus_export.graph.runner import BlockRunner

Unit = tuple[int, str]  # (block, "attention" or "mlp")
KINDS = ("attention", "mlp")


def label(unit: Unit) -> str:
    return f"{unit[0]}.{unit[1]}"


def check_sublayers(program: Program, count: int | None = None, what: str = "granularity sublayer") -> None:
    """Every block must be an attention sublayer then an MLP sublayer, each on its own residual add; a removal of
    ``count`` sublayers must leave one."""
    kinds: dict[int, list[str]] = {}
    for sub in program.structure.sublayers:
        kinds.setdefault(sub.block, []).append(sub.kind)
    n = len(program.structure.blocks)
    odd = [k for k in range(n) if kinds.get(k) != list(KINDS)]
    if odd:
        raise UserError(f"{what} needs blocks of an attention sublayer then an MLP sublayer, each with its own "
                        f"residual add; block {odd[0]} has {kinds.get(odd[0], [])} (attention and MLP side by side "
                        "share one add); remove whole blocks without it")
    if count is not None and not 0 <= count < 2 * n:
        raise UserError(f"cannot remove {count} of {2 * n} sublayers; at most {2 * n - 1} (one must stay)")


class SublayerRunner:
    """``program`` on ``windows`` (micro-batch by micro-batch, as BlockRunner), one block's weights at a time."""

    def __init__(self, program: Program, windows: torch.Tensor, batch_size: int = 8):
        from nexus_export.graph.surgery import remove_sublayers

        n = len(program.structure.blocks)
        self.full = BlockRunner(program, windows, batch_size)
        self.mlp_only = BlockRunner(remove_sublayers(program, [(k, "attention") for k in range(n)]), windows,
                                    batch_size)
        self.blocks = n
        self._attention_only: dict[int, Part] = {}  # block -> the block without its MLP
        self._block: int | None = None
        self._loaded: dict[str, list[torch.Tensor]] = {}

    @property
    def batches(self) -> int:
        return self.full.batches

    def entering(self, m: int) -> torch.Tensor:
        """The stream entering block 0 for micro-batch m."""
        return self.full.inputs(0, m)[0]

    def through(self, k: int, stream: torch.Tensor, m: int, skip: set[str] | frozenset[str] = frozenset()
                ) -> torch.Tensor:
        """The stream leaving block k, entered with ``stream`` (micro-batch m), without the sublayers in ``skip``."""
        if set(KINDS) <= set(skip):
            return stream
        if "attention" in skip:
            return self.mlp_only.graphs.blocks[k](self._weights(k, "mlp"), *self.mlp_only.inputs(k, m, stream))[0]
        if "mlp" in skip:  # the block cut down to the stream after its attention: its MLP is not computed
            if k not in self._attention_only:
                self._attention_only[k] = output_only(self.full.graphs.blocks[k],
                                                      self.full.graphs.residuals[k]["attention"])
            part = self._attention_only[k]
        else:
            part = self.full.graphs.blocks[k]
        return part(self._weights(k, "full"), *self.full.inputs(k, m, stream))[0]

    def apply(self, unit: Unit, stream: torch.Tensor, m: int) -> torch.Tensor:
        """The stream after sublayer ``unit`` alone, applied to ``stream``."""
        k, kind = unit
        return self.through(k, stream, m, {other for other in KINDS if other != kind})

    def _weights(self, k: int, graph: str) -> list[torch.Tensor]:
        """Block k's weights for the ``graph`` ("full" or "mlp"), read once while block k is worked on."""
        if self._block != k:
            self._block, self._loaded = k, {}  # the last block's weights go first
        if graph not in self._loaded:
            runner = self.full if graph == "full" else self.mlp_only
            self._loaded[graph] = runner.load(runner.graphs.blocks[k])
        return self._loaded[graph]
