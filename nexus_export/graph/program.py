"""Program: a captured graph without weights, the Structure read from it, and the WeightStore that holds its tensors.

Passes read a linear's matrix with ``weight`` (always [out, in], whatever the layout) and write it back with
``set_weight``; tensors whose shape changes go through ``set_parameter``, which keeps the graph's meta state in step.
Running the program (logits, perplexity, calibration) walks it block by block through ``runner.BlockRunner``, loading
one block's weights at a time on ``device``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.export.graph_signature import InputKind

from nexus_export.errors import UserError
from nexus_export.graph.capture import COMPUTE_DTYPE, capture
from nexus_export.graph.structure import LINEAR_INPUT_ARG, Linear, Structure, op_name, read_structure
from nexus_export.naming import WRAPPER_PREFIX
from nexus_export.weights.shards import TensorLocation
from nexus_export.weights.store import DEFAULT_BUDGET, WeightStore

log = logging.getLogger(__name__)



def require_module(model: Any) -> None:
    """Refuse anything but a torch module where one is needed (a string model name, say), in the API's words."""
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"expected a torch.nn.Module (e.g. a transformers causal LM), got {type(model).__name__}")


@dataclass
class Program:
    """The unit every pass takes and returns."""

    exported: torch.export.ExportedProgram  # state_dict: meta tensors (shapes only)
    structure: Structure
    store: WeightStore
    tokenizer: Any = None
    config: Any = None
    name: str = "model"
    origin: dict = field(default_factory=dict)
    device: str = "cpu"  # where blocks run: "cpu", "cuda", "cuda:1"

    # ------------------------------------------------------------------------------------------------ building

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Any = None, name: str | None = None,
                   origin: dict | None = None, write_through: bool = False, store_dtype: torch.dtype | None = None,
                   budget: int | None = None, scratch: Path | None = None) -> "Program":
        """Capture ``model`` (its weights stay where they are: the store reads the model's own tensors).

        ``write_through``: passes that keep shapes write their results into the model's tensors (in-place pruning
        for the Python API); otherwise the model is never changed.
        """
        require_module(model)
        tensors = dict(model.named_parameters(remove_duplicate=False))
        tensors.update(model.named_buffers(remove_duplicate=False))
        exported = capture(model)
        store = _new_store(store_dtype, budget, scratch, write_through)

        def source(target: str) -> torch.Tensor:
            return tensors[target[len(WRAPPER_PREFIX):]]

        _fill_store(exported, store, lambda target: store.add_tensor(target, source(target)))
        return cls._make(exported, store, tokenizer, getattr(model, "config", None), name or type(model).__name__,
                         origin or {})

    @classmethod
    def from_checkpoint(cls, model: torch.nn.Module, index: dict[str, TensorLocation], tokenizer: Any = None,
                        name: str = "model", origin: dict | None = None,
                        store_dtype: torch.dtype | None = None, budget: int | None = None,
                        scratch: Path | None = None) -> "Program":
        """Capture ``model`` (built on the meta device) and take its weights from checkpoint shards (``index``: every
        tensor of the shards by key, see shards.index_checkpoint). A tensor the model needs that no shard holds is a
        UserError naming it."""
        aliases: dict[str, list[str]] = {}
        by_id: dict[int, list[str]] = {}
        for pname, p in model.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(pname)
        for names in by_id.values():
            for n in names:
                aliases[n] = names
        buffers = dict(model.named_buffers(remove_duplicate=False))
        prefix = getattr(model, "base_model_prefix", "") or ""
        exported = capture(model)
        store = _new_store(store_dtype, budget, scratch)
        missing: list[str] = []

        def resolve(target: str) -> None:
            own = target[len(WRAPPER_PREFIX):]
            candidates = []
            for n in aliases.get(own, [own]):
                candidates += [n, n[len(prefix) + 1:] if prefix and n.startswith(prefix + ".") else f"{prefix}.{n}"]
            key = next((c for c in candidates if c in index), None)
            if key is not None:
                store.add_location(target, index[key])
            elif own in buffers and buffers[own].device.type != "meta":  # a buffer the config computes
                store.add_tensor(target, buffers[own])
            else:
                missing.append(own)

        _fill_store(exported, store, resolve)
        if missing:
            where = sorted({str(loc.path.parent) for loc in index.values()}) or ["the checkpoint"]
            raise UserError(f"the weights in {where[0]} lack {len(missing)} tensor(s) the model needs "
                            f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); the checkpoint does not "
                            "match its config.json or a shard is missing")
        return cls._make(exported, store, tokenizer, getattr(model, "config", None), name, origin or {})

    @classmethod
    def from_loaded(cls, loaded, **store_options) -> "Program":
        """A program for a ``zoo.LoadedModel``: weights from its shards when it was opened without them, else from
        the model itself (which passes then change in place: the model is the run's own)."""
        if loaded.files:
            return cls.from_checkpoint(loaded.model, loaded.index, loaded.tokenizer, loaded.name, loaded.origin,
                                       **store_options)
        return cls.from_model(loaded.model, loaded.tokenizer, loaded.name, loaded.origin, write_through=True,
                              **store_options)

    @classmethod
    def _make(cls, exported, store, tokenizer, config, name, origin) -> "Program":
        return cls(exported=exported, structure=read_structure(exported), store=store, tokenizer=tokenizer,
                   config=config, name=name, origin=dict(origin))

    def derive(self, exported: torch.export.ExportedProgram, store: WeightStore, **changes) -> "Program":
        """A new program on an edited graph and store (structure read afresh); other fields carried over."""
        return replace(self, exported=exported, structure=read_structure(exported), store=store,
                       origin=dict(changes.pop("origin", self.origin)), **changes)

    def fork(self) -> "Program":
        """The same graph with a fork of the store: a pass run on the fork leaves this program's weights as they are
        (no weight is copied until the fork changes it)."""
        return replace(self, store=self.store.fork(), origin=dict(self.origin))

    # ------------------------------------------------------------------------------------------------ weights

    def linear(self, name: str) -> Linear:
        return self.structure.linears[name]

    def parameter(self, param: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``param`` (a state_dict or constant name) as stored, or converted to ``dtype``."""
        return self.store.get(param, dtype)

    def set_parameter(self, param: str, value: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """Keep ``value`` as ``param`` (any shape) and give the graph's meta state the same shape."""
        self.store.set(param, value, dtype)
        if param in self.exported.state_dict:
            meta = torch.empty(value.shape, dtype=COMPUTE_DTYPE if value.is_floating_point() else value.dtype,
                               device="meta")
            self.exported.state_dict[param] = torch.nn.Parameter(meta, requires_grad=False)

    def weight(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None
               ) -> torch.Tensor:
        """The matrix of linear (or embedding) ``name``, [out, in], as stored or in ``dtype``; read-only (GPT-2's
        Conv1D stores [in, out]: it is transposed so every pass sees one orientation)."""
        if name in self.structure.embeddings:
            return self.store.get(self.structure.embeddings[name], dtype, device)
        lin = self.structure.linears[name]
        w = self.store.get(lin.weight, dtype, device)
        return w.t() if lin.weight_layout == "in_out" else w

    def set_weight(self, name: str, w_oi: torch.Tensor) -> None:
        """Write linear (or embedding) ``name``'s new [out, in] matrix (same shape)."""
        if name in self.structure.embeddings:
            self.store.set(self.structure.embeddings[name], w_oi)
            return
        lin = self.structure.linears[name]
        self.store.set(lin.weight, w_oi.t() if lin.weight_layout == "in_out" else w_oi)

    def weight_names(self) -> list[str]:
        """Parameter and persistent-buffer names (each storage once: a tied embedding and head are one name)."""
        return list(self.exported.state_dict)

    def main_dtype(self) -> torch.dtype:
        """The floating dtype holding most of the weights' bytes (the checkpoint's dtype, for a loaded model)."""
        by_dtype: dict[torch.dtype, int] = {}
        for param in self.weight_names():
            d = self.store.stored_dtype(param)
            if d.is_floating_point:
                by_dtype[d] = by_dtype.get(d, 0) + self.store.nbytes(param)
        return max(by_dtype, key=by_dtype.get) if by_dtype else torch.float32

    def block_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of the largest decoder block's linear weights in ``dtype`` (a pass's edits of one block, kept in the
        store's dtype, are what the memory budget must hold)."""
        sizes: dict[int, int] = {}
        for lin in self.structure.in_blocks():
            sizes[lin.block] = sizes.get(lin.block, 0) + self.store.nbytes(lin.weight, dtype)
        return max(sizes.values(), default=0)

    def weight_bytes(self) -> int:
        """Bytes of every parameter and persistent buffer as stored (a checkpoint's size on disk, near enough)."""
        return sum(self.store.nbytes(name) for name in self.weight_names())

    def num_parameters(self) -> int:
        total = 0
        for param in self.weight_names():
            count = 1
            for d in self.store.shape(param):
                count *= d
            total += count
        return total

    def sparsity(self, names: list[str]) -> dict[str, float]:
        """Fraction of exact zeros in each named linear's weight."""
        out = {}
        for n in names:
            w = self.weight(n)
            out[n] = float((w == 0).sum()) / w.numel()
        return out

    # ------------------------------------------------------------------------------------------------ running

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, seq, vocab] on the CPU, computed block by block (for a few windows: all logits are held)."""
        from nexus_export.graph.runner import BlockRunner

        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        runner = BlockRunner(self, input_ids, batch_size=len(input_ids), attention_mask=mask)
        runner.run_blocks()
        weights = runner.load(runner.graphs.suffix)
        return torch.cat([runner.logits(m, weights=weights).cpu() for m in range(runner.batches)])

    def materialize(self, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The whole model as one torch module ``(input_ids, attention_mask) -> logits`` with every weight in memory
        (floating ones in ``dtype``) on ``device``: for runtimes that need it whole (torch's 2:4 kernels on a GPU),
        and only for models that fit. The graph was traced in float32, so a narrower ``dtype`` goes to the weights
        of the linears alone, which read their input in it and hand float32 on (as autocast would); norms and
        embeddings stay float32. A wider one is every floating weight's and flows through by type promotion."""
        from nexus_export.graph.blocks import set_device

        module = self.exported.module(check_guards=False)  # the traced past's guards: the past here is empty
        narrow = dtype is not None and dtype.is_floating_point and dtype.itemsize < COMPUTE_DTYPE.itemsize
        linear_weights = _matmul_weights(module.graph) if narrow else set()
        state = {name: self.store.get(name, dtype if name in linear_weights or not narrow else COMPUTE_DTYPE)
                 for name in self.weight_names()}
        module.load_state_dict(state, strict=False, assign=True)
        left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if left:  # a name the store does not know: the module would fail later, far from the cause
            raise RuntimeError(f"materialize: no stored weight for {', '.join(left[:3])}")
        set_device(module.graph, torch.device(device))
        if narrow:
            _linears_in(module.graph, linear_weights, dtype)
        module.recompile()
        return module.to(device)

    def module(self) -> torch.nn.Module:
        """A torch module ``(input_ids, attention_mask) -> logits`` over this program (block by block, no copy)."""
        return ProgramModule(self)


def _matmul_operands(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The weights (``get_attr`` operands: the matrix and a bias) a multiplication node reads; none for other nodes."""
    if node.op != "call_function" or op_name(node) not in LINEAR_INPUT_ARG:
        return []
    return [a for a in node.args if isinstance(a, torch.fx.Node) and a.op == "get_attr"]


def _matmul_weights(graph: torch.fx.Graph) -> set[str]:
    """The weights that only multiplications read (a head tied to the embedding is not one of them)."""
    return {n.target for n in graph.nodes
            if n.op == "get_attr" and n.users and all(n in _matmul_operands(u) for u in n.users)}


def _linears_in(graph: torch.fx.Graph, weights: set[str], dtype: torch.dtype) -> None:
    """Cast the input of every multiplication by ``weights`` to ``dtype`` and its result back to the float32 the rest
    of the traced graph computes in, in place."""
    for node in list(graph.nodes):
        operands = _matmul_operands(node)
        if not operands or any(w.target not in weights for w in operands):
            continue
        at = LINEAR_INPUT_ARG[op_name(node)]
        with graph.inserting_before(node):
            cast = graph.call_function(torch.ops.aten.to.dtype, (node.args[at], dtype))
        node.update_arg(at, cast)
        with graph.inserting_after(node):
            back = graph.call_function(torch.ops.aten.to.dtype, (node, COMPUTE_DTYPE))
        node.replace_all_uses_with(back, delete_user_cb=lambda user, back=back: user is not back)


class ProgramModule(torch.nn.Module):
    """``(input_ids, attention_mask) -> logits`` for a program whose weights live in its store."""

    def __init__(self, program: Program):
        super().__init__()
        self.program = program

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.program.logits(input_ids, attention_mask)


def _new_store(dtype: torch.dtype | None, budget: int | None, scratch: Path | None,
               write_through: bool = False) -> WeightStore:
    return WeightStore(DEFAULT_BUDGET if budget is None else budget, scratch, dtype, write_through)


def _fill_store(exported: torch.export.ExportedProgram, store: WeightStore, add) -> None:
    """Call ``add(target)`` for every parameter and persistent buffer; constants (non-persistent buffers, lifted
    tensors) go in as the real tensors capture kept. Afterwards the state_dict holds meta tensors only."""
    for spec in exported.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT or spec.target is None:
            continue
        if spec.target in exported.state_dict:
            add(spec.target)
            value = exported.state_dict[spec.target]
            if value.device.type != "meta":
                meta = torch.empty(value.shape, dtype=value.dtype, device="meta")
                exported.state_dict[spec.target] = torch.nn.Parameter(meta, requires_grad=False) \
                    if spec.kind == InputKind.PARAMETER else meta
        elif spec.target in exported.constants:
            store.add_tensor(spec.target, exported.constants[spec.target])
