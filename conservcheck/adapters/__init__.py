"""Model adapters: one small module per model family, found through an entry-point registry.

Each adapter module exposes ``NAME``, ``detect(path) -> bool`` and ``load(path, *, device, dtype,
trust_remote_code, **options) -> VectorFieldProbe`` (the adapter contract, ``docs/adapters.md``).
Adapters are listed in the entry-point group ``conservcheck.adapters`` (name → module) and imported only
when asked, so a broken third-party adapter cannot break the others or the CLI. The built-in families
are always asked first, in :data:`BUILTIN` order; third-party entry points follow in name order.

Besides the families, this package holds what several of them share: resolving a model reference to an
adapter (:mod:`.resolve`), the Hugging Face hub (:mod:`.hub`), weights files (:mod:`.weights`) and the
diffusers helpers (:mod:`._diffusers`). Importing it imports no model library.
"""

from __future__ import annotations

import pathlib
import warnings
from typing import Any

from conservcheck import plugins
from conservcheck.errors import ModelLoadError, reason

GROUP = "conservcheck.adapters"

BUILTIN: dict[str, str] = {
    "embedded": "conservcheck.adapters.embedded",
    "diffusers": "conservcheck.adapters.diffusers_unet",
    "text_to_image": "conservcheck.adapters.text_to_image",
    "dit": "conservcheck.adapters.dit",
    "sd3": "conservcheck.adapters.sd3",
    "latent": "conservcheck.adapters.latent",
    "score_sde": "conservcheck.adapters.score_sde",
    "edm": "conservcheck.adapters.edm",
    "flow": "conservcheck.adapters.flow",
}


def registered() -> list[plugins.Entry]:
    """Adapters in the order they are asked: built-ins (:data:`BUILTIN` order), then third parties by name
    (:func:`conservcheck.plugins.entries`)."""
    return plugins.entries(GROUP, BUILTIN)


def get(name: str) -> Any:
    """The adapter registered under ``name``, imported."""
    for entry in registered():
        if entry.name == name:
            try:
                return entry.load()
            except Exception as err:
                raise ModelLoadError(
                    f"the {name!r} adapter could not be imported ({reason(err)})",
                    "reinstall the package that provides it",
                ) from err
    names = ", ".join(e.name for e in registered())
    raise ModelLoadError(f"no adapter named {name!r}", f"use one of {names}")


def detect(path: pathlib.Path) -> tuple[Any | None, list[str]]:
    """The first adapter whose ``detect(path)`` is true, and the adapters that failed while asked.

    An adapter that cannot be imported, or whose ``detect`` raises, is skipped with a ``RuntimeWarning``
    and named in the returned list; a built-in family whose module is not installed is skipped silently.
    """
    broken: list[str] = []

    def skip(entry: plugins.Entry, err: BaseException) -> None:
        item = f"{entry.name} ({reason(err)})"
        broken.append(item)
        warnings.warn(f"conservcheck: adapter skipped: {item}", RuntimeWarning, stacklevel=3)

    for entry in registered():
        try:
            adapter = entry.load()
        except ModuleNotFoundError as err:
            if not (entry.builtin and err.name == entry.target.partition(":")[0]):
                skip(entry, err)
            continue
        except Exception as err:
            skip(entry, err)
            continue
        try:
            if adapter.detect(path):
                return adapter, broken
        except Exception as err:
            skip(entry, err)
    return None, broken


__all__ = ["BUILTIN", "GROUP", "detect", "get", "registered"]
