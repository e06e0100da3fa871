"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input: the message says what was wrong, what was expected, and what to do."""


class VerificationFailed(Exception):
    """A check of an artifact found a difference (a bundle's generation no longer gives its recorded tokens): not
    bad input, but a failed verification (exit code 1)."""
