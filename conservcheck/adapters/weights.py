"""Weights files of a model component: which file to read, whether it is whole, and what was read.

Choosing the weights of a saved diffusers component (safetensors first; a pickle ``.bin`` only without
one; sharded files through their index), checking a safetensors file before it is read, finding the one
checkpoint in a folder, and hashing the files actually loaded (the report's ``weights_sha256``).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import struct
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from conservcheck.errors import ModelLoadError, reason
from conservcheck.safe_load import DAMAGED_HINT

#: File-name stem of a diffusers model component's weights.
STEM = "diffusion_pytorch_model"
#: Weights formats in order of preference, with the name the report gives each.
FORMATS = (("safetensors", "safetensors"), ("bin", "pickle"))


@dataclass(frozen=True)
class WeightsFiles:
    """The weights file(s) of one model component, their format (``safetensors`` or ``pickle``) and the
    variant they belong to (None for the default weights)."""

    files: tuple[pathlib.Path, ...]
    format: str
    variant: str | None = None

    @property
    def use_safetensors(self) -> bool:
        return self.format == "safetensors"


@dataclass(frozen=True)
class WeightsChoice:
    """Which files of one component folder hold its weights: a single file, or a shard index and the shards
    named like it (``<stem>[.<variant>]-00001-of-0000N.<ext>``)."""

    names: tuple[str, ...]
    format: str
    variant: str | None
    index: str | None = None


def _single(stem: str, ext: str, variant: str | None) -> str:
    return f"{stem}.{variant}.{ext}" if variant else f"{stem}.{ext}"


def _indexes(stem: str, ext: str, variant: str | None) -> tuple[str, ...]:
    # diffusers inserts the variant before the last suffix (``…safetensors.index.fp16.json``); the other
    # spelling is accepted as well
    if variant:
        return (f"{stem}.{ext}.index.{variant}.json", f"{stem}.{variant}.{ext}.index.json")
    return (f"{stem}.{ext}.index.json",)


def _shards(names: Collection[str], stem: str, ext: str, variant: str | None) -> tuple[str, ...]:
    infix = f".{re.escape(variant)}" if variant else ""
    pattern = re.compile(rf"{re.escape(stem)}{infix}-\d+-of-\d+\.{ext}")
    return tuple(sorted(n for n in names if pattern.fullmatch(n)))


def variants(names: Collection[str], stem: str = STEM) -> list[str]:
    """The weights variants (``fp16``, ``ema``, …) present among the file names of one folder."""
    exts = "|".join(ext for ext, _ in FORMATS)
    patterns = (
        rf"{re.escape(stem)}\.([\w-]+)\.(?:{exts})",
        rf"{re.escape(stem)}\.(?:{exts})\.index\.([\w-]+)\.json",
        rf"{re.escape(stem)}\.([\w-]+)\.(?:{exts})\.index\.json",
        rf"{re.escape(stem)}\.([\w-]+)-\d+-of-\d+\.(?:{exts})",
    )
    found = {m.group(1) for n in names for p in patterns if (m := re.fullmatch(p, n))}
    return sorted(found)


def choose_weights(names: Collection[str], variant: str | None = None, stem: str = STEM) -> WeightsChoice | None:
    """The weights a diffusers loader reads among the file names of one component folder.

    safetensors before pickle (``.bin``), a single file before a shard index; ``variant`` selects
    ``<stem>.<variant>.*`` files. Without a variant the default weights are taken, and when the folder has
    none but exactly one variant (e.g. only ``diffusion_pytorch_model.fp16.safetensors``), that one. None when
    the folder holds no weights; :class:`ModelLoadError` when only several variants are present, or the
    requested one is not.
    """
    names = set(names)

    def pick(v: str | None) -> WeightsChoice | None:
        for ext, fmt in FORMATS:
            single = _single(stem, ext, v)
            if single in names:
                return WeightsChoice((single,), fmt, v)
            index = next((i for i in _indexes(stem, ext, v) if i in names), None)
            if index is not None:
                return WeightsChoice(_shards(names, stem, ext, v), fmt, v, index)
        return None

    if variant:
        found = pick(variant)
        if found is None and (present := variants(names, stem)):
            raise ModelLoadError(
                f"no weights of variant {variant!r} (variants present: {', '.join(present)})",
                "pick one of the variants present, or omit the variant to load the default weights",
            )
        return found
    found = pick(None)
    if found is not None:
        return found
    present = variants(names, stem)
    if len(present) > 1:
        raise ModelLoadError(
            f"no default weights, only the variants {', '.join(present)}",
            "choose one with variant=<name> (conservcheck.adapters.resolve.load_reference(..., variant=...))",
        )
    return pick(present[0]) if present else None


def find_weights(folder: pathlib.Path, stem: str = STEM, variant: str | None = None) -> WeightsFiles:
    """The weights of a saved diffusers component (:func:`choose_weights` over the folder's files).

    Sharded weights count as every shard their index names. Raises :class:`ModelLoadError` when the folder
    holds no weights, only other variants, or a damaged index.
    """
    try:
        names = [p.name for p in folder.iterdir() if p.is_file()]
    except OSError:
        names = []
    try:
        choice = choose_weights(names, variant, stem)
    except ModelLoadError as err:
        raise ModelLoadError(f"{err.message} in {folder}", err.hint) from None
    if choice is None:
        name = f"{stem}.{variant}" if variant else stem
        raise ModelLoadError(
            f"no weights file {name}.safetensors or {name}.bin in {folder}",
            "check that the download finished (or the variant name) and the folder is a saved diffusers model",
        )
    if choice.index is None:
        return WeightsFiles((folder / choice.names[0],), choice.format, choice.variant)
    index = folder / choice.index
    try:
        shards = sorted({str(s) for s in json.loads(index.read_text())["weight_map"].values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelLoadError(
            f"the shard index {index} is damaged ({reason(err)})",
            "download the model again or re-save it with save_pretrained",
        ) from err
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise ModelLoadError(
            f"{len(missing)} of the {len(shards)} shards named in {index} are missing (first: {missing[0]})",
            "check that the download finished, or download the model again",
        )
    return WeightsFiles(tuple(folder / s for s in shards), choice.format, choice.variant)


def check_safetensors(file: pathlib.Path) -> None:
    """Raise :class:`ModelLoadError` unless ``file`` is a complete safetensors file.

    The format is an 8-byte little-endian header length N, N bytes of JSON mapping each tensor to its
    ``data_offsets`` [begin, end) in the data that follows, then the data; a file cut short (an
    interrupted download) is shorter than 8 + N + the largest end offset. Only the header is read.
    """
    size = file.stat().st_size
    if size < 8:
        raise ModelLoadError(
            f"weights file {file} is damaged: {size} bytes, shorter than a safetensors header", DAMAGED_HINT
        )
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
        raise ModelLoadError(
            f"weights file {file} is damaged: its header is not a safetensors header ({type(err).__name__})",
            DAMAGED_HINT,
        ) from err
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
        raise ModelLoadError(
            f"{path} holds several {what} ({', '.join(p.name for p in found)})", "name the file itself"
        )
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
    "STEM",
    "WeightsChoice",
    "WeightsFiles",
    "check_safetensors",
    "choose_weights",
    "find_weights",
    "hash_files",
    "sha256_file",
    "single_file",
    "variants",
]
