"""Model adapters: one small module per model family, found through an entry-point registry.

Each adapter module exposes ``NAME``, ``detect(path) -> bool`` and ``load(path, *, device, dtype,
trust_remote_code, **options) -> VectorFieldProbe`` (the adapter contract, ``docs/adapters.md``).
Adapters are listed in the entry-point group ``conservcheck.adapters`` (name → module) and imported only
when asked, so a broken third-party adapter cannot break the others or the CLI. The built-in families
are always asked first, in :data:`BUILTIN` order; third-party entry points follow in name order.

This package also holds what several adapters share: choosing the weights file of a folder, checking it
before it is read, reading torch pickles safely, and hashing the files actually loaded. Importing it
imports no model library.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import pathlib
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass
from typing import Any, Iterable

from ..errors import ModelLoadError, error_chain

GROUP = "conservcheck.adapters"

BUILTIN: dict[str, str] = {
    "embedded": "conservcheck.adapters.embedded",
    "diffusers": "conservcheck.adapters.diffusers_unet",
    "latent": "conservcheck.adapters.latent",
    "score_sde": "conservcheck.adapters.score_sde",
    "edm": "conservcheck.adapters.edm",
    "flow": "conservcheck.adapters.flow",
}


@dataclass
class AdapterEntry:
    """One registered adapter: its name and the import path of the object exposing the contract."""

    name: str
    target: str
    builtin: bool

    def load(self) -> Any:
        """Import the adapter (``module`` or ``module:attribute``)."""
        module_name, _, attr = self.target.partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in filter(None, attr.split(".")):
            obj = getattr(obj, part)
        return obj


def registered() -> list[AdapterEntry]:
    """Adapters in the order they are asked: built-ins (:data:`BUILTIN` order), then third parties by name.

    Entry points whose name is a built-in name are ignored, so an installed package cannot shadow a
    built-in family. Without entry-point metadata (a source tree that was never installed) the built-in
    list is used alone.
    """
    entries = [AdapterEntry(name, target, True) for name, target in BUILTIN.items()]
    try:
        eps = importlib.metadata.entry_points(group=GROUP)
    except Exception:  # broken metadata of an unrelated distribution must not stop model loading
        eps = ()
    extra = sorted((ep for ep in eps if ep.name not in BUILTIN), key=lambda ep: ep.name)
    entries += [AdapterEntry(ep.name, ep.value, False) for ep in extra]
    return entries


def get(name: str) -> Any:
    """The adapter registered under ``name``, imported."""
    for entry in registered():
        if entry.name == name:
            try:
                return entry.load()
            except Exception as err:
                raise ModelLoadError(
                    f"the {name!r} adapter could not be imported ({type(err).__name__}: {err})",
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

    def skip(entry: AdapterEntry, err: BaseException) -> None:
        item = f"{entry.name} ({type(err).__name__}: {err})"
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


# ---------------------------------------------------------------------------------------------------
# Weights files


@dataclass(frozen=True)
class WeightsFiles:
    """The weights file(s) of one model component and their format (``safetensors`` or ``pickle``)."""

    files: tuple[pathlib.Path, ...]
    format: str

    @property
    def use_safetensors(self) -> bool:
        return self.format == "safetensors"


def find_weights(folder: pathlib.Path, stem: str = "diffusion_pytorch_model", variant: str | None = None) -> WeightsFiles:
    """The weights of a saved diffusers component: safetensors first, pickle (``.bin``) only without them.

    Sharded weights (``<stem>.safetensors.index.json`` and its shards) count as all their shards.
    Raises :class:`ModelLoadError` when the folder holds neither.
    """
    name = f"{stem}.{variant}" if variant else stem
    for ext, fmt in (("safetensors", "safetensors"), ("bin", "pickle")):
        single = folder / f"{name}.{ext}"
        if single.is_file():
            return WeightsFiles((single,), fmt)
        index = folder / f"{name}.{ext}.index.json"
        if index.is_file():
            try:
                shards = sorted({str(s) for s in json.loads(index.read_text())["weight_map"].values()})
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise ModelLoadError(
                    f"the shard index {index} is damaged ({type(err).__name__}: {err})",
                    "download the model again or re-save it with save_pretrained",
                ) from err
            return WeightsFiles(tuple(folder / s for s in shards), fmt)
    raise ModelLoadError(
        f"no weights file {name}.safetensors or {name}.bin in {folder}",
        "check that the download finished (or the variant name) and the folder is a saved diffusers model",
    )


#: The fix for a weights file that is cut short or altered.
DAMAGED_HINT = "download it again (for a hub model, delete its folder in the hub cache) or re-save the model"
#: The fix for a pickle that needs arbitrary code to load.
TRUST_HINT = "re-save it with tensors only (safetensors), or pass trust_remote_code=True (CLI: --trust-remote-code) if you trust its source"


def check_safetensors(file: pathlib.Path) -> None:
    """Raise :class:`ModelLoadError` unless ``file`` is a complete safetensors file.

    The format is an 8-byte little-endian header length N, N bytes of JSON mapping each tensor to its
    ``data_offsets`` [begin, end) in the data that follows, then the data; a file cut short (an
    interrupted download) is shorter than 8 + N + the largest end offset. Only the header is read.
    """
    size = file.stat().st_size
    if size < 8:
        raise ModelLoadError(f"weights file {file} is damaged: {size} bytes, shorter than a safetensors header", DAMAGED_HINT)
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise ModelLoadError(
                f"weights file {file} is damaged: its header claims {n} bytes but the file has {size}", DAMAGED_HINT
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise ModelLoadError(f"weights file {file} is damaged: its header is not a safetensors header ({type(err).__name__})", DAMAGED_HINT) from err
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise ModelLoadError(f"weights file {file} is damaged: {what} ({size} of {expected} bytes)", DAMAGED_HINT)
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt"):
            pass
    except Exception as err:
        raise ModelLoadError(f"weights file {file} is damaged: {reason(err)}", DAMAGED_HINT) from err


_UNSAFE = (
    re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)"),
    re.compile(r"allowlisted via `add_safe_globals`,? but got (.+?)\s*$", re.M),
)


def unsafe_global(err: BaseException) -> str | None:
    """What a pickle needs beyond ``torch.load(weights_only=True)``'s allow-list (a class or function
    name), read from a failed load's exception chain; None when the failure is something else (a damaged
    file, a mismatch)."""
    for e in error_chain(err):
        for pattern in _UNSAFE:
            m = pattern.search(str(e))
            if m:
                return m.group(1)
    return None


def reason(err: BaseException) -> str:
    """``Type: first sentence`` of an exception, for one-line messages (torch's weights-only errors give
    their ``WeightsUnpickler error`` part)."""
    text = str(err)
    m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    line = m.group(1) if m else next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = line.split(". ")[0].strip()[:200]
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def torch_load(file: pathlib.Path, trust_remote_code: bool = False) -> tuple[Any, str]:
    """(object, loader) of a torch file: ``torch.load(weights_only=True)``; ``weights_only=False`` only when
    the file needs arbitrary unpickling and ``trust_remote_code`` is true.

    Raises :class:`ModelLoadError` for a file that needs code without the trust flag, and for a file
    that is not a complete torch file.
    """
    try:
        return quiet_torch_load(file, weights_only=True), "torch.load(weights_only=True)"
    except Exception as err:
        needed = unsafe_global(err)
        if needed is None:
            raise ModelLoadError(f"cannot read {file}: not a complete torch file ({reason(err)})", DAMAGED_HINT) from err
        if not trust_remote_code:
            raise ModelLoadError(f"{file.name} needs arbitrary unpickling ({needed}), which can run code", TRUST_HINT) from err
    try:
        return quiet_torch_load(file, weights_only=False), "torch.load(weights_only=False)"
    except Exception as err:
        raise ModelLoadError(f"cannot unpickle {file} ({reason(err)})", DAMAGED_HINT) from err


def quiet_torch_load(file: pathlib.Path, *, weights_only: bool) -> Any:
    """``torch.load`` to the CPU without torch's note on pickle protocols (an error, if any, says more)."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(file, map_location="cpu", weights_only=weights_only)


PICKLE_SCAN_BYTES = 16 << 20


def pickle_names(file: pathlib.Path, limit: int = PICKLE_SCAN_BYTES) -> bytes:
    """The pickle bytes of a torch file that name its classes and functions, read without unpickling:
    a zip file's ``data.pkl``, or the first ``limit`` bytes of a legacy file; empty when unreadable."""
    try:
        if zipfile.is_zipfile(file):
            with zipfile.ZipFile(file) as zf:
                member = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                return zf.read(member) if member else b""
        with open(file, "rb") as f:
            return f.read(limit)
    except (OSError, zipfile.BadZipFile):
        return b""


def single_file(path: pathlib.Path, matches: Any, what: str) -> pathlib.Path | None:
    """The file ``path`` names when ``matches(file)``, or the one matching file in folder ``path``.

    Raises :class:`ModelLoadError` for a folder holding several (``what`` names them in the message).
    """
    path = pathlib.Path(path)
    if path.is_file():
        return path if matches(path) else None
    if not path.is_dir():
        return None
    found = sorted(p for p in path.iterdir() if matches(p))
    if len(found) > 1:
        raise ModelLoadError(f"{path} holds several {what} ({', '.join(p.name for p in found)})", "name the file itself")
    return found[0] if found else None


def sha256_file(path: pathlib.Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_files(files: Iterable[pathlib.Path], root: pathlib.Path) -> tuple[str, dict[str, str]]:
    """(overall SHA-256, {path relative to root: SHA-256}) for the weights files a model loaded.

    The overall hash of one file is that file's SHA-256; of several, the SHA-256 of the lines
    ``"<sha256>  <relative path>\\n"`` in path order (the ``sha256sum`` listing of the files).
    """
    per = {p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p): sha256_file(p) for p in files}
    if len(per) == 1:
        return next(iter(per.values())), per
    listing = "".join(f"{digest}  {rel}\n" for rel, digest in sorted(per.items()))
    return hashlib.sha256(listing.encode()).hexdigest(), per


__all__ = [
    "BUILTIN",
    "DAMAGED_HINT",
    "GROUP",
    "TRUST_HINT",
    "AdapterEntry",
    "WeightsFiles",
    "check_safetensors",
    "detect",
    "error_chain",
    "find_weights",
    "get",
    "hash_files",
    "quiet_torch_load",
    "reason",
    "registered",
    "pickle_names",
    "sha256_file",
    "single_file",
    "torch_load",
    "unsafe_global",
]
