"""Where calibration and evaluation text comes from.

A source is one of:

- ``"austen"`` (the default): six Jane Austen novels vendored in this package as gzip files. The calibration split is
  Pride and Prejudice, Sense and Sensibility, Mansfield Park and Northanger Abbey; the evaluation split is Emma and
  Persuasion (each joined with a blank line, in that order). Works offline on a fresh machine.
- a local ``.txt`` file: the same text serves both splits.
- a local folder of ``.txt`` files (read in sorted name order, joined with a blank line). If some file names contain
  ``calib`` or ``train`` and others contain ``eval`` or ``test``, the first group is the calibration split and the
  second the evaluation split; otherwise every file serves both splits.
- ``"wikitext2"`` or ``"c4"``: fetched with the Hugging Face ``datasets`` package, which needs a network. Not available
  offline; use a local text file instead.

A calibration source may also be a mix, ``"austen:0.5,notes.txt:0.5"``: sources with the share of the calibration
windows each gives (see ``parse_mix``; the windows are cut from each source's own stream).
"""

from __future__ import annotations

import gzip
import logging
import math
import os
from importlib import resources
from pathlib import Path

from nexus_export.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("calibration", "evaluation")
NAMED_SOURCES = ("austen", "wikitext2", "c4")

_CALIBRATION_MARKERS = ("calib", "train")
_EVALUATION_MARKERS = ("eval", "test")
# C4 is hundreds of GB; stream documents until this much text is collected (about the size of the Austen streams).
_C4_MAX_CHARS = 3_000_000


def load_text(source: str | os.PathLike = "austen", split: str = "calibration") -> str:
    """The text of one split ("calibration" or "evaluation") of a source, as a single string."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    name = os.fspath(source)
    if name == "austen":
        return _austen(split)
    if name == "wikitext2":
        return _wikitext2(split)
    if name == "c4":
        return _c4(split)
    path = Path(name).expanduser()
    if path.is_file():
        return _text_file(path)
    if path.is_dir():
        return _text_folder(path, split)
    raise UserError(
        f"unknown text source {name!r}: expected one of {', '.join(NAMED_SOURCES)}, "
        "or the path of an existing .txt file or a folder of .txt files"
    )


def _austen(split: str) -> str:
    """The vendored Austen stream of a split (decompressed from the package data)."""
    resource = resources.files("nexus_export.data").joinpath(f"austen_{split}.txt.gz")
    return gzip.decompress(resource.read_bytes()).decode("utf-8")


def _text_file(path: Path) -> str:
    """The contents of one UTF-8 text file."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"text source {path} is not UTF-8 text ({exc}); convert it to UTF-8 and try again") from exc


def _text_folder(folder: Path, split: str) -> str:
    """The .txt files of a folder joined with a blank line, split by file name when the names say calib/eval."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".txt")
    if not files:
        raise UserError(f"text source folder {folder} holds no .txt files; put UTF-8 .txt files in it")
    calibration = [p for p in files if _matches(p, _CALIBRATION_MARKERS)]
    evaluation = [p for p in files if _matches(p, _EVALUATION_MARKERS)]
    ambiguous = sorted(set(calibration) & set(evaluation))
    if ambiguous:
        raise UserError(
            f"cannot tell which split {ambiguous[0].name} in {folder} belongs to: its name says both calibration "
            f"({'/'.join(_CALIBRATION_MARKERS)}) and evaluation ({'/'.join(_EVALUATION_MARKERS)}); rename it"
        )
    if calibration and evaluation:
        chosen = calibration if split == "calibration" else evaluation
    else:
        chosen = files
    log.debug("text source %s, split %s: %s", folder, split, [p.name for p in chosen])
    return "\n\n".join(_text_file(p) for p in chosen)


def _matches(path: Path, markers: tuple[str, ...]) -> bool:
    """Whether a file name contains one of the markers (case-insensitive)."""
    stem = path.stem.lower()
    return any(marker in stem for marker in markers)


def _import_datasets(source: str):
    """The `datasets` module, or a UserError saying how to do without it."""
    try:
        import datasets
    except ImportError as exc:
        raise UserError(
            f"text source {source!r} needs the 'datasets' package (pip install datasets) and a network; "
            "without them, pass the path of a local .txt file or folder, or use the built-in 'austen'"
        ) from exc
    return datasets


def _download_failed(source: str, exc: Exception) -> UserError:
    """The error for a data set that could not be fetched."""
    return UserError(
        f"could not fetch text source {source!r} with 'datasets' ({type(exc).__name__}: {exc}); "
        "check the network, or pass the path of a local .txt file or folder, or use the built-in 'austen'"
    )


def _wikitext2(split: str) -> str:
    """WikiText-2 (raw): the train split for calibration, the test split for evaluation."""
    datasets = _import_datasets("wikitext2")
    hf_split = "train" if split == "calibration" else "test"
    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
    except Exception as exc:  # network, hub and cache errors all come here
        raise _download_failed("wikitext2", exc) from exc
    return "\n\n".join(rows["text"])


def _c4(split: str) -> str:
    """C4 (English): the first documents of the first train shard (calibration) or validation shard (evaluation)."""
    datasets = _import_datasets("c4")
    if split == "calibration":
        shard = "en/c4-train.00000-of-01024.json.gz"
    else:
        shard = "en/c4-validation.00000-of-00008.json.gz"
    try:
        rows = datasets.load_dataset("allenai/c4", data_files={"shard": shard}, split="shard", streaming=True)
        texts: list[str] = []
        size = 0
        for row in rows:
            texts.append(row["text"])
            size += len(row["text"])
            if size >= _C4_MAX_CHARS:
                break
    except Exception as exc:  # network, hub and cache errors all come here
        raise _download_failed("c4", exc) from exc
    return "\n\n".join(texts)


def parse_mix(source: str | os.PathLike) -> list[tuple[str, float]] | None:
    """The parts of a mix, ``"austen:0.5,notes.txt:0.5"`` -> ``[("austen", 0.5), ("notes.txt", 0.5)]``; None for a
    single source (no share given). Shares must be positive and sum to 1; a source may appear once."""
    text = os.fspath(source)
    if not is_mix(text):
        return None
    parts: list[tuple[str, float]] = []
    for item in text.split(","):
        name, sep, share = item.strip().rpartition(":")
        if not sep or not name or not _share_suffix(item.strip()):
            raise UserError(f"calibration mix part {item.strip()!r} is not SOURCE:SHARE; write the mix as e.g. "
                            "austen:0.5,notes.txt:0.5 (shares summing to 1)")
        value = float(share)
        if not 0.0 < value <= 1.0:
            raise UserError(f"calibration mix share {share} of {name!r} is outside (0, 1]; shares are fractions of "
                            "the calibration windows, summing to 1")
        if name in (n for n, _ in parts):
            raise UserError(f"calibration mix names {name!r} twice; give each source once with its whole share")
        parts.append((name, value))
    total = sum(v for _, v in parts)
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise UserError(f"calibration mix shares sum to {total:g}, not 1: {text!r}; e.g. austen:0.5,notes.txt:0.5")
    return parts


def is_mix(source: str | os.PathLike) -> bool:
    """Whether a source is written as a mix (several sources, or one with a share)."""
    text = os.fspath(source)
    return "," in text or _share_suffix(text)


def _share_suffix(text: str) -> bool:
    """Whether ``text`` ends with ``:<number>`` (a share)."""
    _, sep, tail = text.rpartition(":")
    try:
        float(tail)
    except ValueError:
        return False
    return bool(sep)


def mix_counts(parts: list[tuple[str, float]], n: int) -> list[int]:
    """How many of ``n`` windows each part of a mix gives: its share of ``n``, rounded by largest remainder so the
    counts sum to ``n``; every part gives at least one window or the mix is refused."""
    exact = [share * n for _, share in parts]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(parts)), key=lambda i: exact[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    empty = [name for (name, _), c in zip(parts, counts) if c == 0]
    if empty:
        raise UserError(f"the calibration mix gives {', '.join(empty)} no window of {n}; raise the number of "
                        "calibration windows (--calib-samples) or that source's share")
    return counts
