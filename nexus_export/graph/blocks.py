"""The program's graph cut at block boundaries into functions of their weights: a prefix, one graph per block, a suffix.

The *prefix* computes, from the token ids and mask, the residual stream entering block 0 and every side value the
blocks read (attention mask, rotary tables, sizes); each *block* graph maps (stream, side values) to the stream leaving
the block, and also returns the input activation of every linear in the block, once per distinct input node (q, k and
v share one), and the stream after each residual add; the *suffix* maps the last stream to the logits.

Every part takes its weights as leading arguments (``Part.weights`` names them in the store), so a caller loads one
part's weights, runs it, and lets them go. Device literals captured in the graph (``arange(..., device=...)``,
``to(device)``) are rewritten to the device the parts run on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import fx
from torch.export.graph_signature import InputKind

from nexus_export.graph.capture import COMPUTE_DTYPE
from nexus_export.graph.kv_cache import tag_of
from nexus_export.graph.structure import LINEAR_INPUT_ARG, LINEAR_WEIGHT_ARG, ancestors, block_boundaries, op_name


@dataclass
class Part:
    """A piece of the graph as a function ``(*weights, *inputs) -> tuple``; ``weights`` are store names. The weights
    in ``cast`` are multiplied by linears alone, and the graph casts each to the compute dtype just before its
    linear: they may be given in their stored dtype (bf16), so a block's matrices are in float32 one at a time."""

    module: fx.GraphModule
    weights: list[str]
    cast: frozenset[str] = frozenset()

    def __call__(self, weights: list[torch.Tensor], *inputs) -> tuple:
        return self.module(*weights, *inputs)

    def with_graph(self, graph: fx.Graph) -> Part:
        """The same weights (and casts) over another graph that takes them the same way."""
        return Part(fx.GraphModule(torch.nn.Module(), graph), list(self.weights), self.cast)


@dataclass
class BlockGraphs:
    """The program cut at block boundaries (see module docstring)."""

    prefix: Part
    blocks: list[Part]
    side_index: list[list[int]]  # per block: which prefix side outputs it takes, in its placeholder order
    suffix: Part  # (stream after the last block, *its side values) -> (logits,)
    suffix_side_index: list[int]
    linear_inputs: list[dict[str, int]] = field(default_factory=list)  # per block: linear name -> extra output index
    residuals: list[dict[str, int]] = field(default_factory=list)  # per block: sublayer kind -> output index of the
    # stream right after that sublayer's residual add (0 is the stream leaving the block)


def weight_targets(exported: torch.export.ExportedProgram) -> dict[str, str]:
    """Placeholder name -> store name, for every input of the lifted graph that is not a user input."""
    return {s.arg.name: s.target for s in exported.graph_signature.input_specs
            if s.kind != InputKind.USER_INPUT and s.target is not None}


def set_device(graph: fx.Graph, device: torch.device) -> None:
    """Rewrite every device literal in ``graph`` (arguments and keyword arguments) to ``device``, in place."""
    def swap(value):
        if isinstance(value, torch.device):
            return device
        if isinstance(value, (list, tuple)):
            return type(value)(swap(v) for v in value)
        return value

    for node in graph.nodes:
        if node.op == "call_function":
            node.args = swap(node.args)
            node.kwargs = {k: swap(v) for k, v in node.kwargs.items()}


def _copy(nodes: Iterable[fx.Node], weights: dict[str, str], inputs: list[fx.Node], outputs: list[fx.Node],
          device: torch.device) -> Part:
    """A Part of ``nodes`` (in order): weight placeholders they read first, then ``inputs``; returns ``outputs``."""
    nodes = list(nodes)
    inside = set(nodes) | set(inputs)
    used: list[fx.Node] = []
    for node in nodes:
        for inp in node.all_input_nodes:
            if inp.op == "placeholder" and inp.name in weights and inp not in inside and inp not in used:
                used.append(inp)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in used:
        env[node] = graph.placeholder(f"w_{node.name}")
    for i, node in enumerate(inputs):
        env[node] = graph.placeholder(f"in_{i}_{node.name}")
    for node in nodes:
        if node not in env:
            env[node] = graph.node_copy(node, lambda arg: env[arg])
    graph.output(tuple(env[o] for o in outputs))
    set_device(graph, device)
    _without_empty_past(graph)
    cast = {weights[n.name] for n in used if _cast_at_linears(graph, env[n], n.meta.get("val"))}
    graph.lint()
    return Part(fx.GraphModule(torch.nn.Module(), graph), [weights[n.name] for n in used], frozenset(cast))


def _cast_at_linears(graph: fx.Graph, weight: fx.Node, value) -> bool:
    """If every reader of the floating weight placeholder ``weight`` multiplies by it as a linear's weight, read it
    through a cast to the compute dtype placed just before each linear (a no-op on a float32 tensor; on a bf16 one a
    float32 copy that lives until that linear is done). Returns whether it did."""
    readers = list(weight.users)
    if not readers or not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
        return False
    if any(op_name(r) not in LINEAR_WEIGHT_ARG or len(r.args) <= LINEAR_WEIGHT_ARG[op_name(r)]
           or r.args[LINEAR_WEIGHT_ARG[op_name(r)]] is not weight
           or weight in r.args[:LINEAR_WEIGHT_ARG[op_name(r)]] for r in readers):
        return False
    for reader in readers:
        with graph.inserting_before(reader):
            as_computed = graph.call_function(torch.ops.aten.to.dtype, (weight, COMPUTE_DTYPE))
        reader.replace_input_with(weight, as_computed)
    return True


def _without_empty_past(graph: fx.Graph) -> None:
    """Every run of the parts has a mask as long as the ids, so each key/value cache's past is empty and its
    concatenation with the new keys is a copy of them: the new keys are used directly (the same values, no copy)."""
    changed = False
    for node in list(graph.nodes):
        tag = tag_of(node)
        if tag is not None and tag.startswith("present.") and op_name(node) == "cat":
            node.replace_all_uses_with(node.args[0][-1])
            graph.erase_node(node)
            changed = True
    if changed:
        graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))


def cut_blocks(program, device: torch.device | str = "cpu") -> BlockGraphs:
    """Partition the program's graph into a prefix, one graph per decoder block and a suffix, to run on ``device``."""
    device = torch.device(device)
    exported = program.exported
    weights = weight_targets(exported)
    order = list(exported.graph.nodes)
    bounds = block_boundaries(order, program.structure, is_weight=lambda n: n.op == "placeholder" and n.name in weights)
    all_sides: list[fx.Node] = []
    for n in (n for side in bounds.sides for n in side):
        if n not in all_sides:
            all_sides.append(n)
    suffix_nodes, suffix_sides = _suffix_region(order, bounds, weights)
    all_sides += [n for n in suffix_sides if n not in all_sides]
    output_node = next(n for n in order if n.op == "output")
    logits = output_node.args[0][0] if isinstance(output_node.args[0], (tuple, list)) else output_node.args[0]
    suffix = _copy([n for n in order if n in suffix_nodes], weights, [bounds.outputs[-1], *suffix_sides], [logits],
                   device)

    wanted = [bounds.streams[0], *all_sides]
    needed = set(wanted).union(*(ancestors(n) for n in wanted))
    user_inputs = [n for n in order if n.op == "placeholder" and n.name not in weights]
    prefix = _copy([n for n in order if n in needed and n.op != "placeholder"], weights, user_inputs, wanted, device)

    by_name = {n.name: n for n in order}
    residual_of_block: list[dict[str, fx.Node]] = [{} for _ in bounds.members]
    for sub, add_name in zip(program.structure.sublayers, program.structure.residual_adds):
        residual_of_block[sub.block][sub.kind] = by_name[add_name]
    weight_to_linear = {lin.weight: lin for lin in program.structure.in_blocks()}
    graphs = BlockGraphs(prefix=prefix, blocks=[], side_index=[], suffix=suffix,
                         suffix_side_index=[all_sides.index(n) for n in suffix_sides])
    for k, nodes in enumerate(bounds.members):
        extra, lin_inputs = _linear_inputs(nodes, weight_to_linear, weights)
        residual = {}
        for kind, node in residual_of_block[k].items():
            extra.append(node)
            residual[kind] = len(extra)
        graphs.blocks.append(_copy(nodes, weights, [bounds.streams[k], *bounds.sides[k]], [bounds.outputs[k], *extra],
                                   device))
        graphs.side_index.append([all_sides.index(n) for n in bounds.sides[k]])
        graphs.linear_inputs.append(lin_inputs)
        graphs.residuals.append(residual)
    return graphs


def _suffix_region(order: list[fx.Node], bounds, weights: dict[str, str]) -> tuple[set[fx.Node], list[fx.Node]]:
    """The nodes after the last block that produce the logits (final norm, lm_head), and the values they read from
    before the blocks (besides the last block's output)."""
    output_node = next(n for n in order if n.op == "output")
    before_blocks = ancestors(bounds.streams[0]) | {bounds.streams[0]}
    in_blocks = set().union(*bounds.members)
    region, todo = set(), list(output_node.all_input_nodes)
    while todo:
        cur = todo.pop()
        if cur in region or cur is bounds.outputs[-1] or cur in in_blocks or cur in before_blocks \
                or cur.op == "placeholder":
            continue
        region.add(cur)
        todo.extend(cur.all_input_nodes)
    sides: list[fx.Node] = []
    for node in region:
        for inp in node.all_input_nodes:
            if inp not in region and inp is not bounds.outputs[-1] and not (
                    inp.op == "placeholder" and inp.name in weights) and inp not in sides:
                sides.append(inp)
    return region, sides


def _linear_inputs(nodes: list[fx.Node], weight_to_linear: dict, weights: dict[str, str]
                   ) -> tuple[list[fx.Node], dict[str, int]]:
    """The distinct input activations of a block's linears (q, k and v share one) and each linear's index among them."""
    extra: list[fx.Node] = []
    index: dict[str, int] = {}
    for node in nodes:
        op = op_name(node)
        if op not in LINEAR_INPUT_ARG or len(node.args) < 2:
            continue
        weight = node.args[LINEAR_WEIGHT_ARG[op]]
        target = weights.get(weight.name) if isinstance(weight, fx.Node) and weight.op == "placeholder" else None
        lin = weight_to_linear.get(target)
        if lin is None:
            continue
        x = node.args[LINEAR_INPUT_ARG[op]]
        if x not in extra:
            extra.append(x)
        index[lin.name] = extra.index(x)
    return extra, index


def output_only(part: Part, index: int) -> Part:
    """``part`` cut down to what its output ``index`` needs (e.g. the stream after a block's attention sublayer,
    without the MLP after it); returns a 1-tuple and takes the same arguments."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    result = graph.graph_copy(part.module.graph, env)
    chosen = result[index] if isinstance(result, (tuple, list)) else result
    graph.output((chosen,))
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
    return part.with_graph(graph)
