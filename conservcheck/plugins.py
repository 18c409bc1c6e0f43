"""Plug-in registries: model families, loop types and diagnostics, found by name.

A registry is an entry-point group (``conservcheck.adapters``, ``conservcheck.loops``,
``conservcheck.diagnostics``) plus the built-in entries, each ``name → "module[:attribute]"``. Entries are
imported only when asked, so a broken third-party plug-in cannot break the others or ``--help``. Built-ins
come first, in their registration order; third-party entry points follow in name order, and an entry
point whose name is a built-in name is ignored (an installed package cannot shadow a built-in). Without
entry-point metadata (a source tree never installed) the built-ins are used alone.
"""

from __future__ import annotations

import importlib
import importlib.metadata
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


def entries(group: str, builtin: Mapping[str, str]) -> list[Entry]:
    """The entries of ``group``: built-ins (registration order), then third parties by name."""
    found = [Entry(name, target, True) for name, target in builtin.items()]
    try:
        eps = importlib.metadata.entry_points(group=group)
    except Exception:  # broken metadata of an unrelated distribution must not stop the tool
        eps = ()  # type: ignore[assignment]
    extra = sorted((ep for ep in eps if ep.name not in builtin), key=lambda ep: ep.name)
    return found + [Entry(ep.name, ep.value, False) for ep in extra]
