"""torch semi-structured (2:4) runtime on CUDA: the program's 2:4 linears as ``to_sparse_semi_structured`` weights.

The program's module is moved to the GPU in fp16 (or bf16); every linear whose [out, in] weight meets 2:4 along its
input dimension is replaced by a semi-structured sparse tensor (cuSPARSELt / CUTLASS kernels), so ``aten.linear`` runs
sparse. Needs an NVIDIA GPU of compute capability 8.0 or newer; ``available()`` says why not elsewhere.
"""

from __future__ import annotations

import logging

import torch

from nexus_export.errors import UserError
from nexus_export.graph.program import Program
from nexus_export.naming import WRAPPER_PREFIX

log = logging.getLogger(__name__)


def available() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA GPU (semi-structured sparsity needs one, sm80 or newer)"
    major, minor = torch.cuda.get_device_capability(0)
    if major < 8:
        return False, f"{torch.cuda.get_device_name(0)} is sm{major}{minor}; 2:4 sparse kernels need sm80 or newer"
    return True, f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}"


def two_four_linears(program: Program) -> list[str]:
    """The linears whose weight meets 2:4 along the input dimension (nn.Linear layout only; Conv1D is skipped)."""
    names = []
    for lin in program.structure.linears.values():
        w = program.weight(lin.name)
        if lin.weight_layout != "out_in" or w.shape[1] % 4 or w.shape[0] % 8:
            continue
        if bool(((w.detach().reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()):
            names.append(lin.name)
    return names


def to_semi_structured(program: Program, dtype: torch.dtype = torch.float16) -> tuple[torch.nn.Module, list[str]]:
    """A CUDA module of the program with its 2:4 linears as semi-structured sparse weights, and their names."""
    ok, why = available()
    if not ok:
        raise UserError(why)
    from torch.sparse import to_sparse_semi_structured

    module = dense_module(program, dtype)
    names = two_four_linears(program)
    for name in names:
        path = WRAPPER_PREFIX + name
        parent = module.get_submodule(path)
        weight = parent.weight
        parent.weight = torch.nn.Parameter(to_sparse_semi_structured(weight.detach()), requires_grad=False)
    log.info("converted %d linears to semi-structured 2:4", len(names))
    return module, names


def dense_module(program: Program, dtype: torch.dtype = torch.float16) -> torch.nn.Module:
    """The program as one CUDA module with floating weights in ``dtype`` (the whole model in GPU memory)."""
    return program.materialize(dtype, "cuda")
