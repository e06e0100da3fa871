"""Program: a captured ExportedProgram plus the Structure read from it, and the few operations passes share."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from .capture import capture
from .structure import Linear, Structure, read_structure

log = logging.getLogger(__name__)


@dataclass
class Program:
    """The unit every pass takes and returns. Weights live in ``exported.state_dict``; passes edit them in place."""

    exported: torch.export.ExportedProgram
    structure: Structure
    tokenizer: Any = None
    config: Any = None
    name: str = "model"
    origin: dict = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Any = None, name: str | None = None,
                   origin: dict | None = None) -> "Program":
        """Capture ``model`` and read its structure."""
        exported = capture(model)
        return cls(exported=exported, structure=read_structure(exported), tokenizer=tokenizer,
                   config=getattr(model, "config", None), name=name or type(model).__name__, origin=origin or {})

    def linear(self, name: str) -> Linear:
        return self.structure.linears[name]

    def parameter(self, param: str) -> torch.Tensor:
        return self.exported.state_dict[param]

    def weight(self, name: str) -> torch.Tensor:
        """The matrix of linear (or embedding) ``name`` as an [out, in] view; edits through it change the program.

        GPT-2's Conv1D stores [in, out]: the view is transposed so every pass sees one orientation.
        """
        if name in self.structure.embeddings:
            return self.exported.state_dict[self.structure.embeddings[name]]
        lin = self.structure.linears[name]
        w = self.exported.state_dict[lin.weight]
        return w.t() if lin.weight_layout == "in_out" else w

    def module(self) -> torch.nn.Module:
        """A callable ``(input_ids, attention_mask) -> logits`` sharing the program's weights."""
        return self.exported.module()

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return self.module()(input_ids, mask)

    def num_parameters(self) -> int:
        """Parameters counted once per distinct storage (a tied embedding and head count once)."""
        seen: set[int] = set()
        total = 0
        for tensor in self.exported.state_dict.values():
            key = tensor.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += tensor.numel()
        return total

    def sparsity(self, names: list[str]) -> dict[str, float]:
        """Fraction of exact zeros in each named linear's weight."""
        return {n: float((self.weight(n) == 0).sum()) / self.weight(n).numel() for n in names}
