"""Structure of a captured causal LM, read from the graph: blocks, linears and their roles, residual stream, norms.

How roles are found (topology first, names never):
- Linears are the ops that multiply by a weight parameter (aten.linear, or addmm/mm with the weight as [in, out]).
- The residual stream is followed backwards from the lm_head: the last ``add`` whose one tensor operand is an ancestor
  of the other is a residual add; its ancestor operand is the stream before it, the other operand the sublayer output.
- A sublayer is everything between the stream and a residual add. It is attention when it holds a scaled-dot-product
  attention (or a softmax), otherwise an MLP. Its linears with no linear before them *read* the stream (``attn_in`` /
  ``mlp_in``); those with no linear after them *write* to it (``attn_out`` / ``mlp_out``).
- A sublayer holding attention and a branch without it side by side (GPT-J, GPT-NeoX, Phi: ``x + attn(n(x)) +
  mlp(n'(x))``) is "parallel": its linears take attention roles on the attention path and MLP roles on the other.
- The lm_head is the last linear on the path to the logits; elementwise post-processing after it (soft-capping
  ``tanh(x / c) * c``, a logit scale, casts) stays in the graph and is listed in ``head_postprocess``.
- Blocks are the entries of the repeated module list seen in ``nn_module_stack`` (the path component that is an index).
- A residual connection may carry a matrix (SliceGPT's shortcut: ``add(linear(stream), branch(stream))``); such a
  linear has the role ``shortcut`` and is not a pruning target.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch.fx import Node

from nexus_export.errors import UserError
from nexus_export.naming import layer_name

ROLES = ("attn_in", "attn_out", "mlp_in", "mlp_out", "lm_head")
SHORTCUT = "shortcut"  # a matrix on a residual connection (SliceGPT), not a pruning target
ATTENTION_OPS = {"scaled_dot_product_attention", "_softmax", "softmax", "_safe_softmax"}
# Ops that pass the residual stream through unchanged in value (dtype casts, views, eval-mode dropout, aliases).
PASS_THROUGH_OPS = {
    "to", "_to_copy", "alias", "clone", "contiguous", "dropout", "view", "reshape", "_unsafe_view",
    "_assert_tensor_metadata", "type_as", "detach",
}


class UnsupportedArchitecture(UserError):
    """The graph does not have the shape of a pre-norm or post-norm decoder stack this tool understands."""


@dataclass(frozen=True)
class Linear:
    """One weight-multiplying op. ``weight_layout`` is "out_in" (nn.Linear) or "in_out" (GPT-2's Conv1D, addmm/mm)."""

    name: str
    role: str
    block: int | None
    weight: str
    bias: str | None
    in_features: int
    out_features: int
    weight_layout: str
    node: str


@dataclass(frozen=True)
class Sublayer:
    kind: str  # "attention", "mlp", or "parallel" (attention and an MLP side by side on one residual add)
    block: int
    readers: tuple[str, ...]
    writers: tuple[str, ...]
    norm: str | None  # module name of the norm between the stream and the readers
    post_norm: str | None = None  # module name of a norm (or scale) between the writers and the residual add


@dataclass
class Structure:
    """What passes need to know about a captured model; every name is a user-facing module name."""

    linears: dict[str, Linear]
    blocks: list[str]  # module path of each decoder block, by index
    sublayers: list[Sublayer]
    embeddings: dict[str, str]  # module name -> weight parameter
    lm_head: str | None
    final_norm: str | None
    tied_embedding: bool
    block_list: str = ""  # module path of the repeated block list, e.g. "model.layers"
    residual_adds: list[str] = field(default_factory=list)
    head_postprocess: tuple[str, ...] = ()  # elementwise ops between the lm_head and the logits, e.g. (div, tanh, mul)

    def in_blocks(self) -> list[Linear]:
        """Every linear inside a decoder block, in graph order (the default pruning scope); shortcuts excluded."""
        return [lin for lin in self.linears.values() if lin.block is not None and lin.role != SHORTCUT]

    def by_role(self, role: str) -> list[Linear]:
        return [lin for lin in self.linears.values() if lin.role == role]

    def summary(self) -> dict:
        roles = {r: len(self.by_role(r)) for r in ROLES}
        return {
            "blocks": len(self.blocks),
            "block_list": self.block_list,
            "linears": len(self.linears),
            "roles": roles,
            "embeddings": sorted(self.embeddings),
            "lm_head": self.lm_head,
            "final_norm": self.final_norm,
            "tied_embedding": self.tied_embedding,
            "sublayer_kinds": sorted({s.kind for s in self.sublayers}),
            "post_norms": sum(1 for s in self.sublayers if s.post_norm),
            "head_postprocess": list(self.head_postprocess),
        }


# Where a multiplication by a weight keeps its input and its weight: aten.linear(x, W, b), addmm(b, x, W), mm(x, W)
LINEAR_INPUT_ARG = {"linear": 0, "addmm": 1, "mm": 0}
LINEAR_WEIGHT_ARG = {"linear": 1, "addmm": 2, "mm": 1}


def op_name(node: Node) -> str:
    """The short name of a call_function target (aten.linear.default -> "linear")."""
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _module_path(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path


def _block_of(node: Node) -> tuple[str, int] | None:
    """The outermost module-stack entry whose last path component is an index: (list path, index)."""
    for path, _type in (node.meta.get("nn_module_stack") or {}).values():
        m = re.fullmatch(r"(.+)\.(\d+)", path)
        if m:
            return m.group(1), int(m.group(2))
    return None


def _tensor_args(node: Node) -> list[Node]:
    return [a for a in node.args if isinstance(a, Node)]


def ancestors(node: Node, stop: set[Node] | None = None) -> set[Node]:
    """Every node ``node`` depends on (not descending past nodes in ``stop``)."""
    seen: set[Node] = set()
    todo = [node]
    while todo:
        cur = todo.pop()
        for inp in cur.all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                if stop is None or inp not in stop:
                    todo.append(inp)
    return seen


def through(node: Node) -> Node:
    """Follow pass-through ops back to the node that produced the value."""
    while node.op == "call_function" and op_name(node) in PASS_THROUGH_OPS and _tensor_args(node):
        node = _tensor_args(node)[0]
    return node


def read_structure(exported: torch.export.ExportedProgram) -> Structure:
    """Read blocks, linears with roles, embeddings, norms and the residual stream from an exported causal LM."""
    graph = exported.graph
    params = dict(exported.graph_signature.inputs_to_parameters)
    order = {n: i for i, n in enumerate(graph.nodes)}

    def param_of(arg) -> str | None:
        return params.get(arg.name) if isinstance(arg, Node) and arg.op == "placeholder" else None

    raw_linears, embeddings = _find_linears(graph, param_of, exported.state_dict)
    output_node = next(n for n in graph.nodes if n.op == "output")
    logits = output_node.args[0][0] if isinstance(output_node.args[0], (tuple, list)) else output_node.args[0]
    head, head_postprocess = _head_of(logits, raw_linears, param_of)
    residual, shortcuts = _residual_stream(head, raw_linears, order)
    roles, sublayers, block_paths, block_list = _sublayers(residual, raw_linears, param_of, order)
    roles[head] = ("lm_head", None)
    for lin in shortcuts:
        blk = _block_of(lin)
        roles[lin] = (SHORTCUT, blk[1] if blk else None)
    outside = [raw_linears[n]["weight"] for n in raw_linears if n not in roles]
    if outside:
        raise UnsupportedArchitecture(f"linears outside the decoder blocks other than the lm_head: {outside[:5]}")
    n_blocks = max(block_paths) + 1
    missing = [i for i in range(n_blocks) if i not in block_paths]
    if missing:
        raise UnsupportedArchitecture(f"decoder blocks {missing} have no residual connection the tool could follow")
    final_region = ancestors(head, stop={residual[-1][0]}) - (ancestors(residual[-1][0]) | {residual[-1][0]})
    return Structure(
        linears=_named_linears(raw_linears, roles, order),
        blocks=[layer_name(block_paths[i]) for i in range(n_blocks)],
        sublayers=sublayers,
        embeddings=embeddings,
        lm_head=layer_name(_module_path(head) + ".weight"),
        final_norm=_norm_module(final_region, param_of, order),
        tied_embedding=raw_linears[head]["weight"] in embeddings.values(),
        block_list=layer_name(block_list),
        residual_adds=[a.name for a, _, _ in residual],
        head_postprocess=head_postprocess,
    )


def _find_linears(graph, param_of, state) -> tuple[dict[Node, dict], dict[str, str]]:
    """Step 1: the ops that multiply by a weight parameter (with weight, bias, layout and sizes) and the embeddings."""
    raw_linears: dict[Node, dict] = {}
    embeddings: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        op = op_name(node)
        if op == "linear" and param_of(node.args[1]):
            weight = param_of(node.args[1])
            bias = param_of(node.args[2]) if len(node.args) > 2 else None
            out_f, in_f = state[weight].shape
            raw_linears[node] = dict(weight=weight, bias=bias, layout="out_in", in_f=in_f, out_f=out_f)
        elif op in ("addmm", "mm") and param_of(node.args[-1]):
            weight = param_of(node.args[-1])
            bias = param_of(node.args[0]) if op == "addmm" else None
            in_f, out_f = state[weight].shape
            raw_linears[node] = dict(weight=weight, bias=bias, layout="in_out", in_f=in_f, out_f=out_f)
        elif op == "embedding" and param_of(node.args[0]):
            embeddings[layer_name(_module_path(node) + ".weight")] = param_of(node.args[0])
    if not raw_linears:
        raise UnsupportedArchitecture("no linear layers found in the captured graph; expected a transformer causal LM")
    return raw_linears, embeddings


def _residual_stream(head: Node, raw_linears: dict, order: dict) -> tuple[list[tuple[Node, Node, Node]], dict]:
    """Step 3: the residual adds from the first block to the lm_head, each as (add, stream in, branch), and the
    shortcut linears met on the way (linear -> the stream it maps)."""
    adds = sorted((n for n in ancestors(head) if n.op == "call_function" and op_name(n) == "add"), key=order.get,
                  reverse=True)
    shortcuts: dict[Node, Node] = {}

    def split_residual(add: Node) -> tuple[Node, Node] | None:
        args = _tensor_args(add)
        if len(args) != 2:
            return None
        a, b = args
        if a in ancestors(b):
            return a, b
        if b in ancestors(a):
            return b, a
        for s, other in ((a, b), (b, a)):  # a shortcut matrix on the connection: linear(stream) + branch(stream)
            lin = through(s)
            if lin in raw_linears and op_name(lin) == "linear" and lin.args[0] in ancestors(other):
                shortcuts[lin] = lin.args[0]
                return s, other
        return None

    cur = next((add for add in adds if split_residual(add) is not None), None)
    if cur is None:
        raise UnsupportedArchitecture("no residual connection found before the lm_head; unsupported architecture")
    residual: list[tuple[Node, Node, Node]] = []
    while True:
        parts = split_residual(cur)
        if parts is None:
            break
        stream_in, branch = parts
        residual.append((cur, stream_in, branch))
        cur = through(stream_in)
        if cur in shortcuts:
            cur = through(shortcuts[cur])
        if not (cur.op == "call_function" and op_name(cur) == "add"):
            break
    residual.reverse()
    return residual, shortcuts


def _sublayers(residual: list, raw_linears: dict, param_of, order: dict) -> tuple[dict, list, dict, str]:
    """Step 4: for each residual branch, its linears' roles (readers and writers of the stream, on the attention
    path or the MLP's), its kind, its norms; with the blocks' paths and the block list's path."""
    roles: dict[Node, tuple[str, int | None]] = {}
    sublayers: list[Sublayer] = []
    block_paths: dict[int, str] = {}
    block_lists: set[str] = set()
    for add, stream_in, branch in residual:
        blk = _block_of(add)
        if blk is None:
            raise UnsupportedArchitecture(f"residual add {add.name} is not inside a repeated decoder block")
        block_lists.add(blk[0])
        block_paths[blk[1]] = f"{blk[0]}.{blk[1]}"
        stream_anc = ancestors(stream_in) | {stream_in}
        region = (ancestors(branch) | {branch}) - stream_anc
        lins = [n for n in region if n in raw_linears]
        if not lins:
            raise UnsupportedArchitecture(f"the residual branch ending at {add.name} holds no linear layer")
        lin_set = set(lins)
        reach = {n: ancestors(n, stop=stream_anc) for n in lins}
        upstream = {n: reach[n] & lin_set for n in lins}
        readers = [n for n in lins if not upstream[n]]
        writers = [n for n in lins if not any(n in upstream[o] for o in lins if o is not n)]
        middle = [n for n in lins if n not in readers and n not in writers]
        if middle:
            names = ", ".join(layer_name(raw_linears[n]["weight"]) for n in middle)
            raise UnsupportedArchitecture(f"linears neither reading nor writing the residual stream: {names}")
        attention = [n for n in region if n.op == "call_function" and op_name(n) in ATTENTION_OPS]
        # the attention path: the writers computed from an attention op, and every linear those writers read from
        attention_writers = [n for n in writers if any(a in reach[n] for a in attention)]
        on_path = set(attention_writers).union(*(reach[n] & lin_set for n in attention_writers))
        kind = "mlp" if not attention else "attention" if on_path == lin_set else "parallel"
        for n in readers:
            roles[n] = ("attn_in" if n in on_path else "mlp_in", blk[1])
        for n in writers:
            if n in roles:
                raise UnsupportedArchitecture(
                    f"{layer_name(raw_linears[n]['weight'])} both reads and writes the residual stream (a sublayer "
                    "with a single linear): unsupported architecture")
            roles[n] = ("attn_out" if n in on_path else "mlp_out", blk[1])
        # what the branch computes after its writers (with the parameters it reads there): a post-sublayer norm
        after_writers = region - set(writers) - set().union(*(reach[n] for n in writers))
        norm_region = set().union(*(ancestors(n, stop=stream_anc) for n in readers)) - stream_anc
        sublayers.append(Sublayer(
            kind=kind, block=blk[1],
            readers=tuple(layer_name(raw_linears[n]["weight"]) for n in sorted(readers, key=order.get)),
            writers=tuple(layer_name(raw_linears[n]["weight"]) for n in sorted(writers, key=order.get)),
            norm=_norm_module(norm_region, param_of, order),
            post_norm=_norm_module(after_writers, param_of, order),
        ))
    if len(block_lists) != 1:
        raise UnsupportedArchitecture(f"decoder blocks found in more than one module list: {sorted(block_lists)}")
    return roles, sublayers, block_paths, next(iter(block_lists))


def _named_linears(raw_linears: dict, roles: dict, order: dict) -> dict[str, Linear]:
    """Step 5: every linear under its user-facing module name (a shortcut under its parameter's), in graph order."""
    linears: dict[str, Linear] = {}
    for node in sorted(raw_linears, key=order.get):
        info = raw_linears[node]
        role, block = roles[node]
        name = layer_name(_module_path(node) + ".weight") if _module_path(node) else layer_name(info["weight"])
        if role == SHORTCUT:
            name = layer_name(info["weight"])
        linears[name] = Linear(
            name=name, role=role, block=block, weight=info["weight"], bias=info["bias"],
            in_features=int(info["in_f"]), out_features=int(info["out_f"]), weight_layout=info["layout"], node=node.name,
        )
    return linears


# Elementwise ops that may follow the lm_head on the way to the logits (soft-capping, a logit scale), with at most one
# tensor operand that is not a constant.
POSTPROCESS_OPS = {"mul", "div", "tanh", "add", "sub", "clamp", "neg", "sigmoid"}


def _head_of(logits: Node, raw_linears: dict, param_of) -> tuple[Node, tuple[str, ...]]:
    """The linear producing the logits, walking back through pass-through and elementwise post-processing ops."""
    post: list[str] = []
    node = through(logits)
    while node not in raw_linears:
        op = op_name(node) if node.op == "call_function" else node.op
        tensors = [a for a in _tensor_args(node) if not param_of(a) and a.op != "get_attr"]
        if op not in POSTPROCESS_OPS or len(tensors) != 1:
            raise UnsupportedArchitecture(
                f"the logits are not produced by a linear layer (lm_head): the path back from the output meets "
                f"{op} ({node.name}), which is not an elementwise post-processing op "
                f"({', '.join(sorted(POSTPROCESS_OPS))}) on the lm_head's output; unsupported model head")
        post.append(op)
        node = through(tensors[0])
    return node, tuple(reversed(post))


def _norm_module(region: set[Node], param_of, order: dict) -> str | None:
    """Module name of the norm in a region: the module owning the first parameter used there (None when
    parameter-free)."""
    for node in sorted(region, key=order.get):
        if node.op == "call_function" and any(param_of(a) for a in node.args):
            return layer_name(_module_path(node))
    return None


@dataclass
class BlockBoundaries:
    """Where each decoder block sits in a graph: its nodes, the stream entering and leaving it, its side inputs."""

    members: list[list[Node]]
    streams: list[Node]  # the residual stream entering each block (a node outside it)
    sides: list[list[Node]]  # other values each block reads from outside (mask, rotary tables, sizes)
    outputs: list[Node]  # the node of each block whose value leaves it (the stream after the block)


def block_boundaries(nodes: list[Node], structure: Structure, is_weight) -> BlockBoundaries:
    """Cut a graph (lifted or unlifted: ``is_weight`` tells weight inputs) at the decoder-block boundaries."""
    n_blocks = len(structure.blocks)
    members: list[list[Node]] = [[] for _ in range(n_blocks)]
    block_of: dict[Node, int] = {}
    for node in nodes:
        if node.op == "call_function":
            blk = _block_of(node)
            if blk is not None and layer_name(blk[0]) == structure.block_list and blk[1] < n_blocks:
                members[blk[1]].append(node)
                block_of[node] = blk[1]
    streams, sides, outputs = [], [], []
    for k, block in enumerate(members):
        if not block:
            raise UnsupportedArchitecture(f"block {k} has no operations in the captured graph")
        inside = set(block)
        external: list[Node] = []
        for node in block:
            for inp in node.all_input_nodes:
                if inp not in inside and not is_weight(inp) and inp not in external:
                    external.append(inp)
        from_blocks = [n for n in external if n in block_of]
        if len(from_blocks) > 1 or (from_blocks and block_of[from_blocks[0]] != k - 1):
            raise UnsupportedArchitecture(f"block {k} reads values from blocks other than the previous one")
        leaving = [n for n in block if any(u not in inside and op_name(u) != "_assert_tensor_metadata" for u in n.users)]
        if len(leaving) != 1:
            raise UnsupportedArchitecture(f"block {k} has {len(leaving)} outputs; expected one residual stream")
        outputs.append(leaving[0])
        if k == 0:
            stream = _first_stream(external, block)
        else:
            if not from_blocks or from_blocks[0] is not outputs[k - 1]:
                raise UnsupportedArchitecture(f"block {k} does not read the stream leaving block {k - 1}")
            stream = from_blocks[0]
        streams.append(stream)
        sides.append([n for n in external if n is not stream])
    return BlockBoundaries(members, streams, sides, outputs)


def _first_stream(external: list[Node], block: list[Node]) -> Node:
    """The stream entering block 0: the external float [batch, seq, hidden] value with the block output's width."""
    hidden = block[-1].meta.get("val")
    same = [n for n in external if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_floating_point()
            and n.meta["val"].dim() == 3 and hidden is not None and n.meta["val"].shape[-1] == hidden.shape[-1]]
    if len(same) != 1:
        raise UnsupportedArchitecture("cannot tell which input of block 0 is the residual stream")
    return same[0]
