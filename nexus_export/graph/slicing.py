"""Graph rewrites behind SliceGPT: fuse the norms, then rotate the residual stream and slice it.

``fuse_norms``: every norm's scale (and bias) moves into the linears that read from it; with LayerNorm the mean
subtraction moves into everything that writes to the stream (embeddings, sublayer outputs), so every norm becomes a
scale-free RMSNorm ``x * rsqrt(sum(x^2) / D + eps)`` whose divisor stays the original width D (slicing keeps most of
the stream's energy, and the norm must keep its meaning). A tied lm_head is untied. The function is unchanged.

``with_projections``: a copy of a fused program with a [D, D] matrix applied at every stream point (the stream entering
block 0 and each residual add), identity at first. Setting a point's matrix to Q_d Q_d^T makes the program compute what
the sliced program will compute, in the original basis: the calibration runs on it.

``rotate_and_slice``: the sliced program itself. Point i's stream is carried as z_i = x_i B_i (B_i: [D, d_i], orthonormal
columns): embeddings and linears writing to point i get B_i^T on their output side (d_i rows), linears reading from it
B_i on their input side (d_i columns), and each residual connection a shortcut matrix B_i^T B_j (none where it is the
identity). Literal widths in views are corrected and the program is re-exported, so every shape is fresh.

Each rewrite works on a copy of the graph and a fork of the store, one matrix at a time (read in float64, written
back in the store's dtype): the program it started from keeps its weights, and no model is copied.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from nexus_export.errors import UserError
from nexus_export.graph.graph_edit import add_parameter, call, copy_program, meta_like, param_of, rebuild
from nexus_export.graph.program import Program
from nexus_export.graph.structure import block_boundaries, op_name, through
from nexus_export.graph.surgery import stream_operand
from nexus_export.graph.trace_settings import tracing
from nexus_export.naming import WRAPPER_PREFIX
from nexus_export.progress import Progress
from nexus_export.weights.store import WeightStore

log = logging.getLogger(__name__)

aten = torch.ops.aten
VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


class NormNotFusable(UserError):
    """A norm whose scale cannot be folded into the linears after it (an unknown norm form)."""


@dataclass
class NormSite:
    """One norm in the graph: its output node, what it reads from the stream, its parameters, the linears it feeds."""

    kind: str  # "layernorm" or "rmsnorm"
    output: fx.Node  # the node the readers consume (the scaled output)
    stream: fx.Node  # the value normalized
    weight: str | None  # parameter names (state_dict keys)
    bias: str | None
    eps: float
    mean: fx.Node | None = None  # rmsnorm: the mean(x^2) node
    normalized: fx.Node | None = None  # rmsnorm: the value before the scale
    offset: float = 0.0  # the scale is weight + offset (Gemma's RMSNorm multiplies by 1 + weight)
    readers: list[str] = dataclasses.field(default_factory=list)  # the linears reading this norm's output


# ---------------------------------------------------------------------------------------------------- graph helpers

class _WidthFixer(fx.Interpreter):
    """Runs the edited graph on a small real input; a view whose literal last size was the stream's old width, applied
    to a tensor whose last dimension has changed, gets the new width."""

    def run_node(self, n: fx.Node):
        if n.op == "call_function" and n.target in VIEW_OPS and isinstance(n.args[0], fx.Node):
            x = self.env[n.args[0]]
            old = n.args[0].meta.get("val")
            shape = list(n.args[1])
            if (old is not None and hasattr(old, "shape") and x.shape[-1] != old.shape[-1]
                    and isinstance(shape[-1], int) and shape[-1] == old.shape[-1]):
                shape[-1] = int(x.shape[-1])
                n.args = (n.args[0], shape, *n.args[2:])
        return super().run_node(n)


def _fix_widths(exported: ExportedProgram) -> None:
    """Run the edited graph on fake tensors of the weights' new shapes (no memory, no arithmetic) to fix views."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    values = []
    for spec in exported.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            values.append(mode.from_tensor(torch.zeros(1, 4, dtype=torch.long)))
        elif spec.target in exported.state_dict:
            values.append(mode.from_tensor(exported.state_dict[spec.target]))
        else:
            values.append(mode.from_tensor(exported.constants[spec.target]))
    exported.graph_module.recompile()
    with mode, torch.no_grad(), tracing():
        _WidthFixer(exported.graph_module).run(*values)


# ---------------------------------------------------------------------------------------------------- norm fusion

def stream_width(program: Program) -> int:
    """Width of the residual stream: the input width of the first linear that reads it."""
    return int(program.linear(program.structure.sublayers[0].readers[0]).in_features)


def find_norms(program: Program, exported: ExportedProgram) -> list[NormSite]:
    """The norm in front of every linear that reads the stream (the sublayers' readers and the lm_head), one site per
    norm with the linears it feeds: a parallel block may read the stream through one norm per branch."""
    nodes = {n.name: n for n in exported.graph.nodes}
    structure = program.structure
    sites: dict[fx.Node, NormSite] = {}
    for name in [n for sub in structure.sublayers for n in sub.readers] + [structure.lm_head]:
        node = nodes[program.linear(name).node]
        x = through(node.args[1] if op_name(node) == "addmm" else node.args[0])
        if x not in sites:
            sites[x] = _norm_site(exported, x, name)
        sites[x].readers.append(name)
    return list(sites.values())


def check_fusable(program: Program) -> None:
    """Raise NormNotFusable, before any work, when SliceGPT cannot make this model's norms scale-free exactly: a norm
    after a sublayer (before its residual add) measures the full-width output, so no rotation and slicing of the
    stream commutes with it; any other norm form is named by ``find_norms``."""
    for sub in program.structure.sublayers:
        if sub.post_norm:
            raise NormNotFusable(
                f"slicegpt cannot slice this model: {sub.post_norm} normalizes the output of block {sub.block}'s "
                f"{sub.kind} sublayer before the residual add (a post-sublayer norm, as in Gemma 2/3 and OLMo 2); it "
                "measures the full-width output, so rotating and slicing the stream would change what it computes. "
                "Use a masking method (magnitude, wanda, sparsegpt) or shortgpt on this model")
    find_norms(program, program.exported)


def _norm_site(exported: ExportedProgram, node: fx.Node, reader: str) -> NormSite:
    op = op_name(node)
    if op == "layer_norm":
        x, _shape, w, b, eps = (list(node.args) + [None, None, 1e-5])[:5]
        return NormSite("layernorm", node, x, param_of(exported, w), param_of(exported, b), float(eps))
    if op == "getitem" and op_name(node.args[0]) == "native_layer_norm":
        x, _shape, w, b, eps = node.args[0].args
        return NormSite("layernorm", node, x, param_of(exported, w), param_of(exported, b), float(eps))
    if op == "mul":
        for scale, other in (node.args, tuple(reversed(node.args))):
            weight, offset = _scale_param(exported, scale)
            site = _rms_core(through(other)) if weight else None
            if site is not None:
                x, mean, eps = site
                return NormSite("rmsnorm", node, x, weight, None, eps, mean=mean, normalized=other, offset=offset)
    if op == "mul" and _rms_core(node) is not None:  # already scale-free
        x, mean, eps = _rms_core(node)
        return NormSite("rmsnorm", node, x, None, None, eps, mean=mean, normalized=node)
    raise NormNotFusable(f"cannot fuse the norm in front of {reader}: it reads {node.name} ({op}), which is neither a "
                         "LayerNorm nor an RMSNorm of the form x * rsqrt(mean(x^2) + eps) * weight; SliceGPT needs "
                         "norms it can make scale-free")


def _scale_param(exported: ExportedProgram, node) -> tuple[str | None, float]:
    """(parameter, offset) when ``node`` is a norm's scale: a parameter, or a parameter plus a constant (1 + weight)."""
    if not isinstance(node, fx.Node):
        return None, 0.0
    node = through(node)
    if param_of(exported, node):
        return param_of(exported, node), 0.0
    if op_name(node) == "add" and len(node.args) == 2:
        for p, c in (node.args, tuple(reversed(node.args))):
            weight = param_of(exported, through(p)) if isinstance(p, fx.Node) else None
            if weight and isinstance(c, (int, float)):
                return weight, float(c)
    return None, 0.0


def _rms_core(node: fx.Node) -> tuple[fx.Node, fx.Node, float] | None:
    """For ``x * rsqrt(mean(x^2, -1) + eps)`` (or sum * c for an already fused norm): (x, mean node, eps)."""
    if op_name(node) != "mul" or len(node.args) != 2:
        return None
    for x, r in (node.args, reversed(node.args)):
        if isinstance(r, fx.Node) and op_name(r) == "rsqrt":
            add = r.args[0]
            if op_name(add) != "add" or not isinstance(add.args[1], float):
                continue
            mean = add.args[0]
            if op_name(mean) in ("mean", "mul") and isinstance(mean.args[0], fx.Node):
                pw = mean.args[0] if op_name(mean) == "mean" else mean.args[0].args[0]
                if op_name(pw) == "pow" and through(pw.args[0]) is through(x):
                    return x, mean, float(add.args[1])
    return None


def fuse_norms(program: Program) -> Program:
    """A new program whose norms are scale-free RMSNorms over the original width; the function is unchanged."""
    exported = copy_program(program.exported)
    store = program.store.fork()
    graph = exported.graph
    structure = program.structure
    sites = find_norms(program, exported)
    nodes = {n.name: n for n in graph.nodes}
    width = stream_width(program)

    if structure.tied_embedding:  # separate parameters before anything is folded into the head
        _untie(structure, exported, store, nodes)

    with torch.no_grad():
        for site in sites:
            gamma = store.get(site.weight, torch.float64) + site.offset if site.weight else None
            beta = store.get(site.bias, torch.float64) if site.bias else None
            for name in site.readers:
                lin = structure.linears[name]
                node = nodes[lin.node]
                param = param_of(exported, node.args[-1] if op_name(node) in ("addmm", "mm") else node.args[1])
                w_oi = _oriented(store.get(param), lin.weight_layout)
                if beta is not None and bool(beta.abs().max() > 0):
                    shift = _by_rows(w_oi, lambda w: w @ beta, torch.float64)
                    if lin.bias is None:
                        if op_name(node) != "linear":
                            raise NormNotFusable(f"cannot fold the norm bias into {name}: it has no bias to add to")
                        new = add_parameter(exported, store, WRAPPER_PREFIX + name + ".bias", shift)
                        node.args = (node.args[0], node.args[1], new)
                    else:
                        store.set(lin.bias, store.get(lin.bias, torch.float64) + shift)
                if gamma is not None:
                    scaled = _by_rows(w_oi, lambda w: w * gamma[None, :], store.dtype_for(param, torch.float32))
                    store.set(param, _oriented(scaled, lin.weight_layout))
        if any(site.kind == "layernorm" for site in sites):
            _center_writers(program, exported, store)
        for site in sites:
            _make_scale_free(graph, site, width)
    fused = rebuild(exported, store)  # the new nodes carry their own values (graph_edit.call): no retrace
    log.info("fused %d norms (%s)", len(sites), ", ".join(sorted({s.kind for s in sites})))
    return program.derive(fused, store)


ROWS = 1024  # rows per float64 chunk: no weight (a vocabulary-sized one least) exists whole in float64


def _by_rows(matrix: torch.Tensor, fn, dtype: torch.dtype) -> torch.Tensor:
    """``fn`` applied to float64 chunks of ``ROWS`` rows of ``matrix``, the results stacked in ``dtype``."""
    out = None
    for start in range(0, matrix.shape[0], ROWS):
        part = fn(matrix[start:start + ROWS].double())
        if out is None:
            out = torch.empty((matrix.shape[0], *part.shape[1:]), dtype=dtype)
        out[start:start + part.shape[0]] = part
    return out


def _oriented(matrix: torch.Tensor, layout: str) -> torch.Tensor:
    """[out, in] from a stored weight, or back (GPT-2's Conv1D stores [in, out]); the map is its own inverse."""
    return matrix.t() if layout == "in_out" else matrix


def _untie(structure, exported: ExportedProgram, store: WeightStore, nodes: dict[str, fx.Node]) -> None:
    """Give the lm_head and the embedding it shares its matrix with one parameter each, each under its own name (the
    new one starts as the same tensor in the store; they part when one is rewritten)."""
    head = structure.linears[structure.lm_head]
    shared = head.weight
    head_target = WRAPPER_PREFIX + structure.lm_head + ".weight"
    placeholder = next(n for n in exported.graph.nodes if n.op == "placeholder" and param_of(exported, n) == shared)
    if shared != head_target:
        users = [nodes[head.node]]
        new = add_parameter(exported, store, head_target, shared)
    else:
        embed = next(name for name, param in structure.embeddings.items() if param == shared)
        users = [u for u in placeholder.users if u is not nodes[head.node]]
        new = add_parameter(exported, store, WRAPPER_PREFIX + embed + ".weight", shared)
    for user in users:
        user.replace_input_with(placeholder, new)
    log.info("untied the lm_head from the embedding (the two ends of the stream get different rotations)")


def _center_writers(program: Program, exported: ExportedProgram, store: WeightStore) -> None:
    """Make every contribution to the stream zero-mean across features, so a LayerNorm's mean subtraction is a no-op."""
    structure = program.structure
    embeddings = {param_of(exported, n.args[0]) for n in exported.graph.nodes
                  if n.op == "call_function" and op_name(n) == "embedding"}
    for param in sorted(p for p in embeddings if p):
        centered = _by_rows(store.get(param), lambda e: e - e.mean(dim=1, keepdim=True),
                            store.dtype_for(param, torch.float32))
        store.set(param, centered)
    for sub in structure.sublayers:
        for name in sub.writers:
            lin = structure.linears[name]
            w_oi = _oriented(store.get(lin.weight, torch.float64), lin.weight_layout)
            store.set(lin.weight, _oriented(w_oi - w_oi.mean(dim=0, keepdim=True), lin.weight_layout))
            if lin.bias:
                b = store.get(lin.bias, torch.float64)
                store.set(lin.bias, b - b.mean())


def _make_scale_free(graph: fx.Graph, site: NormSite, width: int) -> None:
    """Replace the norm by x * rsqrt(sum(x^2) / width + eps), the divisor fixed to the unsliced width."""
    if site.kind == "rmsnorm":
        mean = site.mean
        with graph.inserting_before(mean):
            pw = mean.args[0] if op_name(mean) == "mean" else mean.args[0].args[0]
            total = call(graph, aten.sum.dim_IntList, (pw, [-1], True), mean)
            scaled = call(graph, aten.mul.Tensor, (total, 1.0 / width), mean)
        mean.replace_all_uses_with(scaled)
        if site.normalized is not site.output:
            site.output.replace_all_uses_with(site.normalized)
        return
    out = site.output
    with graph.inserting_after(out):
        pw = call(graph, aten.pow.Tensor_Scalar, (site.stream, 2), out)
    with graph.inserting_after(pw):
        total = call(graph, aten.sum.dim_IntList, (pw, [-1], True), out)
    with graph.inserting_after(total):
        scaled = call(graph, aten.mul.Tensor, (total, 1.0 / width), out)
    with graph.inserting_after(scaled):
        shifted = call(graph, aten.add.Tensor, (scaled, site.eps), out)
    with graph.inserting_after(shifted):
        inv = call(graph, aten.rsqrt.default, (shifted,), out)
    with graph.inserting_after(inv):
        normed = call(graph, aten.mul.Tensor, (site.stream, inv), out)
    out.replace_all_uses_with(normed)


# ---------------------------------------------------------------------------------------------------- stream points

def stream_points(program: Program, exported: ExportedProgram) -> list[fx.Node]:
    """The stream entering block 0, then the output of every residual add, in order (sublayer i reads point i and
    writes point i + 1)."""
    nodes = {n.name: n for n in exported.graph.nodes}
    weights = {s.arg.name for s in exported.graph_signature.input_specs if s.target is not None}
    bounds = block_boundaries(list(exported.graph.nodes), program.structure, is_weight=lambda n: n.name in weights)
    return [bounds.streams[0]] + [nodes[name] for name in program.structure.residual_adds]


def with_projections(fused: Program) -> tuple[Program, list[str]]:
    """``fused`` with a [D, D] matrix (identity, float32) applied at each stream point, and the matrices' store names
    in point order: setting one (``set_parameter``) changes what the program computes from then on. The program keeps
    ``fused``'s structure (the projections are not layers of the model)."""
    exported = copy_program(fused.exported)
    store = fused.store.fork()
    graph = exported.graph
    points = stream_points(fused, exported)
    width = int(points[0].meta["val"].shape[-1])
    names = []
    for i, point in enumerate(points):
        name = f"{WRAPPER_PREFIX}stream_projection_{i}"
        identity = torch.eye(width) if not names else names[0]  # one identity in memory, aliased until set
        node = add_parameter(exported, store, name, identity, dtype=torch.float32)
        names.append(name)
        users = [u for u in point.users if op_name(u) != "_assert_tensor_metadata"]
        with graph.inserting_after(point):
            proj = call(graph, aten.linear.default, (point, node), point)
        for user in users:
            user.replace_input_with(point, proj)
    exported.graph_module.recompile()
    return dataclasses.replace(fused, exported=exported, store=store), names


# ---------------------------------------------------------------------------------------------------- rotate and slice

def align_bases(bases: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The same subspaces with each basis turned to be as close as possible to the one before it.

    The sliced function depends only on the subspace kept at each point, not on the basis chosen inside it, so each
    basis B_i = Q_i R_i takes the rotation R_i (orthogonal Procrustes) that brings it nearest to B_{i-1}: shortcut
    matrices B_{i-1}^T B_i become as close to identity as the subspaces allow, and exactly identity where the subspace
    does not change (no slicing), so none is inserted there and rotation-only runs carry no extra rounding.
    """
    aligned = [bases[0].double()]
    for q in list(bases)[1:]:
        aligned.append(align_to(q, aligned[-1]))
    return aligned


def align_to(q: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Basis ``q`` [D, d] turned (orthogonal Procrustes) to be nearest ``prev`` [D, d'] (see align_bases)."""
    q = q.double()
    m = q.t() @ prev.double()  # [d_i, d_{i-1}]
    if m.shape[1] < m.shape[0]:  # a wider point than the one before: only its first columns have a partner
        m = torch.cat([m, torch.zeros(m.shape[0], m.shape[0] - m.shape[1], dtype=m.dtype)], dim=1)
    u, _, vh = torch.linalg.svd(m[:, :m.shape[0]])
    return q @ (u @ vh)


class StoredBases(Sequence):
    """The bases of a run's stream points kept in a weight store (float64; spilled past the store's budget like any
    tensor) and read one at a time: a deep model's bases would otherwise grow with its depth."""

    def __init__(self, store: WeightStore, prefix: str = "__slicegpt_basis_"):
        self.store, self.prefix, self.names = store, prefix, []

    def append(self, basis: torch.Tensor) -> None:
        name = f"{self.prefix}{len(self.names)}"
        self.store.set(name, basis, dtype=torch.float64)
        self.names.append(name)

    def align(self) -> None:
        """Turn every basis after the first to be nearest the one before it, in place (see align_bases)."""
        prev = self[0]
        for i in range(1, len(self)):
            prev = align_to(self[i], prev)
            self.store.set(self.names[i], prev, dtype=torch.float64)

    def width(self, i: int) -> int:
        return int(self.store.shape(self.names[i])[1])

    def __getitem__(self, i):
        return self.store.get(self.names[i])

    def __len__(self) -> int:
        return len(self.names)


def rotate_and_slice(fused: Program, bases: list[torch.Tensor], in_place: bool = False) -> Program:
    """The sliced program: point i carried as x_i @ bases[i] (see the module docstring).

    ``bases`` are [D, d_i] matrices with orthonormal columns (float64), one per stream point (a list, or StoredBases
    read one at a time). Where consecutive bases are the same (the shortcut would be the identity), no shortcut matrix
    is inserted. ``in_place``: ``fused`` is an intermediate nobody uses afterwards, so its store is rewritten rather
    than forked, and each fused weight is freed as soon as its sliced one replaces it (peak memory: one copy of the
    edited weights, not two).
    """
    structure = fused.structure
    exported = copy_program(fused.exported)
    store = fused.store if in_place else fused.store.fork()
    graph = exported.graph
    points = stream_points(fused, exported)
    if len(bases) != len(points):
        raise ValueError(f"expected {len(points)} bases (one per stream point), got {len(bases)}")
    nodes = {n.name: n for n in graph.nodes}
    widths = [bases.width(i) if isinstance(bases, StoredBases) else int(bases[i].shape[1]) for i in range(len(bases))]
    cache: dict[int, torch.Tensor] = {}

    def basis(i: int) -> torch.Tensor:
        """Basis i in float64, read once (the sublayer loop needs two consecutive ones at a time)."""
        if i not in cache:
            if len(cache) > 1:
                cache.pop(min(cache))
            cache[i] = bases[i].double()
        return cache[i]

    def put(param: str, value: torch.Tensor) -> None:
        store.set(param, value.contiguous())
        exported.state_dict[param] = meta_like(value)

    def rows_times(param: str, rows: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``rows @ q`` (``rows`` holds ``param``'s values), in float64 chunks of rows, kept in ``param``'s dtype.
        Room for the result and for ``param`` read from disk is made first: a vocabulary-sized matrix on top of a
        full budget was the pass's peak."""
        out_bytes = rows.shape[0] * q.shape[1] * torch.empty((), dtype=store.dtype_for(param, q.dtype)).element_size()
        store.make_room(out_bytes + rows.numel() * rows.element_size())
        return _by_rows(rows, lambda w: w @ q, store.dtype_for(param, q.dtype))

    def rotate(name: str, q_in: torch.Tensor | None = None, q_out: torch.Tensor | None = None) -> None:
        """A linear read from the stream gets ``W @ q_in``, one writing to it ``q_out^T @ W`` ([out, in] W)."""
        lin = structure.linears[name]
        w_oi = _oriented(store.get(lin.weight), lin.weight_layout)
        rotated = rows_times(lin.weight, w_oi, q_in) if q_in is not None else \
            rows_times(lin.weight, w_oi.t(), q_out).t()  # (q^T W)^T = W^T q: W's columns as rows
        put(lin.weight, _oriented(rotated, lin.weight_layout))

    shortcuts = 0
    with torch.no_grad():
        for param in structure.embeddings.values():
            put(param, rows_times(param, store.get(param), basis(0)))
        progress = Progress("rotate and slice", len(structure.sublayers), "sublayers", every_s=10.0)
        for i, sub in enumerate(structure.sublayers):
            progress.update(i)  # minutes on a billion parameters: each weight read, rotated in float64 and written
            for name in sub.readers:
                rotate(name, q_in=basis(i))
            for name in sub.writers:
                rotate(name, q_out=basis(i + 1))
                bias = structure.linears[name].bias
                if bias:
                    put(bias, store.get(bias, torch.float64) @ basis(i + 1))
            s = basis(i).t() @ basis(i + 1)  # z_{i+1} = z_i @ S
            if s.shape[0] == s.shape[1] and bool((s - torch.eye(s.shape[0], dtype=s.dtype)).abs().max() < 1e-9):
                continue
            add = nodes[structure.residual_adds[i]]
            stream = stream_operand(add)
            block = structure.blocks[sub.block]
            param = add_parameter(exported, store, f"{WRAPPER_PREFIX}{block}.{sub.kind}_shortcut.weight", s.t())
            with graph.inserting_before(add):
                node = call(graph, aten.linear.default, (stream, param), add, infer=False)  # retraced below
            add.replace_input_with(stream, node)
            shortcuts += 1
        rotate(structure.lm_head, q_in=basis(len(bases) - 1))
        progress.update(len(structure.sublayers))
    _fix_widths(exported)
    sliced = rebuild(exported, store, retrace=True)
    origin = dict(fused.origin)
    origin["sliced_widths"] = list(widths)
    log.info("rotated and sliced the stream to widths %s with %d shortcut matrices", sorted(set(widths)), shortcuts)
    return fused.derive(sliced, store, origin=origin)
