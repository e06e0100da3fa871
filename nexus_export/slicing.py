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
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec

from .errors import UserError
from .naming import WRAPPER_PREFIX
from .program import Program
from .structure import through, block_boundaries, op_name, read_structure
from .surgery import stream_operand

log = logging.getLogger(__name__)

aten = torch.ops.aten
VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


class NormNotFusable(UserError):
    """A norm whose scale cannot be folded into the linears after it (an unknown norm form)."""


@dataclass
class NormSite:
    """One norm in the graph: its output node, what it reads from the stream, its parameters."""

    kind: str  # "layernorm" or "rmsnorm"
    output: fx.Node  # the node the readers consume (the scaled output)
    stream: fx.Node  # the value normalized
    weight: str | None  # parameter names (state_dict keys)
    bias: str | None
    eps: float
    mean: fx.Node | None = None  # rmsnorm: the mean(x^2) node
    normalized: fx.Node | None = None  # rmsnorm: the value before the scale


# ---------------------------------------------------------------------------------------------------- graph helpers

def _params(exported: ExportedProgram) -> dict[str, str]:
    """Placeholder name -> parameter/buffer name."""
    sig = exported.graph_signature
    return {**sig.inputs_to_parameters, **sig.inputs_to_buffers}


def _param_of(exported: ExportedProgram, arg) -> str | None:
    if isinstance(arg, fx.Node) and arg.op == "placeholder":
        return _params(exported).get(arg.name)
    return None


def _add_parameter(exported: ExportedProgram, target: str, value: torch.Tensor) -> fx.Node:
    """A new parameter placeholder (after the existing ones) with its signature entry and state."""
    graph = exported.graph
    specs = exported.graph_signature.input_specs
    last = max(i for i, s in enumerate(specs) if s.kind == InputKind.PARAMETER)
    anchor = next(n for n in graph.nodes if n.op == "placeholder" and n.name == specs[last].arg.name)
    taken = {n.name for n in graph.nodes}
    name = base = "p_" + target.replace(".", "_")
    suffix = 0
    while name in taken:
        suffix += 1
        name = f"{base}_{suffix}"
    with graph.inserting_after(anchor):
        node = graph.placeholder(name)
    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])
    node.meta["val"] = fake_mode.from_tensor(value, static_shapes=True) if fake_mode is not None else value
    specs.insert(last + 1, InputSpec(kind=InputKind.PARAMETER, arg=type(specs[last].arg)(name=node.name),
                                     target=target, persistent=None))
    exported.state_dict[target] = torch.nn.Parameter(value.detach().clone(), requires_grad=False)
    return node


def _call(graph: fx.Graph, target, args: tuple, like: fx.Node) -> fx.Node:
    node = graph.call_function(target, args)
    for key in ("val", "nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn"):  # val: refreshed by _rebuild
        if key in like.meta:
            node.meta[key] = like.meta[key]
    return node


def _rebuild(exported: ExportedProgram) -> ExportedProgram:
    """A fresh ExportedProgram after graph edits: unused parameters dropped, every node re-traced (fresh shapes)."""
    graph = exported.graph
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
    used = {n.name for n in graph.nodes if n.op == "placeholder" and n.users}
    specs, state, constants = [], {}, {}
    for spec in exported.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT and spec.arg.name not in used:
            graph.erase_node(next(n for n in graph.nodes if n.op == "placeholder" and n.name == spec.arg.name))
            continue
        specs.append(spec)
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target in exported.state_dict:
            state[spec.target] = exported.state_dict[spec.target]
        elif spec.target in exported.constants:
            constants[spec.target] = exported.constants[spec.target]
    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])
    targets = {s.arg.name: s.target for s in specs if s.kind in (InputKind.PARAMETER, InputKind.BUFFER)}
    for node in graph.nodes:  # parameter placeholders carry the shapes the parameters have now
        value = state.get(targets.get(node.name))
        if value is not None and tuple(node.meta["val"].shape) != tuple(value.shape):
            node.meta["val"] = fake_mode.from_tensor(value, static_shapes=True)
    exported.graph_module.recompile()
    edited = ExportedProgram(
        root=exported.graph_module, graph=graph,
        graph_signature=ExportGraphSignature(input_specs=specs, output_specs=exported.graph_signature.output_specs),
        state_dict=state, range_constraints=exported.range_constraints, module_call_graph=exported.module_call_graph,
        example_inputs=exported.example_inputs, constants=constants, verifiers=exported.verifiers,
    )
    return edited.run_decompositions({})


def _flat_inputs(exported: ExportedProgram, user: tuple) -> list:
    """The lifted graph's arguments: parameters, buffers and constants from the program, then ``user``."""
    values, it = [], iter(user)
    for spec in exported.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            values.append(next(it))
        elif spec.target in exported.state_dict:
            values.append(exported.state_dict[spec.target])
        else:
            values.append(exported.constants[spec.target])
    return values


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
    ids = torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad():
        _WidthFixer(exported.graph_module).run(*_flat_inputs(exported, (ids, torch.ones_like(ids))))


# ---------------------------------------------------------------------------------------------------- norm fusion

def stream_width(program: Program) -> int:
    """Width of the residual stream: the input width of the first linear that reads it."""
    return int(program.linear(program.structure.sublayers[0].readers[0]).in_features)


def find_norms(program: Program, exported: ExportedProgram) -> dict[str, NormSite]:
    """The norm in front of each sublayer's readers and the lm_head, keyed by the first reader's linear name."""
    nodes = {n.name: n for n in exported.graph.nodes}
    groups = [list(sub.readers) for sub in program.structure.sublayers] + [[program.structure.lm_head]]
    sites: dict[str, NormSite] = {}
    for readers in groups:
        lin = program.linear(readers[0])
        node = nodes[lin.node]
        x = node.args[1] if op_name(node) == "addmm" else node.args[0]
        sites[readers[0]] = _norm_site(exported, through(x), readers[0])
    return sites


def _norm_site(exported: ExportedProgram, node: fx.Node, reader: str) -> NormSite:
    op = op_name(node)
    if op == "layer_norm":
        x, _shape, w, b, eps = (list(node.args) + [None, None, 1e-5])[:5]
        return NormSite("layernorm", node, x, _param_of(exported, w), _param_of(exported, b), float(eps))
    if op == "getitem" and op_name(node.args[0]) == "native_layer_norm":
        x, _shape, w, b, eps = node.args[0].args
        return NormSite("layernorm", node, x, _param_of(exported, w), _param_of(exported, b), float(eps))
    if op == "mul":
        a, b = node.args
        weight, other = (a, b) if _param_of(exported, a) else (b, a)
        if _param_of(exported, weight):
            inner = through(other)
            site = _rms_core(inner)
            if site is not None:
                x, mean, eps = site
                return NormSite("rmsnorm", node, x, _param_of(exported, weight), None, eps, mean=mean,
                                normalized=other)
    if op == "mul" and _rms_core(node) is not None:  # already scale-free
        x, mean, eps = _rms_core(node)
        return NormSite("rmsnorm", node, x, None, None, eps, mean=mean, normalized=node)
    raise NormNotFusable(f"cannot fuse the norm in front of {reader}: it reads {node.name} ({op}), which is neither a "
                         "LayerNorm nor an RMSNorm of the form x * rsqrt(mean(x^2) + eps) * weight; SliceGPT needs "
                         "norms it can make scale-free")


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
    exported = copy.deepcopy(program.exported)
    graph, state = exported.graph, exported.state_dict
    structure = program.structure
    sites = find_norms(program, exported)
    nodes = {n.name: n for n in graph.nodes}
    width = stream_width(program)

    if structure.tied_embedding:  # separate copies before anything is folded into the head
        _untie(structure, exported, nodes)

    def matrix(name: str) -> tuple[torch.Tensor, str, str | None, fx.Node]:
        lin = structure.linears[name]
        node = nodes[lin.node]
        weight = _param_of(exported, node.args[-1] if op_name(node) in ("addmm", "mm") else node.args[1])
        bias = lin.bias
        return state[weight], lin.weight_layout, bias, node

    with torch.no_grad():
        groups = {sub.readers[0]: sub.readers for sub in structure.sublayers}
        groups[structure.lm_head] = (structure.lm_head,)
        for first, site in sites.items():
            gamma = state[site.weight].double() if site.weight else None
            beta = state[site.bias].double() if site.bias else None
            for name in groups[first]:
                w, layout, bias, node = matrix(name)
                w_oi = (w.t() if layout == "in_out" else w).double()
                if beta is not None and bool(beta.abs().max() > 0):
                    shift = w_oi @ beta
                    if bias is None:
                        if op_name(node) != "linear":
                            raise NormNotFusable(f"cannot fold the norm bias into {name}: it has no bias to add to")
                        new = _add_parameter(exported, WRAPPER_PREFIX + name + ".bias", shift.float())
                        node.args = (node.args[0], node.args[1], new)
                    else:
                        state[bias].copy_((state[bias].double() + shift).to(state[bias].dtype))
                if gamma is not None:
                    w_oi = w_oi * gamma[None, :]
                    w.copy_((w_oi.t() if layout == "in_out" else w_oi).to(w.dtype))
        if any(site.kind == "layernorm" for site in sites.values()):
            _center_writers(program, exported)
        for site in sites.values():
            _make_scale_free(graph, site, width)
    fused = _rebuild(exported)
    log.info("fused %d norms (%s)", len(sites), ", ".join(sorted({s.kind for s in sites.values()})))
    return Program(exported=fused, structure=read_structure(fused), tokenizer=program.tokenizer,
                   config=program.config, name=program.name, origin=dict(program.origin))


def _untie(structure, exported: ExportedProgram, nodes: dict[str, fx.Node]) -> None:
    """Give the lm_head and the embedding it shares its matrix with one parameter each, each under its own name."""
    head = structure.linears[structure.lm_head]
    shared = head.weight
    head_target = WRAPPER_PREFIX + structure.lm_head + ".weight"
    placeholder = next(n for n in exported.graph.nodes if n.op == "placeholder" and _param_of(exported, n) == shared)
    if shared != head_target:
        users = [nodes[head.node]]
        new = _add_parameter(exported, head_target, exported.state_dict[shared])
    else:
        embed = next(name for name, param in structure.embeddings.items() if param == shared)
        users = [u for u in placeholder.users if u is not nodes[head.node]]
        new = _add_parameter(exported, WRAPPER_PREFIX + embed + ".weight", exported.state_dict[shared])
    for user in users:
        user.replace_input_with(placeholder, new)
    log.info("untied the lm_head from the embedding (the two ends of the stream get different rotations)")


def _center_writers(program: Program, exported: ExportedProgram) -> None:
    """Make every contribution to the stream zero-mean across features, so a LayerNorm's mean subtraction is a no-op."""
    state = exported.state_dict
    structure = program.structure
    embeddings = {_param_of(exported, n.args[0]) for n in exported.graph.nodes
                  if n.op == "call_function" and op_name(n) == "embedding"}
    for param in sorted(p for p in embeddings if p):
        e = state[param]
        e.copy_((e.double() - e.double().mean(dim=1, keepdim=True)).to(e.dtype))
    for sub in structure.sublayers:
        for name in sub.writers:
            lin = structure.linears[name]
            w = state[lin.weight]
            w_oi = (w.t() if lin.weight_layout == "in_out" else w).double()
            w_oi = w_oi - w_oi.mean(dim=0, keepdim=True)
            w.copy_((w_oi.t() if lin.weight_layout == "in_out" else w_oi).to(w.dtype))
            if lin.bias:
                b = state[lin.bias]
                b.copy_((b.double() - b.double().mean()).to(b.dtype))


def _make_scale_free(graph: fx.Graph, site: NormSite, width: int) -> None:
    """Replace the norm by x * rsqrt(sum(x^2) / width + eps), the divisor fixed to the unsliced width."""
    if site.kind == "rmsnorm":
        mean = site.mean
        with graph.inserting_before(mean):
            pw = mean.args[0] if op_name(mean) == "mean" else mean.args[0].args[0]
            total = _call(graph, aten.sum.dim_IntList, (pw, [-1], True), mean)
            scaled = _call(graph, aten.mul.Tensor, (total, 1.0 / width), mean)
        mean.replace_all_uses_with(scaled)
        if site.normalized is not site.output:
            site.output.replace_all_uses_with(site.normalized)
        return
    out = site.output
    with graph.inserting_after(out):
        pw = _call(graph, aten.pow.Tensor_Scalar, (site.stream, 2), out)
    with graph.inserting_after(pw):
        total = _call(graph, aten.sum.dim_IntList, (pw, [-1], True), out)
    with graph.inserting_after(total):
        scaled = _call(graph, aten.mul.Tensor, (total, 1.0 / width), out)
    with graph.inserting_after(scaled):
        shifted = _call(graph, aten.add.Tensor, (scaled, site.eps), out)
    with graph.inserting_after(shifted):
        inv = _call(graph, aten.rsqrt.default, (shifted,), out)
    with graph.inserting_after(inv):
        normed = _call(graph, aten.mul.Tensor, (site.stream, inv), out)
    out.replace_all_uses_with(normed)


# ---------------------------------------------------------------------------------------------------- stream points

def stream_points(program: Program, exported: ExportedProgram) -> list[fx.Node]:
    """The stream entering block 0, then the output of every residual add, in order (sublayer i reads point i and
    writes point i + 1)."""
    nodes = {n.name: n for n in exported.graph.nodes}
    weights = set(_params(exported)) | set(exported.graph_signature.inputs_to_lifted_tensor_constants)
    bounds = block_boundaries(list(exported.graph.nodes), program.structure, is_weight=lambda n: n.name in weights)
    return [bounds.streams[0]] + [nodes[name] for name in program.structure.residual_adds]


def with_projections(fused: Program) -> tuple[Program, list[torch.Tensor]]:
    """A copy of ``fused`` with a [D, D] matrix (identity) applied at each stream point; the matrices are returned
    in point order and are shared with the program, so setting one changes what the program computes."""
    exported = copy.deepcopy(fused.exported)
    graph = exported.graph
    points = stream_points(fused, exported)
    width = int(points[0].meta["val"].shape[-1])
    matrices = []
    for i, point in enumerate(points):
        node = _add_parameter(exported, f"{WRAPPER_PREFIX}stream_projection_{i}", torch.eye(width))
        matrices.append(exported.state_dict[f"{WRAPPER_PREFIX}stream_projection_{i}"])
        users = [u for u in point.users if op_name(u) != "_assert_tensor_metadata"]
        with graph.inserting_after(point):
            proj = _call(graph, aten.linear.default, (point, node), point)
        for user in users:
            user.replace_input_with(point, proj)
    exported.graph_module.recompile()
    program = Program(exported=exported, structure=fused.structure, tokenizer=fused.tokenizer, config=fused.config,
                      name=fused.name, origin=dict(fused.origin))
    return program, matrices


# ---------------------------------------------------------------------------------------------------- rotate and slice

def align_bases(bases: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same subspaces with each basis turned to be as close as possible to the one before it.

    The sliced function depends only on the subspace kept at each point, not on the basis chosen inside it, so each
    basis B_i = Q_i R_i takes the rotation R_i (orthogonal Procrustes) that brings it nearest to B_{i-1}: shortcut
    matrices B_{i-1}^T B_i become as close to identity as the subspaces allow, and exactly identity where the subspace
    does not change (no slicing), so none is inserted there and rotation-only runs carry no extra rounding.
    """
    aligned = [bases[0].double()]
    for q in bases[1:]:
        q = q.double()
        prev = aligned[-1]
        m = q.t() @ prev  # [d_i, d_{i-1}]
        if m.shape[1] < m.shape[0]:  # a wider point than the one before: only its first columns have a partner
            m = torch.cat([m, torch.zeros(m.shape[0], m.shape[0] - m.shape[1], dtype=m.dtype)], dim=1)
        u, _, vh = torch.linalg.svd(m[:, :m.shape[0]])
        aligned.append(q @ (u @ vh))
    return aligned


def rotate_and_slice(fused: Program, bases: list[torch.Tensor]) -> Program:
    """The sliced program: point i carried as x_i @ bases[i] (see the module docstring).

    ``bases`` are [D, d_i] matrices with orthonormal columns (float64), one per stream point. Where consecutive bases
    are the same (the shortcut would be the identity), no shortcut matrix is inserted.
    """
    structure = fused.structure
    exported = copy.deepcopy(fused.exported)
    graph, state = exported.graph, exported.state_dict
    points = stream_points(fused, exported)
    if len(bases) != len(points):
        raise ValueError(f"expected {len(points)} bases (one per stream point), got {len(bases)}")
    nodes = {n.name: n for n in graph.nodes}
    q = [b.double() for b in bases]
    widths = [int(b.shape[1]) for b in bases]

    def set_matrix(name: str, w_oi: torch.Tensor) -> None:
        lin = structure.linears[name]
        old = state[lin.weight]
        new = (w_oi.t() if lin.weight_layout == "in_out" else w_oi).contiguous().to(old.dtype)
        state[lin.weight] = torch.nn.Parameter(new, requires_grad=False)

    def matrix(name: str) -> torch.Tensor:
        lin = structure.linears[name]
        w = state[lin.weight]
        return (w.t() if lin.weight_layout == "in_out" else w).double()

    shortcuts = 0
    with torch.no_grad():
        for param in structure.embeddings.values():
            state[param] = torch.nn.Parameter((state[param].double() @ q[0]).to(state[param].dtype), requires_grad=False)
        for i, sub in enumerate(structure.sublayers):
            for name in sub.readers:
                set_matrix(name, matrix(name) @ q[i])
            for name in sub.writers:
                set_matrix(name, q[i + 1].t() @ matrix(name))
                bias = structure.linears[name].bias
                if bias:
                    state[bias] = torch.nn.Parameter((state[bias].double() @ q[i + 1]).to(state[bias].dtype),
                                                     requires_grad=False)
            s = q[i].t() @ q[i + 1]  # z_{i+1} = z_i @ S
            if s.shape[0] == s.shape[1] and bool((s - torch.eye(s.shape[0], dtype=s.dtype)).abs().max() < 1e-9):
                continue
            add = nodes[structure.residual_adds[i]]
            stream = stream_operand(add)
            block = structure.blocks[sub.block]
            shortcut = s.t().float()  # as linear(z, S^T)
            param = _add_parameter(exported, f"{WRAPPER_PREFIX}{block}.{sub.kind}_shortcut.weight", shortcut)
            with graph.inserting_before(add):
                node = _call(graph, aten.linear.default, (stream, param), add)
            add.replace_input_with(stream, node)
            shortcuts += 1
        head = structure.lm_head
        set_matrix(head, matrix(head) @ q[-1])
    _fix_widths(exported)
    sliced = _rebuild(exported)
    origin = dict(fused.origin)
    origin["sliced_widths"] = list(widths)
    log.info("rotated and sliced the stream to widths %s with %d shortcut matrices", sorted(set(widths)), shortcuts)
    return Program(exported=sliced, structure=read_structure(sliced), tokenizer=fused.tokenizer, config=fused.config,
                   name=fused.name, origin=origin)
