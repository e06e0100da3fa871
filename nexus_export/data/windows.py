"""Token windows for calibration and evaluation, cut from one tokenized stream per split.

The default protocol (see shared/data/README.md): calibration = ``n`` windows of ``seq_len`` tokens at random offsets
``torch.randint(0, len(stream) - seq_len, (n,))`` from ``torch.Generator().manual_seed(seed)``; evaluation = the first
``n`` non-overlapping windows of the evaluation stream. With a BOS token (``bos``, see ``nexus_export.data.bos``) every
window is that token followed by ``seq_len - 1`` tokens of text, cut the same way. Streams are tokenized whole, without
special tokens, once per (tokenizer, source, split) in a process: tokenizing the Austen streams with a real tokenizer
takes seconds.
A local file edited while a process runs is therefore not re-read by that process.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import time

import numpy as np
import torch
from tokenizers import Tokenizer

from nexus_export.data.sources import load_text, mix_counts, parse_mix
from nexus_export.errors import UserError

log = logging.getLogger(__name__)


def calibration_windows(
    tokenizer, source: str | os.PathLike = "austen", n: int = 64, seq_len: int = 512, seed: int = 0,
    bos: int | None = None,
) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens at seeded random offsets in the calibration stream: LongTensor [n, seq_len].

    Windows may overlap; the same seed gives the same windows. ``bos``: a token id that starts every window.
    A mix (``"austen:0.5,notes.txt:0.5"``) takes each source's share of the windows from its own stream, as a single
    source would give them, and interleaves them in a seeded order (so every prefix, e.g. ShortGPT's rank windows,
    holds a mix).
    """
    _check_sizes(n, seq_len, bos)
    parts = parse_mix(source)
    if parts is not None:
        pieces = [calibration_windows(tokenizer, name, count, seq_len, seed, bos)
                  for (name, _), count in zip(parts, mix_counts(parts, n))]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return torch.cat(pieces)[order]
    stream = _stream(tokenizer, source, "calibration")
    body = seq_len - (bos is not None)
    needed = body + 1  # randint needs a non-empty range
    if len(stream) < needed:
        raise _too_short(source, "calibration", len(stream), needed, f"{n} random windows of {seq_len} tokens")
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, len(stream) - body, (n,), generator=generator)
    return _with_bos(torch.stack([stream[o : o + body] for o in offsets.tolist()]), bos)


def evaluation_windows(
    tokenizer, source: str | os.PathLike = "austen", n: int = 64, seq_len: int = 512, bos: int | None = None
) -> torch.Tensor:
    """The first ``n`` disjoint windows of ``seq_len`` tokens of the evaluation stream: LongTensor [n, seq_len]
    (``bos``: a token id that starts every window, followed by ``seq_len - 1`` tokens of the stream)."""
    _check_sizes(n, seq_len, bos)
    stream = _stream(tokenizer, source, "evaluation")
    body = seq_len - (bos is not None)
    needed = n * body
    if len(stream) < needed:
        raise _too_short(source, "evaluation", len(stream), needed, f"{n} windows of {seq_len} tokens")
    return _with_bos(stream[:needed].reshape(n, body).clone(), bos)  # a copy: callers must not change the stream


def _with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """``windows`` with a column of ``bos`` in front (unchanged when ``bos`` is None)."""
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), int(bos), dtype=windows.dtype), windows], dim=1)


MAX_TOKENS = 2**30  # windows x length: 8 GiB of token ids; more is a typo, not a calibration set


def _check_sizes(n: int, seq_len: int, bos: int | None = None) -> None:
    """Reject window counts and lengths that are not positive integers, or absurdly many tokens."""
    for label, value in (("n", n), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{label} must be a positive integer, got {value!r}")
    if bos is not None and seq_len < 2:
        raise UserError(f"seq_len {seq_len} leaves no room for text after the BOS token; use at least 2")
    if n * seq_len > MAX_TOKENS:
        raise UserError(f"{n} windows of {seq_len} tokens are {n * seq_len:.3g} tokens, more than the {MAX_TOKENS:,} "
                        "this tool windows; use fewer or shorter windows")


def _too_short(source, split: str, have: int, needed: int, what: str) -> UserError:
    """The error for a stream with fewer tokens than the windows need."""
    return UserError(
        f"the {split} text of source {os.fspath(source)!r} is too short: {have} tokens, but {what} need {needed}; "
        "use a longer text, fewer windows (n) or shorter windows (seq_len)"
    )


class _TokenizerKey:
    """A hashable handle on a tokenizer, equal for tokenizers that produce the same ids; holds the tokenizer itself."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.key = _tokenizer_identity(tokenizer)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _TokenizerKey) and other.key == self.key


def _tokenizer_identity(tokenizer) -> tuple:
    """What determines a tokenizer's output: its full serialized definition when it has one, else name and size."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return ("fast", hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest())
    return (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer))


def _stream(tokenizer, source, split: str) -> torch.Tensor:
    """The token ids of a whole split as a 1-D LongTensor (cached; callers must not modify it)."""
    return _cached_stream(_TokenizerKey(tokenizer), os.fspath(source), split)


@functools.lru_cache(maxsize=8)
def _cached_stream(key: _TokenizerKey, source: str, split: str) -> torch.Tensor:
    """Tokenize one split once per process."""
    text = load_text(source, split)
    start = time.perf_counter()
    ids = _encode(key.tokenizer, text)
    log.info(
        "tokenized %s/%s: %d characters -> %d tokens in %.1f s",
        source, split, len(text), len(ids), time.perf_counter() - start,
    )
    return ids


def _encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids of a text with no special tokens added and no warning about exceeding the model's maximum length.

    A long text is encoded paragraph by paragraph (split where a blank line follows a visible character: a boundary
    the usual pre-tokenizers split at anyway) when that gives the same ids as encoding it whole, checked on the text's first ``_SAMPLE_CHARS`` characters: tokenizers that start every sequence afresh
    (a prefix space, a leading "▁") differ at the splits and are encoded whole. Paragraph batches need a fraction of
    the memory and time of one encoding of a whole book series (offsets and token strings for every token).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return torch.tensor(tokenizer.encode(text, add_special_tokens=False, verbose=False), dtype=torch.long)
    # The Rust tokenizer has no notion of a model maximum length, so it does not warn; a copy drops any truncation
    # or padding its owner configured, without changing the caller's tokenizer.
    if backend.truncation is not None or backend.padding is not None:
        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    sample = text[:_SAMPLE_CHARS]
    if len(text) > _SAMPLE_CHARS and _by_paragraphs(backend, sample).tolist() == \
            backend.encode(sample, add_special_tokens=False).ids:
        return torch.from_numpy(_by_paragraphs(backend, text))
    return torch.tensor(backend.encode(text, add_special_tokens=False).ids, dtype=torch.long)


_SAMPLE_CHARS = 200_000
_BATCH = 256


def _by_paragraphs(backend, text: str) -> np.ndarray:
    """Ids of ``text`` encoded in pieces that each start with a blank line, concatenated."""
    pieces = re.split(r"(?<=\S)(?=\n\n)", text)
    out = []
    for i in range(0, len(pieces), _BATCH):
        out += [np.asarray(e.ids, dtype=np.int64) for e in backend.encode_batch(pieces[i:i + _BATCH],
                                                                             add_special_tokens=False)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
