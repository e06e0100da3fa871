"""Registry of passes and runtimes, found through package entry points so the core never imports a concrete one.

Passes register under the entry-point group ``nexus_export.passes``, runtimes under ``nexus_export.runtimes``
(see pyproject.toml); third-party packages can add their own the same way.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import entry_points

from nexus_export.errors import UserError

PASS_GROUP = "nexus_export.passes"
RUNTIME_GROUP = "nexus_export.runtimes"


@lru_cache(maxsize=None)
def _group(group: str) -> dict:
    return {ep.name: ep for ep in entry_points(group=group)}


def pass_names() -> list[str]:
    return sorted(_group(PASS_GROUP))


def get_pass(name: str) -> type:
    """The Pass class registered as ``name``; an unknown name is an error listing the registered ones."""
    eps = _group(PASS_GROUP)
    if name not in eps:
        raise UserError(f"unknown method {name!r}; available: {', '.join(sorted(eps)) or 'none (is nexus-export installed?)'}")
    return eps[name].load()


def get_runtime(name: str) -> type:
    eps = _group(RUNTIME_GROUP)
    if name not in eps:
        raise UserError(f"unknown runtime {name!r}; available: {', '.join(sorted(eps)) or 'none'}")
    return eps[name].load()
