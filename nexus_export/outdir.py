"""Output folders that appear only when complete: work happens in a hidden sibling, renamed into place at the end."""

from __future__ import annotations

import fcntl
import glob
import hashlib
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from nexus_export.errors import UserError

log = logging.getLogger(__name__)


def check_output_dir(out: str | Path, force: bool, flag: str = "--out") -> Path:
    """The resolved output folder, after checking it can be written: a name is given, no parent is a regular file,
    the nearest existing parent is writable, and an existing non-empty folder is refused unless ``force`` (it is then
    replaced only after success). ``flag`` names the option in messages."""
    if not str(out).strip():
        raise UserError(f"{flag} is empty; give the folder to write, e.g. {flag} out/run")
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} exists and is not a folder; choose another {flag}")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{flag} folder {out} exists and is not empty; choose another {flag} or pass --force")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {out} lies under {parent}, which is a file, not a folder; choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out}: cannot write in {parent} (permission denied); choose another {flag}")
    return out


def check_distinct(first: Path, second: Path, names: tuple[str, str]) -> None:
    """Two folders (outputs, or an output and the model it reads) that must not be one another or lie inside one
    another."""
    if first == second or first in second.parents or second in first.parents:
        raise UserError(f"{names[0]} {first} and {names[1]} {second} overlap; give {names[1]} a folder of its own")


STAGING = ("partial", "scratch", "old")  # hidden siblings a run makes beside its output, named .OUT.<kind>-<pid>


def remove_stale(out: Path) -> list[Path]:
    """Remove the hidden staging folders beside ``out`` left by runs whose process is gone (killed, crashed); a live
    process's folders are never touched. Returns what was removed."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for path in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        kind, _, pid = path.name[len(out.name) + 2:].rpartition("-")
        if kind in STAGING and pid.isdigit() and not _alive(int(pid)):
            if kind == "old" and not out.exists():  # killed between the two renames: the previous output comes back
                path.rename(out)
                log.warning("restored %s from %s, left by a run killed while replacing it", out, path)
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``.OUT.lock`` beside ``out`` while a run writes it (its staging folders and its checkpoint are shared by
    name): a second run for the same output is refused at once, naming the first one's pid. The lock is an advisory
    ``flock``, released by the kernel when a process dies, so a killed run never leaves it held; the file is removed
    on release (and a run that locked a file just removed retries on the new one)."""
    path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"another nexus-export run (pid {holder}) is writing {out}; wait for it to finish or "
                            "choose another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and our lock: lock the current one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def staged_output(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``out``, on any error it is removed and ``out`` is untouched.
    One run at a time per output (``output_lock``). Staging folders of dead earlier runs beside ``out`` are removed
    first (a previous output that a killed run had moved aside to ``.OUT.old-<pid>`` is put back)."""
    out = check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        for path in remove_stale(out):
            log.info("removed %s, left by an interrupted run", path)
        out = check_output_dir(out, force)  # again: a previous output may have been put back
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)


def file_mode() -> int:
    """The mode a new regular file gets under the process's umask (0o644 under the usual 022). Written files are set
    to it because safetensors and temporary files are created 0600. The umask is read from /proc, not by setting it,
    which would briefly change it for every thread."""
    try:
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = 0o022
    return 0o666 & ~mask


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
