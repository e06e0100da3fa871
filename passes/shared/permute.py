"""Channel permutation for N:M sparsity: reorder the channels linears read so that their N:M groups prune better.

Which M weights of a row share a group depends on the order of the input channels. Reordering the channels a linear
reads is exact when everything that produces or scales those channels is reordered the same way. Three kinds of
channel sets ("spaces") are permuted:

- the MLP's inner dimension, per block: rows (and biases) of the mlp_in linears and columns of the mlp_out linear;
- the attention's value dimension, per block and key/value head: the head's rows of the value projection and, in every
  query head that reads that value head, the columns of the attention output (softmax(QK^T) V mixes positions, not
  channels; found where the value projection feeds scaled_dot_product_attention through reshapes only);
- the residual stream, once for the whole model: columns of every reader (attn_in, mlp_in, lm_head), rows and biases
  of every writer (attn_out, mlp_out), the embeddings' columns and every other per-channel parameter of the stream
  (the norms' scales and shifts: RMSNorm and LayerNorm commute with a permutation).

A space's permutation is chosen to keep the most importance under the pattern: scores (|W_ij| * s_j)^2 of the targeted
linears reading it, with s_j a column scale from a dense calibration sweep (passes.shared.mask_plan: ||X_j|| for Wanda,
1 / sqrt([H^-1]_jj) for SparseGPT's saliency w^2 / [H^-1]_jj; 1 without calibration). It starts
from a balanced assignment (each group gets one channel of every importance tier) and is improved by optimal
reassignment, one position of every group at a time (scipy's linear_sum_assignment over chunks of groups). The rewrite
is checked on the logits of a seeded window and undone if the function changed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch.fx import Node

from nexus_export.graph.program import Program
from nexus_export.graph.structure import SHORTCUT, Linear, op_name
from passes.shared.sparsity import NMPattern

log = logging.getLogger(__name__)

MAX_ROWS = 16384  # score rows a space's search uses (a seeded sample of the targeted linears' rows beyond that)
CHUNK = 128  # groups reassigned together by one linear_sum_assignment
MAX_ROUNDS = 1  # passes over the group positions after the balanced start (most of the gain is in that start)
EXACT_REL = 1e-4  # largest |logits change| / max |logit| accepted as "the function is unchanged"


@dataclass(frozen=True)
class Use:
    """Where a space's channels sit in one tensor: ``size`` entries from each offset along ``axis`` of ``param``."""

    param: str
    axis: int
    offsets: tuple[int, ...] = (0,)


@dataclass
class Space:
    """Channels permuted together, the tensors holding them, and the targeted linears whose scores choose the order."""

    kind: str  # "stream", "mlp" or "value"
    name: str
    size: int
    uses: list[Use]
    scored: list[tuple[str, int]]  # (linear, first input column) of each targeted linear reading these channels
    perm: torch.Tensor | None = None
    gain: float = 0.0  # kept score after / before - 1


def _in_axis(lin: Linear) -> int:
    return 1 if lin.weight_layout == "out_in" else 0


def _out_axis(lin: Linear) -> int:
    return 0 if lin.weight_layout == "out_in" else 1


def _writes(lin: Linear, offsets: tuple[int, ...] = (0,)) -> list[Use]:
    uses = [Use(lin.weight, _out_axis(lin), offsets)]
    return uses + ([Use(lin.bias, 0, offsets)] if lin.bias else [])


def find_spaces(program: Program, targets: set[str], pattern: NMPattern) -> list[Space]:
    """The spaces of ``program`` that a targeted linear reads and whose width the pattern's M divides."""
    s = program.structure
    lin = program.linear
    spaces = []
    for sub in s.sublayers:
        if sub.kind != "mlp" or len(sub.writers) != 1 or sub.writers[0] not in targets:
            continue
        down = lin(sub.writers[0])
        ups = [lin(n) for n in sub.readers]
        if down.in_features % pattern.m or any(u.out_features != down.in_features for u in ups):
            continue
        uses = [u for r in ups for u in _writes(r)] + [Use(down.weight, _in_axis(down))]
        spaces.append(Space("mlp", f"block {sub.block} mlp", down.in_features, uses, [(down.name, 0)]))
    for sub in s.sublayers:
        if sub.kind == "attention" and len(sub.writers) == 1 and sub.writers[0] in targets:
            spaces += _value_spaces(program, sub, pattern)
    stream = _stream_space(program, targets, pattern)
    return ([stream] if stream is not None else []) + spaces


# ops between the value projection and the attention that only reshape, reorder heads or repeat key/value heads
_RESHAPES = {"view", "reshape", "_unsafe_view", "transpose", "permute", "contiguous", "clone", "expand", "unsqueeze",
             "to", "_to_copy", "alias", "detach"}


def _value_spaces(program: Program, sub, pattern: NMPattern) -> list[Space]:
    """One space per key/value head of an attention sublayer whose value projection reaches the attention op through
    reshapes only (none for a fused q/k/v projection, or without scaled_dot_product_attention)."""
    by_node = {program.linear(n).node: program.linear(n) for n in sub.readers}
    out = program.linear(sub.writers[0])
    attention = [n for n in program.exported.graph.nodes if n.op == "call_function"
                 and op_name(n) == "scaled_dot_product_attention" and isinstance(n.args[2], Node)
                 and _source(n.args[2], by_node) is not None]
    if len(attention) != 1:
        return []
    value = _source(attention[0].args[2], by_node)
    head_dim = int(attention[0].args[2].meta["val"].shape[-1])
    kv_heads, q_heads = value.out_features // head_dim, out.in_features // head_dim
    if (head_dim % pattern.m or value.out_features % head_dim or out.in_features != q_heads * head_dim
            or q_heads % kv_heads):
        return []
    rep = q_heads // kv_heads  # query heads h * rep .. h * rep + rep - 1 read key/value head h
    spaces = []
    for h in range(kv_heads):
        columns = tuple((h * rep + r) * head_dim for r in range(rep))
        uses = _writes(value, (h * head_dim,)) + [Use(out.weight, _in_axis(out), columns)]
        spaces.append(Space("value", f"block {sub.block} value head {h}", head_dim, uses,
                            [(out.name, c) for c in columns]))
    return spaces


def _source(node: Node, linears: dict[str, Linear]) -> Linear | None:
    """The linear among ``linears`` (by graph node name) that ``node`` is a reshape of, or None. A concatenation
    along the sequence axis (the key/value cache: past, then new) keeps every channel where it is: the new half is
    followed."""
    while node.op == "call_function" and node.name not in linears:
        if op_name(node) == "cat" and _along_sequence(node):
            node = node.args[0][-1]
            continue
        if op_name(node) not in _RESHAPES or not node.args or not isinstance(node.args[0], Node):
            return None
        node = node.args[0]
    return linears.get(node.name)


def _along_sequence(cat: Node) -> bool:
    """Whether a cat node joins 4-D [batch, heads, sequence, head_dim] tensors along the sequence axis."""
    tensors, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else 0
    return (isinstance(tensors, (list, tuple)) and tensors and all(isinstance(t, Node) for t in tensors)
            and getattr(tensors[-1].meta.get("val"), "dim", lambda: 0)() == 4 and dim in (2, -2))


def _stream_space(program: Program, targets: set[str], pattern: NMPattern) -> Space | None:
    """The residual stream as one space, or None when it is not a plain stream (SliceGPT's shortcut matrices, widths
    that differ) or no targeted linear reads it."""
    s = program.structure
    if any(l.role == SHORTCUT for l in s.linears.values()) or s.lm_head is None:
        return None
    readers = [program.linear(n) for sub in s.sublayers for n in sub.readers] + [program.linear(s.lm_head)]
    writers = [program.linear(n) for sub in s.sublayers for n in sub.writers]
    width = readers[0].in_features
    if width % pattern.m or any(r.in_features != width for r in readers) or any(w.out_features != width
                                                                                 for w in writers):
        return None
    scored = [(r.name, 0) for r in readers if r.name in targets]
    if not scored:
        return None
    uses = {Use(r.weight, _in_axis(r)) for r in readers} | {u for w in writers for u in _writes(w)}
    for param in s.embeddings.values():
        if program.store.shape(param)[-1] == width:
            uses.add(Use(param, 1))
    linear_params = {p for l in s.linears.values() for p in (l.weight, l.bias) if p}
    for param in program.weight_names():  # norms' scales and shifts: every other per-channel vector of the stream
        if param not in linear_params and program.store.shape(param) == (width,):
            uses.add(Use(param, 0))
    return Space("stream", "residual stream", width, sorted(uses, key=lambda u: (u.param, u.axis)), scored)


def space_scores(program: Program, space: Space, scales: dict[str, torch.Tensor] | None, seed: int = 0
                 ) -> torch.Tensor:
    """[rows, size] float32 importance of the space's channels: (|W| * scale_j)^2 (or W^2) of its scored linears'
    rows, a seeded sample of at most MAX_ROWS rows in all, in proportion to each linear's rows. Squared, the scores a
    group drops add up to the output error pruning them causes (inputs taken as uncorrelated), which is what the
    permutation should keep small."""
    total = sum(program.linear(n).out_features for n, _ in space.scored)
    keep = min(1.0, MAX_ROWS / total)
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for name, first in space.scored:
        cols = slice(first, first + space.size)
        w = program.weight(name, torch.float32)[:, cols].abs()
        if keep < 1.0:
            w = w[torch.randperm(w.shape[0], generator=gen)[: max(1, round(w.shape[0] * keep))]]
        scores = w * scales[name][cols].float().reshape(1, -1) if scales is not None else w
        parts.append(scores.square_())
        del w, scores
    return torch.cat(parts)


def kept_score(scores: torch.Tensor, perm: torch.Tensor, pattern: NMPattern) -> float:
    """Sum over rows of the scores the pattern keeps in every group once the channels are in ``perm``'s order."""
    rows, size = scores.shape
    grouped = scores[:, perm].reshape(rows, size // pattern.m, pattern.m)
    return float(grouped.topk(pattern.m - pattern.n, dim=2).values.sum(dtype=torch.float64))


def choose_permutation(scores: torch.Tensor, pattern: NMPattern, seed: int = 0) -> torch.Tensor:
    """A permutation of the channels (columns of ``scores``) that keeps more score under the pattern: ``perm[i]`` is
    the channel placed at position i. Never worse than the identity (returned when nothing better is found)."""
    from scipy.optimize import linear_sum_assignment

    size, m = scores.shape[1], pattern.m
    keep = m - pattern.n  # scores kept per group and row
    n_groups = size // m
    order = scores.sum(0).argsort(descending=True)
    tiers = order.reshape(m, n_groups)  # tier t holds the channels ranked t*G .. (t+1)*G-1
    tiers[1::2] = tiers[1::2].flip(1)  # alternate directions so every group's total is about the same
    groups = tiers.t().contiguous()  # [G, M]: group g takes one channel of every tier
    gen = torch.Generator().manual_seed(seed)
    scores_t = scores.t().contiguous()  # [channels, rows]: every reduction below runs along contiguous memory
    best = kept_score(scores, groups.reshape(-1), pattern)
    for _ in range(MAX_ROUNDS):
        before = best
        for pos in range(m):
            others = [p for p in range(m) if p != pos]
            shuffled = torch.randperm(n_groups, generator=gen)
            for c0 in range(0, n_groups, CHUNK):
                idx = shuffled[c0:c0 + CHUNK]
                rest = scores_t[groups[idx][:, others]]  # [g, M-1, rows]
                floor = rest.topk(keep, dim=1).values[:, keep - 1]  # [g, rows]: the keep-th largest of the rest
                moving = scores_t[groups[idx, pos]]  # [g, rows]: the channels being reassigned
                # kept score of group j with channel c = (its top keep-1) + max(floor_j, x_c): only the max varies
                gain = torch.zeros(len(idx), len(idx), dtype=torch.float64)
                for r0 in range(0, scores_t.shape[1], 1024):
                    gain += torch.maximum(moving[:, None, r0:r0 + 1024], floor[None, :, r0:r0 + 1024]).sum(-1)
                rows, cols = linear_sum_assignment(gain.numpy(), maximize=True)
                channels = groups[idx, pos].clone()
                groups[idx[torch.as_tensor(cols)], pos] = channels[torch.as_tensor(rows)]
        best = kept_score(scores, groups.reshape(-1), pattern)
        if best <= before * (1 + 1e-6):
            break
    identity = kept_score(scores, torch.arange(size), pattern)
    return groups.reshape(-1) if best > identity else torch.arange(size)


def apply(program: Program, space: Space, perm: torch.Tensor) -> None:
    """Reorder the space's channels in every tensor holding them: position i gets channel ``perm[i]``."""
    for use in space.uses:
        t = program.parameter(use.param)
        index = torch.arange(t.shape[use.axis])
        for first in use.offsets:
            index[first:first + space.size] = first + perm
        program.set_parameter(use.param, t.index_select(use.axis, index), dtype=t.dtype)


def permute(program: Program, targets: list, pattern: NMPattern, scales: dict[str, torch.Tensor] | None,
            check_ids: torch.Tensor | None) -> dict:
    """Choose and apply a permutation of every space the targets read; return the report's facts. ``scales``: each
    targeted linear's input column scales on the dense model (``mask_plan.dense_scales``; None: magnitude scores).
    ``check_ids``: a window whose logits must not change (None: no check)."""
    start = time.perf_counter()
    spaces = find_spaces(program, {t.name for t in targets}, pattern)
    before = program.logits(check_ids) if check_ids is not None else None
    for space in spaces:
        scores = space_scores(program, space, scales)
        space.perm = choose_permutation(scores, pattern)
        base = kept_score(scores, torch.arange(space.size), pattern)
        space.gain = kept_score(scores, space.perm, pattern) / base - 1 if base > 0 else 0.0
        del scores
        apply(program, space, space.perm)
        log.info("permute: %s, kept score %+.2f%%", space.name, 100 * space.gain)
    facts = {"spaces": len(spaces), "applied": True,
             "kept_score_gain": {kind: round(sum(s.gain for s in spaces if s.kind == kind) /
                                             max(1, sum(s.kind == kind for s in spaces)), 6)
                                 for kind in ("stream", "mlp", "value") if any(s.kind == kind for s in spaces)}}
    if before is not None and spaces:
        after = program.logits(check_ids)
        rel = float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))
        facts["logits_rel_change"] = rel
        if rel > EXACT_REL:
            for space in reversed(spaces):
                apply(program, space, torch.argsort(space.perm))
            log.warning("permute: the permuted model's logits changed by %.1e (relative) on a calibration window: "
                        "this graph has a per-channel operation the rewrite does not follow; the channels are left "
                        "in their order", rel)
            facts["applied"] = False
    facts["seconds"] = round(time.perf_counter() - start, 3)
    return facts
