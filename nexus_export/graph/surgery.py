"""Graph surgery on a captured program: remove decoder blocks or sublayers (attention, MLP) from the graph itself.

The residual stream is rewired around what is removed, dead nodes and their weights are deleted (from the graph and
from a fork of the store), and the remaining blocks are renumbered (parameter names, node metadata, config), so the
result is the program of a shallower model: its ONNX has fewer nodes and fewer weights, nothing is multiplied by zero.
The input program is left untouched; no weight is copied.
"""

from __future__ import annotations

import copy
import logging
import re

import torch

from nexus_export.errors import UserError
from nexus_export.graph.graph_edit import copy_program, rebuild
from nexus_export.graph.program import Program
from nexus_export.graph.structure import ancestors, block_boundaries
from nexus_export.naming import WRAPPER_PREFIX

log = logging.getLogger(__name__)


def remove_blocks(program: Program, blocks: list[int]) -> Program:
    """A new program without decoder ``blocks``; the rest renumbered 0..n-1."""
    n_blocks = len(program.structure.blocks)
    drop = sorted(set(blocks))
    if not drop:
        return program
    if len(drop) >= n_blocks:
        raise UserError(f"cannot remove all {n_blocks} blocks; keep at least one")
    exported = copy_program(program.exported)
    graph = exported.graph
    weights = {s.arg.name for s in exported.graph_signature.input_specs if s.target is not None}
    bounds = block_boundaries(list(graph.nodes), program.structure, is_weight=lambda n: n.name in weights)
    live = _live(graph)
    for k in reversed(drop):  # from the last, so each block's entering stream is still in place
        bounds.outputs[k].replace_all_uses_with(bounds.streams[k])
    _delete_dead(graph, live)
    keep = [k for k in range(n_blocks) if k not in drop]
    renumber = {old: new for new, old in enumerate(keep)}
    rename = _renamer(program.structure.block_list, renumber)
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {key: (rename(path), typ) for key, (path, typ) in stack.items()}
    store = program.store.fork()
    exported = rebuild(exported, store, rename)
    log.info("removed blocks %s; %d blocks remain", drop, len(keep))
    return program.derive(exported, store, config=_shallower_config(program.config, keep))


def remove_attention(program: Program, blocks: list[int]) -> Program:
    """A new program in which the attention sublayer of each of ``blocks`` is gone (its residual add bypassed)."""
    return remove_sublayers(program, [(k, "attention") for k in blocks])


def remove_sublayers(program: Program, sublayers: list[tuple[int, str]]) -> Program:
    """A new program without the given (block, kind) sublayers ("attention" or "mlp"): each one's residual add is
    bypassed, so the stream goes past it unchanged. A block that loses all its sublayers is removed whole (and the
    blocks after it renumbered: ``origin["attention_removed"]`` and ``["mlp_removed"]`` list the new numbers), so
    that the result is a shallower model where it can be."""
    drop = sorted(set(sublayers))
    if not drop:
        return program
    kinds: dict[int, set[str]] = {}
    for sub in program.structure.sublayers:
        kinds.setdefault(sub.block, set()).add(sub.kind)
    missing = [f"{k}.{kind}" for k, kind in drop if kind not in kinds.get(k, set())]
    if missing:
        raise UserError(f"no sublayer {', '.join(missing)} to remove (blocks 0-{len(program.structure.blocks) - 1}, "
                        f"sublayers {', '.join(sorted(set().union(*kinds.values())))})")
    whole = sorted(k for k in kinds if kinds[k] <= {kind for b, kind in drop if b == k})
    program = remove_blocks(program, whole)
    partial = [(k - sum(w < k for w in whole), kind) for k, kind in drop if k not in whole]  # renumbered
    if partial:
        exported = copy_program(program.exported)
        nodes = {n.name: n for n in exported.graph.nodes}
        live = _live(exported.graph)
        for sub, add_name in zip(program.structure.sublayers, program.structure.residual_adds):
            if (sub.block, sub.kind) in partial:
                add = nodes[add_name]
                add.replace_all_uses_with(stream_operand(add))
        _delete_dead(exported.graph, live)
        store = program.store.fork()
        exported = rebuild(exported, store)
        log.debug("removed sublayers %s", ", ".join(f"{k}.{kind}" for k, kind in partial))
        origin = dict(program.origin)
        for kind in ("attention", "mlp"):
            gone = [k for k, c in partial if c == kind]
            if gone:
                origin[f"{kind}_removed"] = sorted(set(origin.get(f"{kind}_removed", [])) | set(gone))
        program = program.derive(exported, store, origin=origin)
    return program


def stream_operand(add: torch.fx.Node) -> torch.fx.Node:
    """The operand of a residual add that carries the stream (the one the other operand was computed from)."""
    a, b = [x for x in add.args if isinstance(x, torch.fx.Node)]
    return a if a in ancestors(b) else b


def _renamer(block_list: str, renumber: dict[int, int]):
    """Maps a parameter name or module path inside block ``old`` to the same inside block ``renumber[old]``."""
    pattern = re.compile(rf"^((?:{re.escape(WRAPPER_PREFIX)})?{re.escape(block_list)}\.)(\d+)(\.|$)")

    def rename(name: str) -> str:
        m = pattern.match(name)
        if not m or int(m.group(2)) not in renumber:
            return name
        return f"{m.group(1)}{renumber[int(m.group(2))]}{m.group(3)}{name[m.end():]}"

    return rename


def _live(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Every node the graph's output depends on."""
    return ancestors(next(n for n in graph.nodes if n.op == "output"))


def _delete_dead(graph: torch.fx.Graph, live_before: set[torch.fx.Node]) -> None:
    """Erase what the rewiring cut off: nodes the output used to need and no longer does, and the checks hanging on
    them (dtype asserts). Other side-effect nodes of the graph are left alone. Placeholders are handled by rebuild."""
    live_after = _live(graph)
    dead = {n for n in live_before - live_after if n.op != "placeholder"}
    for node in graph.nodes:
        if node not in live_after and node.op == "call_function" and any(i in dead for i in node.all_input_nodes):
            dead.add(node)
    for node in reversed(list(graph.nodes)):
        if node in dead:
            graph.erase_node(node)


def _shallower_config(config, keep: list[int]):
    """A copy of a Hugging Face config for the kept blocks (layer count and any per-layer lists)."""
    if config is None:
        return None
    config = copy.copy(config)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, attr) and isinstance(getattr(config, attr), int):
            old = getattr(config, attr)
            setattr(config, attr, len(keep))
            for key, value in list(vars(config).items()):
                if isinstance(value, list) and len(value) == old:
                    setattr(config, key, [value[k] for k in keep])
            break
    return config
