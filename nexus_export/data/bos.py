"""Whether calibration and evaluation windows start with the tokenizer's BOS token.

Some models are trained with a BOS token at the start of every sequence (the Gemma family, among others) and score
text without one far worse than they should: calibration statistics and perplexity both come out wrong. ``auto``
prepends it when the tokenizer adds one to every encoding by default, or when the model's family is known to need
one; ``always`` and ``never`` force the choice. A window with a BOS keeps its length in tokens: the BOS, then
``seq_len - 1`` tokens of text, so the number of predicted tokens per window is the same either way.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from nexus_export.errors import UserError

log = logging.getLogger(__name__)

BOS_MODES = ("auto", "always", "never")
# model_type values of families trained with a BOS at the start of every sequence
BOS_FAMILIES = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text", "recurrent_gemma"})


@dataclass(frozen=True)
class BosChoice:
    """The BOS decision of a run, as the report records it."""

    mode: str  # auto, always, never
    token_id: int | None  # prepended to every window, or None
    token: str | None
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def check_mode(mode) -> str:
    """``mode`` when it is one of BOS_MODES; otherwise a UserError listing them."""
    if mode not in BOS_MODES:
        raise UserError(f"bos (--bos) must be one of {', '.join(BOS_MODES)}, got {mode!r}")
    return mode


def choose_bos(tokenizer, model_type: str | None, mode: str = "auto") -> BosChoice:
    """The BOS token to prepend to every window (or none) for ``mode``; UserError for an unknown mode, or for
    ``always`` with a tokenizer that has no BOS token."""
    check_mode(mode)
    token_id = getattr(tokenizer, "bos_token_id", None)
    token = getattr(tokenizer, "bos_token", None)
    if mode == "never":
        return BosChoice(mode, None, None, "--bos never")
    if mode == "always":
        if token_id is None:
            raise UserError("--bos always: the tokenizer has no BOS token (bos_token is not set); use --bos never or "
                            "auto, or a tokenizer that defines one")
        return BosChoice(mode, int(token_id), token, "--bos always")
    if token_id is None:
        if model_type in BOS_FAMILIES:
            log.warning("%s models expect a BOS token at the start of every sequence, but this tokenizer defines "
                        "none: windows start without one, and perplexity and calibration may be off", model_type)
        return BosChoice(mode, None, None, "the tokenizer defines no BOS token")
    if adds_bos(tokenizer):
        return BosChoice(mode, int(token_id), token, "the tokenizer adds it to every encoding")
    if model_type in BOS_FAMILIES:
        return BosChoice(mode, int(token_id), token, f"{model_type} models are trained with it")
    return BosChoice(mode, None, None, "the tokenizer does not add one and the model family does not need one")


def adds_bos(tokenizer) -> bool:
    """Whether encoding a text with the tokenizer's default special tokens starts with its BOS token."""
    token_id = getattr(tokenizer, "bos_token_id", None)
    if token_id is None:
        return False
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0] == token_id
