"""The key/value cache inside a captured program: how capture marks it and how lowering finds it again.

A Hugging Face causal LM is captured as ``(input_ids, attention_mask) -> logits`` with the mask's length a dynamic
dim of its own: the past length is ``attention_mask.shape[1] - input_ids.shape[1]``. Capture hands the model a cache
(``past_cache``) whose past keys and values are zeros of that length, made from the new keys' own shape, and the
positions ``past .. past + seq - 1``. Every run of the program gives a mask as long as the ids, so the past is empty
and the program is the full-sequence model that passes, calibration and evaluation know; nothing of them changes.

The nodes that make the past tensors, the positions, and the concatenation of past and new keys and values (the
*present*) carry a tag in ``node.meta["custom"]``, which survives graph copies, edits and retracing. Lowering reads
the tags (``cache_layout``) after every pass, exports those nodes' values as extra outputs under names of its own
(``cache_outputs``: the exporter retraces and renames nodes, but keeps output names), and turns them into the inputs
and outputs of the key/value-cache model: a block a pass removed took its tagged nodes with it, so the cache model
has one pair per remaining block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch.fx.traceback import annotate

TAG = "nexus_cache"
POSITION_TAG = "position_ids"
OUTPUT_PREFIX = "cache."  # the names the cache's values are exported under (see cache_outputs)
_PAIR_TAG = re.compile(r"(past|present)\.(\d+)\.(key|value)")


def tag_of(node: torch.fx.Node) -> str | None:
    """The cache tag of a graph node, or None."""
    custom = node.meta.get("custom")
    return custom.get(TAG) if isinstance(custom, dict) else None


def _layer_class():
    """A transformers cache layer over an empty-or-not past made inside the graph (defined lazily: transformers is
    imported only by runs that capture a Hugging Face model)."""
    from transformers.cache_utils import CacheLayerMixin

    class PastLayer(CacheLayerMixin):
        """One layer's cache during capture: past keys/values of ``past_length`` (zeros, tagged), concatenated with
        the new ones (tagged as the present). Every layer is a full (not sliding) cache: a sliding-window layer's
        mask is still built from the config's window, over the whole past."""

        is_sliding = False

        def __init__(self, past_length, index: int):
            super().__init__()
            self.past_length = past_length
            self.index = index
            self.is_initialized = True

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            return None

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            out = []
            for kind, new in (("key", key_states), ("value", value_states)):
                with annotate({TAG: f"past.{self.index}.{kind}"}):
                    past = new.new_zeros(new.shape[0], new.shape[1], self.past_length, new.shape[3])
                with annotate({TAG: f"present.{self.index}.{kind}"}):
                    out.append(torch.cat([past, new], dim=-2))
            self.keys, self.values = out
            return out[0], out[1]

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.past_length + query_length, 0

        def get_seq_length(self) -> int:
            return self.past_length

        def get_max_length(self) -> int:
            return -1

    return PastLayer


def past_cache(past_length, num_layers: int):
    """The cache a model is captured with: ``num_layers`` tagged layers over a past of ``past_length``."""
    from transformers.cache_utils import Cache

    layer = _layer_class()
    return Cache(layers=[layer(past_length, i) for i in range(num_layers)])


def positions(input_ids: torch.Tensor, past_length, device: torch.device) -> torch.Tensor:
    """The tagged position ids ``past .. past + seq - 1`` for every row, [batch, seq]."""
    batch, seq = input_ids.shape
    with annotate({TAG: POSITION_TAG}):
        return (torch.arange(seq, device=device) + past_length).unsqueeze(0).expand(batch, seq)


@dataclass(frozen=True)
class CachePair:
    """One remaining attention layer's cache in the graph: the names of the nodes that make its past (zeros) and its
    present (the concatenation), for keys and values. ``layer`` is the layer's index in the captured model."""

    layer: int
    past_key: str
    past_value: str
    present_key: str
    present_value: str


@dataclass(frozen=True)
class CacheLayout:
    """Where the cache is in a program's graph: the position ids node and one pair per remaining layer, in order."""

    position: str
    pairs: tuple[CachePair, ...]


def cache_layout(exported: torch.export.ExportedProgram) -> CacheLayout | None:
    """The cache of a program captured with one (see the module docstring), read from its tags; None for a program
    captured without one (a module that is not a Hugging Face model)."""
    last: dict[str, str] = {}  # tag -> the last node carrying it (the one whose value the tag names)
    for node in exported.graph.nodes:
        tag = tag_of(node)
        if tag is not None and node.users:
            last[tag] = node.name
    position = last.get(POSITION_TAG)
    found: dict[tuple[str, int, str], str] = {}
    for tag, name in last.items():
        m = _PAIR_TAG.fullmatch(tag)
        if m:
            found[(m.group(1), int(m.group(2)), m.group(3))] = name
    layers = sorted({layer for _, layer, _ in found})
    if position is None or not layers:
        return None
    pairs = []
    for layer in layers:
        names = [found.get((what, layer, kind)) for what in ("past", "present") for kind in ("key", "value")]
        if None in names:
            raise RuntimeError(f"the key/value cache of layer {layer} is incomplete in the graph ({names})")
        pairs.append(CachePair(layer, *names))
    return CacheLayout(position=position, pairs=tuple(pairs))


def has_cache(program) -> bool:
    """Whether a program was captured with its key/value cache marked (so it lowers to a generation model too)."""
    return cache_layout(program.exported) is not None


def cache_outputs(layout: CacheLayout) -> list[tuple[str, str]]:
    """(graph node, output name) of every cache value lowering exposes, pairs renumbered 0.. in order:
    ``cache.position_ids``, ``cache.past.{i}.key`` / ``.value``, ``cache.present.{i}.key`` / ``.value``."""
    out = [(layout.position, f"{OUTPUT_PREFIX}{POSITION_TAG}")]
    for i, pair in enumerate(layout.pairs):
        out += [(pair.past_key, f"{OUTPUT_PREFIX}past.{i}.key"), (pair.past_value, f"{OUTPUT_PREFIX}past.{i}.value"),
                (pair.present_key, f"{OUTPUT_PREFIX}present.{i}.key"),
                (pair.present_value, f"{OUTPUT_PREFIX}present.{i}.value")]
    return out
