"""GPTQ's scales and zero points kept on disk from lowering to the int4 file, one small file per layer.

The int4 file is written after the program is let go, from the grids the GPTQ pass chose. They are 5/32 of a byte a
weight at groups of 32 (float32 scales, uint8 zero points): by count about 300 MB at TinyLlama's width and 44
blocks, about 11 GB for a 70B model, so holding them all in memory until then made the run's peak grow with depth. ``GridFiles``
writes each layer's pair as the program gives it and reads one pair back when the writer asks for that layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class GridFiles(Mapping):
    """Layer name -> (scales, zero points), each layer's pair read from its file in ``folder`` when asked for."""

    def __init__(self, folder: Path, layers: list[str]):
        self.folder = folder
        self._index = {layer: i for i, layer in enumerate(layers)}

    @classmethod
    def save(cls, grids: Iterable[tuple[str, tuple[torch.Tensor, torch.Tensor]]], folder: str | Path) -> GridFiles:
        """Write every (layer, (scales, zero points)) of ``grids`` to ``folder``, one layer at a time."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        layers = []
        for layer, (scales, zeros) in grids:
            save_file({"scales": scales.contiguous(), "zeros": zeros.contiguous()}, folder / f"{len(layers)}.safetensors")
            layers.append(layer)
        return cls(folder, layers)

    def __getitem__(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = load_file(self.folder / f"{self._index[layer]}.safetensors")
        return tensors["scales"], tensors["zeros"]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)
