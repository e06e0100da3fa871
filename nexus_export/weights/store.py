"""The weight store: every tensor of a program by name, wherever it lives, handed out one at a time.

A captured program holds no weights (its state_dict has meta tensors: shapes and dtypes only). The store knows where
each tensor is: a range of bytes in a checkpoint shard, a tensor in memory (a model's own parameter, or one a pass
produced), or a range in a scratch file it spilled to. ``get`` reads one tensor in the dtype and on the device the
computation asks for; ``set`` keeps what a pass produced, in the store's output dtype. Produced tensors stay in memory
while they fit the budget; past it the oldest are written to a scratch safetensors file and read back from there, so a
run never needs to hold the whole model.

Structural passes work on a ``fork``: a second store that shares every unchanged tensor with the first and keeps its
own changes, so the program a pass started from keeps its weights and nothing is copied. A store and its forks share
one budget: what any of them produced counts once, against the same cap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from nexus_export.errors import UserError
from nexus_export.memory import trim
from nexus_export.weights.shards import TensorLocation, read_header, read_tensor

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 2 * 2**30
COMPANION = "::"  # "W::qscale" goes with W (a quantized weight's scales): saved and restored with it


@dataclass
class _Entry:
    shape: tuple[int, ...]
    dtype: torch.dtype  # the dtype it is held in
    location: TensorLocation | None = None  # on disk (checkpoint shard or spill file)
    tensor: torch.Tensor | None = None  # in memory
    owned: bool = False  # produced by a pass: counts against the budget and may be spilled


class _Ledger:
    """The produced tensors a store and its forks hold in memory, oldest first, and the one budget they share.

    Entries are held by weak reference: an edit no store names any more (replaced, dropped) is freed as usual and
    leaves the ledger by itself."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self.spilled_bytes = 0
        self._held: list[weakref.ref[_Entry]] = []

    def add(self, entry: _Entry) -> None:
        self._held.append(weakref.ref(entry))

    def held(self) -> list[_Entry]:
        """The produced tensors still in memory, oldest first (the dead and the spilled are forgotten here)."""
        live = [(ref, e) for ref in self._held if (e := ref()) is not None and e.tensor is not None]
        self._held = [ref for ref, _ in live]
        return [e for _, e in live]

    def resident_bytes(self) -> int:
        return sum(nbytes(e.shape, e.dtype) for e in self.held())


class _Scratch:
    """A folder for spill files: the one given, or a temporary one removed when the last store using it is gone."""

    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder is not None else None
        self._made: Path | None = None

    def path(self) -> Path:
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            return self.folder
        if self._made is None:
            self._made = Path(tempfile.mkdtemp(prefix="nexus-export-spill-"))
            weakref.finalize(self, shutil.rmtree, self._made, True)
        return self._made


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    count = 1
    for d in shape:
        count *= int(d)
    return count * torch.empty((), dtype=dtype).element_size()


def parse_bytes(text: str | int) -> int:
    """``8GiB``, ``512MiB``, ``2G``, ``1e9`` or a plain integer -> bytes; a UserError says what is accepted."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        s = str(text).strip().lower().replace(" ", "")
        units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
                 "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "b": 1}
        factor = 1
        for unit, f in units.items():
            if s.endswith(unit):
                s, factor = s[: -len(unit)], f
                break
        try:
            value = int(float(s) * factor)
        except (ValueError, OverflowError):  # not a number, nan, inf
            value = -1
    if value <= 0:
        raise UserError(f"memory size {text!r} is not a positive size; use e.g. 8GiB, 512MiB or a byte count")
    return value


SPILL_FILE_BYTES = 128 * 2**20  # the most a spill holds twice (see WeightStore.spill)


class WeightStore:
    """Tensors by name (the program's parameter, buffer and constant names); see the module docstring.

    ``dtype``: the floating dtype produced tensors are kept in (the output dtype; None keeps each tensor's own).
    ``write_through``: a produced tensor of unchanged shape is copied into the memory it replaces when that memory
    belongs to a caller's model (the Python API's in-place pruning), instead of being kept beside it.
    """

    def __init__(self, budget: int = DEFAULT_BUDGET, scratch: Path | None = None, dtype: torch.dtype | None = None,
                 write_through: bool = False):
        self.dtype = dtype
        self.write_through = write_through
        self._entries: dict[str, _Entry] = {}
        self._scratch = scratch if isinstance(scratch, _Scratch) else _Scratch(scratch)
        self._ledger = _Ledger(budget)

    @property
    def budget(self) -> int:
        return self._ledger.budget

    @budget.setter
    def budget(self, value: int) -> None:
        """A new cap for this store and its forks (one ledger); spills at once what no longer fits."""
        self._ledger.budget = int(value)
        if self.resident_bytes() > self._ledger.budget:
            self.spill(self._ledger.budget)

    def scratch_folder(self) -> Path:
        """The folder this store spills to (made when first asked for), where a pass may put temporary files of its
        own: the run's scratch folder, on the disk the run's outputs were checked to fit."""
        return self._scratch.path()

    @property
    def spilled_bytes(self) -> int:
        """Bytes this store and its forks wrote to scratch files so far."""
        return self._ledger.spilled_bytes

    # ------------------------------------------------------------------------------------------------ filling

    def add_location(self, name: str, loc: TensorLocation) -> None:
        """``name`` is read from ``loc`` (a checkpoint shard) whenever it is asked for."""
        self._entries[name] = _Entry(loc.shape, loc.dtype, location=loc)

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """``name`` is ``tensor``, held by the caller (a model's parameter): read, never freed or counted."""
        tensor = tensor.detach()
        self._entries[name] = _Entry(tuple(tensor.shape), tensor.dtype, tensor=tensor)

    # ------------------------------------------------------------------------------------------------ reading

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return list(self._entries)

    def companions(self, name: str) -> list[str]:
        """Names of the tensors that go with ``name`` (``name::something``: a quantized weight's scales)."""
        prefix = name + COMPANION
        return [other for other in self._entries if other.startswith(prefix)]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def stored_dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def nbytes(self, name: str, dtype: torch.dtype | None = None) -> int:
        entry = self._entry(name)
        return nbytes(entry.shape, dtype if dtype is not None and entry.dtype.is_floating_point else entry.dtype)

    def get(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """The tensor ``name`` (floating tensors converted to ``dtype``), on ``device``. Treat it as read-only: it
        may be the memory the store holds; change it with ``set``."""
        entry = self._entry(name)
        return _converted(entry.tensor if entry.tensor is not None else read_tensor(entry.location, dtype), dtype,
                          device)

    def rows(self, name: str, start: int, count: int, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> torch.Tensor:
        """Rows ``start .. start+count`` of ``name`` along its first axis, as ``get`` gives them: from a shard only
        their bytes are read, so a 128k-row head or embedding is never whole in memory in the compute dtype."""
        entry = self._entry(name)
        if entry.tensor is not None:
            tensor = entry.tensor.narrow(0, start, count)
        else:
            loc = entry.location
            row = loc.nbytes // loc.shape[0]
            part = dataclasses.replace(loc, start=loc.start + start * row, end=loc.start + (start + count) * row,
                                       shape=(count, *loc.shape[1:]))
            tensor = read_tensor(part, dtype)
        return _converted(tensor, dtype, device)

    def identity(self, name: str, exact: bool = False) -> str:
        """A cheap signature of a tensor's contents: where it lies in the checkpoint (file, offset, size, the file's
        size and modification time), or, for a tensor a pass produced or a caller holds (in memory or spilled to a
        scratch file whose name changes from run to run), a hash of about 4096 of its values spread over the whole
        tensor; with ``exact``, of all of them (what a cache of results keyed by the weights needs)."""
        entry = self._entry(name)
        if entry.tensor is None and not entry.owned:
            loc = entry.location
            stat = loc.path.stat()
            return f"{loc.path}:{loc.start}:{loc.nbytes}:{stat.st_size}:{stat.st_mtime_ns}"
        if exact:
            data = self.get(name).detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            return f"{entry.shape}:{entry.dtype}:{hashlib.sha256(data).hexdigest()}"
        flat = self.get(name).reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes()
        return f"{entry.shape}:{entry.dtype}:{hashlib.sha256(sample).hexdigest()[:16]}"

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"the weight store has no tensor {name!r}") from None

    # ------------------------------------------------------------------------------------------------ writing

    def set(self, name: str, value: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """Keep ``value`` as the new ``name`` (any shape): in ``dtype`` if given, else as ``dtype_for`` says. The
        store takes ``value`` over (it may keep that very tensor): do not change it afterwards. Past the budget
        (shared with the forks), the oldest produced tensors are spilled."""
        value = value.detach()
        old = self._entries.get(name)
        dtype = dtype or self.dtype_for(name, value.dtype)
        if (self.write_through and old is not None and old.tensor is not None and not old.owned
                and tuple(old.shape) == tuple(value.shape)):
            old.tensor.copy_(value)
            return
        kept = value.to(device="cpu", dtype=dtype).contiguous()  # the store may keep ``value`` itself
        entry = _Entry(tuple(kept.shape), kept.dtype, tensor=kept, owned=True)
        self._entries[name] = entry
        self._ledger.add(entry)
        if self.resident_bytes() > self.budget:
            self.spill(self.budget - min(SPILL_FILE_BYTES, self.budget // 2))

    def alias(self, name: str, existing: str) -> None:
        """``name`` starts as the same tensor as ``existing`` (no copy); a later ``set`` of either parts them."""
        e = self._entry(existing)
        self._entries[name] = _Entry(e.shape, e.dtype, e.location, e.tensor, owned=False)  # counted once

    def dtype_for(self, name: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype ``set`` keeps a tensor of ``dtype`` in under ``name``: the store's output dtype for a floating
        tensor, else the dtype ``name`` has now, else float32 for float64 (which is for the math only)."""
        if not dtype.is_floating_point:
            return dtype
        old = self._entries.get(name)
        if self.dtype is not None:
            return self.dtype
        if old is not None and old.dtype.is_floating_point:
            return old.dtype
        return torch.float32 if dtype == torch.float64 else dtype

    def drop(self, name: str) -> None:
        self._entries.pop(name, None)

    def rename(self, mapping: dict[str, str]) -> None:
        """Rename several tensors at once (old -> new); names not in ``mapping`` stay."""
        self._entries = {mapping.get(name, name): entry for name, entry in self._entries.items()}

    def fork(self) -> "WeightStore":
        """A store that starts with this one's tensors (shared, not copied) and keeps its own changes.

        The entries themselves are shared until either store sets a new tensor under a name, so a spill by either
        frees the memory for both (with copied entries, a shared edit spilled by one stayed in memory through the
        other: SliceGPT's fused and projected stores held up to twice the budget that way). They also share one budget
        (``_Ledger``): with one each, a pass that forks held a budget per store."""
        other = WeightStore(self.budget, self._scratch, self.dtype, write_through=False)
        other._entries = dict(self._entries)
        other._ledger = self._ledger
        return other

    # ------------------------------------------------------------------------------------------------ memory

    def resident_bytes(self) -> int:
        """Bytes of produced tensors this store and its forks hold in memory (what the budget caps)."""
        return self._ledger.resident_bytes()

    def total_bytes(self) -> int:
        """Bytes of every tensor as stored."""
        return sum(nbytes(e.shape, e.dtype) for e in self._entries.values())

    def make_room(self, nbytes: int) -> None:
        """Spill the oldest produced tensors so that ``nbytes`` more fit under the budget: for a pass about to
        compute a tensor too large to come on top of a full budget (a vocabulary-sized matrix), before it does."""
        if self.resident_bytes() + nbytes > self.budget:
            self.spill(max(0, self.budget - nbytes))

    def adopt(self, path: Path) -> None:
        """The produced tensors saved in ``path`` (a safetensors file keyed by this store's names, written from what
        it holds: a pass's resume checkpoint) are read from that file from now on: they leave memory and never go to
        a spill file, so a finished block is on disk once, not in its checkpoint and again in the scratch folder."""
        for key, loc in read_header(path).items():
            entry = self._entries.get(key)
            if entry is not None and entry.tensor is not None and entry.owned and loc.dtype == entry.dtype \
                    and tuple(loc.shape) == tuple(entry.shape):
                entry.location, entry.tensor = loc, None
        trim()

    def spill(self, keep: int = 0) -> None:
        """Write the oldest produced tensors held in memory (by this store or its forks) to scratch files and free
        them, until at most ``keep`` bytes stay. Spilling the oldest rather than everything keeps what is resident
        near the budget at every point of a pass, so the peak does not depend on where the last spill fell. Files of
        about SPILL_FILE_BYTES each, every group freed as soon as it is written: safetensors serializes a file's
        tensors in memory first, so one file for everything would briefly double what the budget holds."""
        held = self._ledger.held()
        excess = sum(nbytes(e.shape, e.dtype) for e in held) - keep
        group: list[_Entry] = []
        size = 0
        for entry in held:
            if excess <= 0:
                break
            group.append(entry)
            size += nbytes(entry.shape, entry.dtype)
            excess -= nbytes(entry.shape, entry.dtype)
            if size >= SPILL_FILE_BYTES:
                self._spill_group(group)
                group, size = [], 0
        if group:
            self._spill_group(group)

    def _spill_group(self, entries: list[_Entry]) -> None:
        path = self._scratch.path() / f"spill-{uuid.uuid4().hex[:12]}.safetensors"
        tmp = path.with_name("." + path.name + ".tmp")
        keys = [f"t{i}" for i in range(len(entries))]  # an entry may go by different names in different forks
        try:
            save_file({key: entry.tensor for key, entry in zip(keys, entries)}, str(tmp))
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise UserError(f"cannot spill weights to {path.parent} ({exc.strerror or exc}); free disk space there or "
                            "raise --memory-budget") from None
        locations = read_header(path)
        for key, entry in zip(keys, entries):
            entry.location = locations[key]
            entry.tensor = None
        trim()  # the freed tensors leave holes in the C heap: hand them back now
        size = sum(loc.nbytes for loc in locations.values())
        self._ledger.spilled_bytes += size
        log.info("weight store: spilled %d tensors (%.0f MiB) to %s", len(entries), size / 2**20, path.name)


def _converted(tensor: torch.Tensor, dtype: torch.dtype | None, device: torch.device | str | None) -> torch.Tensor:
    """``tensor`` in ``dtype`` (floating tensors only) and on ``device``, each where given."""
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    if device is not None and tensor.device != torch.device(device):
        tensor = tensor.to(device, non_blocking=False)
    return tensor
