"""Run token windows through a program block by block: one block's weights on the device at a time.

The windows' activations walk the blocks together: the prefix turns every batch of windows into the stream entering
block 0 (and the side values the blocks read); ``step(k)`` loads block k's weights from the store onto the device, runs
every batch through it, moves the stream on and frees the weights. Calibration hooks into each step (statistics of a
block's linear inputs, before a pass changes the block); evaluation runs every block and then the suffix, a window at
a time, so logits never exist for more than one window.

Activations stay on the device in the compute dtype; on a GPU they move to pinned host memory when they would take
more than half of the free device memory.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable

import torch

from nexus_export.errors import UserError
from nexus_export.graph.blocks import BlockGraphs, Part, cut_blocks, output_only
from nexus_export.graph.capture import COMPUTE_DTYPE
from nexus_export.metrics import next_token_nll, prediction_chunks, token_nll

# ``Program`` in the annotations below is nexus_export.graph.program's, which runs through this module (Program.logits):
# imported there, never here (annotations are not evaluated).

log = logging.getLogger(__name__)

# A token embedding or lm_head larger than this in the compute dtype is read in rows: the embedding as the rows of the
# tokens at hand, the head a vocabulary chunk of this size at a time (4.2 GB each whole at Llama-3-70B's 128,256 x
# 8,192 in float32). Smaller ones are read whole: the SmolLM2 demo's 113 MB head runs as before.
WHOLE_VOCABULARY_BYTES = 256 * 2**20


def parse_device(device: str | torch.device | None) -> torch.device | None:
    """``auto`` (None), ``cpu``, ``cuda`` or ``cuda:N``; anything else is a UserError (checked without a device)."""
    text = str(device or "auto")
    if text == "auto":
        return None
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise UserError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N")
    return torch.device(text)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; a device this machine lacks is a UserError."""
    text = str(device or "auto")
    dev = parse_device(text)
    if dev is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {text}: torch {torch.__version__} sees no CUDA GPU on this machine; use "
                            "--device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                            f"(cuda:0-cuda:{torch.cuda.device_count() - 1})")
    return dev


_RESHAPES = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten.unsqueeze.default}


def _token_tables(prefix: Part) -> list[int] | None:
    """The indices (among ``prefix.weights``) of the tables the token ids are looked up in, when that is all the
    prefix does with the ids' values (their shape aside; reshapes followed); None when it uses them otherwise."""
    placeholders = [n for n in prefix.module.graph.nodes if n.op == "placeholder"]
    tables, todo = [], [placeholders[len(prefix.weights)]]
    while todo:
        node = todo.pop()
        for user in node.users:
            if user.target in _RESHAPES and user.args[0] is node:
                todo.append(user)
            elif user.target is torch.ops.aten.embedding.default and user.args[1] is node and \
                    user.args[0] in placeholders[:len(prefix.weights)]:
                tables.append(placeholders.index(user.args[0]))
            elif user.target is not torch.ops.aten.sym_size.int:
                return None
    return tables


@dataclass
class _Batches:
    streams: list[torch.Tensor]  # the stream entering the current block, per batch
    sides: list[tuple]  # the prefix's side values, per batch


class BlockRunner:
    """Windows [n, seq] walking the program's blocks (see module docstring).

    Forward passes run ``MICRO`` windows at a time (the memory of a block's activations grows with it, the speed
    hardly does); a visitor sees ``batch_size`` windows at a time (a *batch*), their outputs joined, so statistics
    are the same products over the same rows whatever the micro-batch (a float32 X^T X of 8 windows is not the sum
    of four of 2 windows, to the last bit).
    """

    MICRO = 2

    def __init__(self, program: Program, windows: torch.Tensor, batch_size: int = 8,
                 attention_mask: torch.Tensor | None = None, device: torch.device | str | None = None):
        self.program = program
        self.device = torch.device(device or program.device)
        self.graphs: BlockGraphs = cut_blocks(program, self.device)
        self.windows = windows
        self.batch_size = batch_size
        self.micro = next(m for m in range(min(self.MICRO, batch_size), 0, -1) if batch_size % m == 0)
        self.host = self.device.type == "cuda" and self._too_big_for_device(windows)
        weights, windows_in = self._prefix_weights(windows)
        streams, sides = [], []
        with torch.no_grad():
            for start in range(0, len(windows), self.micro):
                ids = windows_in[start:start + self.micro].to(self.device)
                mask = torch.ones_like(ids) if attention_mask is None else \
                    attention_mask[start:start + self.micro].to(self.device)
                out = self.graphs.prefix(weights, ids, mask)
                streams.append(self._keep(out[0]))
                sides.append(tuple(out[1:]))
        del weights
        self.state = _Batches(streams, sides)

    # ------------------------------------------------------------------------------------------------ plumbing

    def _too_big_for_device(self, windows: torch.Tensor) -> bool:
        width = max((lin.in_features for lin in self.program.structure.linears.values()), default=1)
        need = windows.numel() * width * torch.empty((), dtype=COMPUTE_DTYPE).element_size()
        free, _total = torch.cuda.mem_get_info(self.device)
        if need > free // 2:
            log.info("activations (%.0f MiB) kept in pinned host memory", need / 2**20)
            return True
        return False

    def _keep(self, stream: torch.Tensor) -> torch.Tensor:
        return stream.to("cpu").pin_memory() if self.host else stream

    def _use(self, stream: torch.Tensor) -> torch.Tensor:
        return stream.to(self.device, non_blocking=True) if self.host else stream

    def load(self, part: Part) -> list[torch.Tensor]:
        """A part's weights from the store on the device: the linears' matrices in their stored dtype (the part
        casts each just before its linear: a 70B block is 1.7 GB in bf16, 3.4 GB in float32), the other floating
        ones in the compute dtype."""
        return [self.program.store.get(name, None if name in part.cast else COMPUTE_DTYPE, self.device)
                for name in part.weights]

    def _prefix_weights(self, windows: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The prefix's weights and the token ids to give it. A token embedding larger than WHOLE_VOCABULARY_BYTES in
        the compute dtype is read as the rows of the tokens the windows hold, and the ids renumbered into those rows
        (the same lookup: 2,048 tokens of a 128k x 8,192 embedding are 64 MiB, not 4 GiB), when the prefix reads the
        ids through token embeddings only."""
        prefix = self.graphs.prefix
        tables = _token_tables(prefix)
        large = [j for j in tables or [] if self.program.store.nbytes(prefix.weights[j], COMPUTE_DTYPE)
                 > WHOLE_VOCABULARY_BYTES]
        if not large:
            return self.load(prefix), windows
        used, renumbered = torch.unique(windows, return_inverse=True)
        weights = []
        for j, name in enumerate(prefix.weights):
            if j in large:
                rows = [self.program.store.rows(name, int(t), 1, COMPUTE_DTYPE) for t in used]
                weights.append(torch.cat(rows).to(self.device))
            else:
                weights.append(self.program.store.get(name, COMPUTE_DTYPE, self.device))
        return weights, renumbered

    def inputs(self, k: int, m: int, stream: torch.Tensor | None = None) -> tuple:
        """Block k's inputs for micro-batch m: the current stream (or ``stream``) and m's side values."""
        stream = self._use(self.state.streams[m]) if stream is None else stream
        side = self.state.sides[m]
        return (stream, *(side[j] for j in self.graphs.side_index[k]))

    @property
    def batches(self) -> int:
        """The number of micro-batches (``inputs``, ``logits`` and ``streams`` count in these)."""
        return len(self.state.streams)

    def set_streams(self, streams: list[torch.Tensor]) -> None:
        """Replace the stream: tensors covering the windows in order, per micro-batch or per batch."""
        self.state.streams = [self._keep(piece) for s in streams for piece in s.split(self.micro)]

    def streams(self) -> list[torch.Tensor]:
        """The stream entering the current block, per micro-batch."""
        return self.state.streams

    # ------------------------------------------------------------------------------------------------ running

    @torch.no_grad()
    def run(self, k: int, visit: Callable[[int, torch.Tensor, tuple], None] | None, outputs: list[int],
            part: Part | None = None, advance: bool = False) -> None:
        """Run block k (or ``part``, a piece of it) on every batch and call ``visit(i, stream_in, out)`` where
        ``out[j]`` holds output j over the batch's windows for each j in ``outputs`` (None for the others). With
        ``advance`` each micro-batch's stream is replaced by the one leaving the block as soon as it is computed."""
        part = part or self.graphs.blocks[k]
        weights = self.load(part)
        group = self.batch_size // self.micro
        for g in range(0, self.batches, group):
            members = range(g, min(g + group, self.batches))
            stream_in = torch.cat([self._use(self.state.streams[m]) for m in members]) if visit is not None else None
            pieces: dict[int, list[torch.Tensor]] = {j: [] for j in outputs}
            for m in members:
                out = part(weights, *self.inputs(k, m))
                for j in outputs:
                    pieces[j].append(out[j])
                if advance:
                    if not torch.isfinite(out[0]).all():
                        raise UserError(f"NaN or Inf in the output of block {k} ({self.program.structure.blocks[k]});"
                                        " the weights of that block (or the pruning of it) broke the model")
                    self.state.streams[m] = self._keep(out[0])
                del out
            if visit is not None:
                joined = [None] * len(part.module.graph.output_node().args[0])
                for j in outputs:
                    parts = pieces.pop(j)
                    joined[j] = parts[0] if len(parts) == 1 else torch.cat(parts)
                    del parts
                visit(g // group, stream_in, tuple(joined))
                del joined, stream_in

    def step(self, k: int, visit: Callable[[torch.Tensor, tuple], None] | None = None,
             outputs: list[int] | None = None) -> None:
        """Run block k on every batch, call ``visit(stream_in, out)`` with the ``outputs`` it asks for (output 0 is
        the stream leaving the block; ``graphs.residuals[k]`` indexes the stream after each sublayer), and move the
        stream on. NaN or Inf leaving the block is a UserError naming it."""
        if visit is None:
            self.run(k, None, [], advance=True)
        else:
            self.run(k, lambda i, stream_in, out: visit(stream_in, out), outputs or [0], advance=True)

    def run_blocks(self, progress: Callable[[int], None] | None = None) -> None:
        """Every block in order (the stream ends after the last block)."""
        for k in range(len(self.graphs.blocks)):
            self.step(k)
            if progress is not None:
                progress(k + 1)

    def output_only(self, k: int, index: int) -> Part:
        """Block k cut down to its output ``index`` (see blocks.output_only)."""
        return output_only(self.graphs.blocks[k], index)

    # ------------------------------------------------------------------------------------------------ the end

    def logits(self, i: int, stream: torch.Tensor | None = None, weights: list[torch.Tensor] | None = None
               ) -> torch.Tensor:
        """The suffix (final norm, lm_head) on micro-batch i's stream after the last block (or ``stream``)."""
        weights = self.load(self.graphs.suffix) if weights is None else weights
        stream = self._use(self.state.streams[i]) if stream is None else stream
        side = self.state.sides[i]
        return self.graphs.suffix(weights, stream, *(side[j] for j in self.graphs.suffix_side_index))[0]

    @torch.no_grad()
    def nll(self) -> tuple[float, int]:
        """Summed next-token NLL and token count over every window, from the stream after the last block.

        When the suffix reads nothing but the stream (final norm, head, elementwise post-processing: all per token),
        it runs on ``metrics.CHUNK`` positions of one window at a time, so logits never exist for more than that many
        tokens (and a head past WHOLE_VOCABULARY_BYTES is read a vocabulary chunk at a time); otherwise on a whole
        micro-batch."""
        tokenwise = not self.graphs.suffix_side_index
        head = self._head_chunking() if tokenwise else None
        if head is not None:
            return self._nll_by_vocabulary(*head)
        weights = self.load(self.graphs.suffix)
        total, tokens = 0.0, 0
        for i in range(self.batches):
            ids = self.windows[i * self.micro:(i + 1) * self.micro].to(self.device)
            stream = self._use(self.state.streams[i])
            if not tokenwise:
                nll, count = next_token_nll(self.logits(i, stream, weights), ids)
                total, tokens = total + nll, tokens + count
                continue
            seq = ids.shape[1]
            for r in range(len(ids)):
                for t0, t1 in prediction_chunks(seq):
                    logits = self.logits(i, stream[r:r + 1, t0:t1], weights)
                    total += token_nll(logits[0], ids[r, t0 + 1:t1 + 1])
                    tokens += t1 - t0
        return total, tokens

    def _head_chunking(self) -> tuple[int, int] | None:
        """(the lm_head weight's index among the suffix's weights, rows per chunk) when the head is larger than
        WHOLE_VOCABULARY_BYTES in the compute dtype, stored [vocabulary, width] and without a bias; else None."""
        structure = self.program.structure
        head = structure.linears.get(structure.lm_head) if structure.lm_head else None
        if head is None or head.weight_layout != "out_in" or head.bias is not None or \
                head.weight not in self.graphs.suffix.weights:
            return None
        row = head.in_features * torch.empty((), dtype=COMPUTE_DTYPE).element_size()
        if head.out_features * row <= WHOLE_VOCABULARY_BYTES:
            return None
        return self.graphs.suffix.weights.index(head.weight), max(1, WHOLE_VOCABULARY_BYTES // row)

    def _nll_by_vocabulary(self, index: int, rows: int) -> tuple[float, int]:
        """``nll`` with the head read ``rows`` vocabulary rows at a time: the suffix runs once per chunk on every
        position (the post-processing after the head is elementwise, so each chunk's logits are the full logits'
        columns), each position keeping a running log-sum-exp (float64) and its target's logit."""
        name = self.graphs.suffix.weights[index]
        weights = [self.program.store.get(w, COMPUTE_DTYPE, self.device)
                   for j, w in enumerate(self.graphs.suffix.weights) if j != index]
        vocab = self.program.store.shape(name)[0]
        pieces = []  # (batch, window in it, t0, t1, targets, running log-sum-exp, target logit)
        for i in range(self.batches):
            ids = self.windows[i * self.micro:(i + 1) * self.micro].to(self.device)
            for r in range(len(ids)):
                for t0, t1 in prediction_chunks(ids.shape[1]):
                    n = t1 - t0
                    pieces.append((i, r, t0, t1, ids[r, t0 + 1:t1 + 1],
                                   torch.full((n,), -torch.inf, dtype=torch.float64, device=self.device),
                                   torch.zeros(n, dtype=torch.float64, device=self.device)))
        for v0 in range(0, vocab, rows):
            count = min(rows, vocab - v0)
            chunk = [*weights[:index], self.program.store.rows(name, v0, count, COMPUTE_DTYPE, self.device),
                     *weights[index:]]
            for i, r, t0, t1, targets, lse, picked in pieces:
                stream = self._use(self.state.streams[i][r:r + 1, t0:t1])  # only these positions move
                logits = self.logits(i, stream, chunk)[0].double()
                lse.copy_(torch.logaddexp(lse, torch.logsumexp(logits, dim=-1)))
                inside = (targets >= v0) & (targets < v0 + count)
                picked[inside] = logits[inside.nonzero().squeeze(1), targets[inside] - v0]
            del chunk
        total = sum(float((lse - picked).sum()) for *_, lse, picked in pieces)
        return total, sum(t1 - t0 for _, _, t0, t1, *_ in pieces)
