"""Plug-in registries: model families, loop types and diagnostics, found by name.

A registry is an entry-point group (``conservcheck.adapters``, ``conservcheck.loops``,
``conservcheck.diagnostics``) plus the built-in entries, each ``name → "module[:attribute]"``. Entries are
imported only when asked, so a broken third-party plug-in cannot break the others or ``--help``. Built-ins
come first, in their registration order; third-party entry points follow in name order, and an entry
point whose name is a built-in name is ignored (an installed package cannot shadow a built-in). Without
entry-point metadata (a source tree never installed) the built-ins are used alone. The installed entry
points are read once per group and import path (``sys.path``): scanning every distribution's metadata
takes milliseconds, and the report asks the registries thousands of times; a package installed while a
process runs is seen by the next process.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Entry:
    """One registered plug-in: its name and the import path of the object that implements it."""

    name: str
    target: str
    builtin: bool

    def load(self) -> Any:
        """Import the plug-in (``module`` or ``module:attribute``)."""
        module_name, _, attr = self.target.partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in filter(None, attr.split(".")):
            obj = getattr(obj, part)
        return obj


@functools.cache
def _installed(group: str, path: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """(name, target) of the entry points of ``group`` installed on import path ``path``."""
    try:
        eps = importlib.metadata.entry_points(group=group)
    except Exception:  # broken metadata of an unrelated distribution must not stop the tool
        return ()
    return tuple((ep.name, ep.value) for ep in eps)


def entries(group: str, builtin: Mapping[str, str]) -> list[Entry]:
    """The entries of ``group``: built-ins (registration order), then third parties by name."""
    found = [Entry(name, target, True) for name, target in builtin.items()]
    extra = sorted((name, target) for name, target in _installed(group, tuple(sys.path)) if name not in builtin)
    return found + [Entry(name, target, False) for name, target in extra]
