"""Editing a captured program's graph: copy it (the graph only: weights live in the store), add a parameter, and
rebuild an ExportedProgram after edits (unused inputs dropped, parameters renamed, shapes refreshed).

Structural passes (block removal, SliceGPT) edit a copy of the graph and a fork of the store, so the program they
started from is unchanged and no weight is copied.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputKind,
    OutputSpec,
    TensorArgument,
)

from nexus_export.graph.trace_settings import tracing
from nexus_export.memory import forget_last_trace
from nexus_export.weights.store import WeightStore


def copy_program(exported: ExportedProgram) -> ExportedProgram:
    """A new ExportedProgram with its own copy of the graph (same node names and metadata) and of the signature;
    the meta state_dict entries and the (small) constants are shared."""
    graph = fx.Graph()
    graph._codegen = copy.copy(exported.graph._codegen)
    env: dict[fx.Node, fx.Node] = {}
    for node in exported.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    sig = exported.graph_signature
    specs = [InputSpec(kind=s.kind, arg=s.arg, target=s.target, persistent=s.persistent) for s in sig.input_specs]
    return _program(exported, graph, specs, dict(exported.state_dict), dict(exported.constants))


def _program(template: ExportedProgram, graph: fx.Graph, specs: list[InputSpec], state: dict,
             constants: dict, outputs: list[OutputSpec] | None = None, module_call_graph=None) -> ExportedProgram:
    module = fx.GraphModule(template.graph_module, graph)
    return ExportedProgram(
        root=module, graph=graph,
        graph_signature=ExportGraphSignature(
            input_specs=specs, output_specs=outputs if outputs is not None else list(template.graph_signature.output_specs)),
        state_dict=state, range_constraints=template.range_constraints,
        module_call_graph=module_call_graph if module_call_graph is not None else template.module_call_graph,
        example_inputs=template.example_inputs, constants=constants, verifiers=template.verifiers,
    )


def with_outputs(exported: ExportedProgram, names: list[str]) -> ExportedProgram:
    """A copy of ``exported`` that also returns the values of the nodes ``names``, after its own outputs (how a value
    inside the graph reaches an exporter under a name of the caller's choosing)."""
    copied = copy_program(exported)
    graph = copied.graph
    nodes = {node.name: node for node in graph.nodes}
    out = graph.output_node()
    own = list(out.args[0]) if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
    out.args = (tuple(own + [nodes[name] for name in names]),)
    specs = list(copied.graph_signature.output_specs) + [
        OutputSpec(kind=OutputKind.USER_OUTPUT, arg=TensorArgument(name=name), target=None) for name in names]
    calls = list(copied.module_call_graph)  # the root entry's output structure is now a flat tuple
    spec = pytree.tree_flatten(tuple(range(len(own) + len(names))))[1]
    calls[0] = dataclasses.replace(calls[0], signature=dataclasses.replace(calls[0].signature, out_spec=spec))
    return _program(copied, graph, list(copied.graph_signature.input_specs), dict(copied.state_dict),
                    dict(copied.constants), specs, calls)


def placeholder_targets(exported: ExportedProgram) -> dict[str, str]:
    """Placeholder name -> parameter/buffer name (state_dict keys)."""
    sig = exported.graph_signature
    return {**sig.inputs_to_parameters, **sig.inputs_to_buffers}


def param_of(exported: ExportedProgram, arg) -> str | None:
    """The parameter or buffer name an argument reads directly, or None."""
    if isinstance(arg, fx.Node) and arg.op == "placeholder":
        return placeholder_targets(exported).get(arg.name)
    return None


def meta_like(value: torch.Tensor) -> torch.nn.Parameter:
    """The state_dict entry of a parameter: its shape, in the graph's compute dtype, on the meta device."""
    dtype = torch.float32 if value.is_floating_point() else value.dtype
    return torch.nn.Parameter(torch.empty(value.shape, dtype=dtype, device="meta"), requires_grad=False)


def add_parameter(exported: ExportedProgram, store: WeightStore, target: str, value: torch.Tensor | str,
                  dtype: torch.dtype | None = None) -> fx.Node:
    """A new parameter placeholder (after the existing ones) with its signature entry, meta state and its value in
    ``store``: a tensor (kept in ``dtype`` if given, else the store's output dtype) or the name of a tensor already in
    the store, which the new parameter starts as (no copy)."""
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
    if isinstance(value, str):
        store.alias(target, value)
        meta = torch.nn.Parameter(torch.empty(store.shape(target), device="meta"), requires_grad=False)
    else:
        store.set(target, value, dtype)
        meta = meta_like(value)
    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])
    node.meta["val"] = fake_mode.from_tensor(meta, static_shapes=True) if fake_mode is not None else meta
    specs.insert(last + 1, InputSpec(kind=InputKind.PARAMETER, arg=type(specs[last].arg)(name=node.name),
                                     target=target, persistent=None))
    exported.state_dict[target] = meta
    return node


def call(graph: fx.Graph, target, args: tuple, like: fx.Node, infer: bool = True) -> fx.Node:
    """A call_function node carrying ``like``'s module stack and source metadata, and its own value: ``target`` run
    on its inputs' fake values (shapes only, symbolic dims kept), so the graph's metadata stays true without a
    retrace. With ``infer=False`` (a graph mid-edit whose inputs do not fit yet: SliceGPT's shortcuts, added before the
    widths change) or where an input has no fake value, ``like``'s value stands in until the program is retraced."""
    node = graph.call_function(target, args)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    inputs = [a for a in pytree.tree_leaves(args) if isinstance(a, fx.Node)]
    fake_mode = detect_fake_mode([a.meta.get("val") for a in inputs])
    if infer and fake_mode is not None and all("val" in a.meta for a in inputs):
        values = pytree.tree_map(lambda a: a.meta["val"] if isinstance(a, fx.Node) else a, args)
        with fake_mode, tracing():
            node.meta["val"] = target(*values)
    elif "val" in like.meta:
        node.meta["val"] = like.meta["val"]
    return node


def rebuild(exported: ExportedProgram, store: WeightStore | None, rename: Callable[[str], str] | None = None,
            retrace: bool = False) -> ExportedProgram:
    """A fresh ExportedProgram after graph edits: dead nodes and unused inputs dropped (their tensors leave
    ``store``), parameters renamed by ``rename`` (in the store too), parameter shapes taken from the meta state, and
    with ``retrace`` every node re-traced so every shape in the graph is fresh."""
    graph = exported.graph
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
    used = {n.name for n in graph.nodes if n.op == "placeholder" and n.users}
    rename = rename or (lambda name: name)
    specs, state, constants, renames, dropped = [], {}, {}, {}, set()
    for spec in exported.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT and spec.arg.name not in used:
            graph.erase_node(next(n for n in graph.nodes if n.op == "placeholder" and n.name == spec.arg.name))
            dropped.add(spec.target)
            continue
        target = rename(spec.target) if spec.target else spec.target
        if target != spec.target:
            renames[spec.target] = target
        specs.append(InputSpec(kind=spec.kind, arg=spec.arg, target=target, persistent=spec.persistent))
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target in exported.state_dict:
            state[target] = exported.state_dict[spec.target]
        elif spec.target in exported.constants:
            constants[target] = exported.constants[spec.target]
    if store is not None:
        for name in dropped - {s.target for s in specs}:
            store.drop(name)
        store.rename(renames)
    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])
    targets = {s.arg.name: s.target for s in specs if s.kind in (InputKind.PARAMETER, InputKind.BUFFER)}
    for node in graph.nodes:
        value = state.get(targets.get(node.name))
        if value is not None and tuple(node.meta["val"].shape) != tuple(value.shape):
            node.meta["val"] = fake_mode.from_tensor(value, static_shapes=True)
    exported.graph_module.recompile()
    edited = _program(exported, graph, specs, state, constants)
    if not retrace:
        return edited
    with tracing():
        retraced = edited.run_decompositions({})
    forget_last_trace()
    # A copy: the retraced graph keeps every node the trace erased in its namespace (30,911 names for SmolLM2-135M's
    # 2,000 nodes), fake values and all, for as long as the program lives.
    return copy_program(retraced)
