"""Progress for long loops, logged (never printed) at most every few seconds."""

from __future__ import annotations

import logging
import time

from nexus_export.memory import current_rss_mb

log = logging.getLogger("nexus_export.progress")


class Progress:
    """``Progress("evaluating dense", total)`` then ``update(done)``; logs done/total, elapsed and an estimate."""

    def __init__(self, what: str, total: int, unit: str = "", every_s: float = 5.0):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.start = time.perf_counter()
        self.last = self.start

    def __call__(self, done: int, total: int | None = None) -> None:
        self.update(done, total)

    def update(self, done: int, total: int | None = None) -> None:
        total = total or self.total
        now = time.perf_counter()
        if done < total and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / done * (total - done) if done else 0.0
        unit = f" {self.unit}" if self.unit else ""
        log.info("%s: %d/%d%s (%.0f s, ~%.0f s left, RSS %.0f MiB)", self.what, done, total, unit, elapsed, eta,
                 current_rss_mb())
