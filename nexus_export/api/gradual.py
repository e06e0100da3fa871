"""Gradual sparsification for users who fine-tune: the cubic schedule of Zhu & Gupta and masks that stay applied.

    scheduler = CubicSparsityScheduler(0.0, 0.5, total_steps=300)
    masks = apply_sparsity(model, scheduler.sparsity(0))
    for step in range(300):
        ...loss.backward(); optimizer.step()        # masked weights stay at zero through every step
        if step % 50 == 0:
            masks.update(scheduler.sparsity(step))  # raise sparsity: recompute masks from the current weights
    masks.remove()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from nexus_export.errors import UserError
from nexus_export.graph.program import Program
from nexus_export.registry import get_pass


@dataclass(frozen=True)
class CubicSparsityScheduler:
    """s(t) = final + (initial - final) * (1 - t / total_steps)^3, held at ``final`` after ``total_steps``."""

    initial_sparsity: float
    final_sparsity: float
    total_steps: int

    def __post_init__(self):
        if self.total_steps <= 0:
            raise UserError(f"total_steps must be positive, got {self.total_steps}")
        if not 0.0 <= self.initial_sparsity <= self.final_sparsity < 1.0:
            raise UserError(f"need 0 <= initial_sparsity <= final_sparsity < 1, got {self.initial_sparsity} and "
                            f"{self.final_sparsity}")

    def sparsity(self, step: int) -> float:
        t = min(max(step, 0), self.total_steps) / self.total_steps
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - t) ** 3


class SparsityMasks:
    """Keep masks on a model's linears: masked weights get zero gradients, are zeroed again after every step of an
    optimizer that updates them (momentum would otherwise move them), and before every forward pass."""

    def __init__(self, model: torch.nn.Module, names: list[str], method: str, pattern: str | None):
        self.model, self.names, self.method, self.pattern = model, names, method, pattern
        self.masks: dict[str, torch.Tensor] = {}
        watched = {id(model.get_submodule(name).weight) for name in names}

        def after_step(optimizer, args, kwargs) -> None:
            if any(id(p) in watched for group in optimizer.param_groups for p in group["params"]):
                self.reapply()

        self._handles = [model.register_forward_pre_hook(lambda module, args: self.reapply()),
                         register_optimizer_step_post_hook(after_step)]
        for name in names:
            self._handles.append(self.model.get_submodule(name).weight.register_hook(
                lambda grad, name=name: grad * self._stored_mask(name, grad)))

    def _transposed(self, name: str) -> bool:
        return type(self.model.get_submodule(name)).__name__ == "Conv1D"

    def _weight(self, name: str) -> torch.Tensor:
        w = self.model.get_submodule(name).weight
        return w.t() if self._transposed(name) else w  # [out, in], as every pass sees it

    def _stored_mask(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The mask of ``name`` in the parameter's own layout (ones before the first update)."""
        keep = self.masks.get(name)
        if keep is None:
            return torch.ones_like(like)
        return (keep.t() if self._transposed(name) else keep).to(like.dtype)

    @torch.no_grad()
    def update(self, sparsity: float) -> None:
        """Recompute every mask at ``sparsity`` from the current weights (already-masked weights stay masked)."""
        if self.method != "magnitude":
            raise UserError(f"gradual sparsity supports method 'magnitude', got {self.method!r}")
        magnitude = get_pass("magnitude")
        for name in self.names:
            self.masks[name] = magnitude.keep_mask(self._weight(name), sparsity, self.pattern, name)
        self.reapply()

    @torch.no_grad()
    def reapply(self) -> None:
        for name, keep in self.masks.items():
            self._weight(name).mul_(keep.to(self._weight(name).dtype))

    def sparsity(self) -> float:
        zeros = sum(int((self._weight(n) == 0).sum()) for n in self.names)
        return zeros / sum(self._weight(n).numel() for n in self.names)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def apply_sparsity(model: torch.nn.Module, sparsity: float, method: str = "magnitude",
                   pattern: str | None = None) -> SparsityMasks:
    """Mask the linears inside the decoder blocks (found from the captured graph) and keep them masked while training."""
    program = Program.from_model(model)
    names = [lin.name for lin in program.structure.in_blocks()]
    del program
    masks = SparsityMasks(model, names, method, pattern)
    masks.update(sparsity)
    return masks
