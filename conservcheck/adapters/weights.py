"""Weights files of a model component: which file to read, whether it is whole, and what was read.

Choosing the weights of a saved diffusers component (safetensors first; a pickle ``.bin`` only without
one; sharded files through their index), checking a safetensors file before it is read, finding the one
checkpoint in a folder, and hashing the files actually loaded (the report's ``weights_sha256``).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from conservcheck.errors import ModelLoadError, reason
from conservcheck.safe_load import DAMAGED_HINT


@dataclass(frozen=True)
class WeightsFiles:
    """The weights file(s) of one model component and their format (``safetensors`` or ``pickle``)."""

    files: tuple[pathlib.Path, ...]
    format: str

    @property
    def use_safetensors(self) -> bool:
        return self.format == "safetensors"


def find_weights(
    folder: pathlib.Path, stem: str = "diffusion_pytorch_model", variant: str | None = None
) -> WeightsFiles:
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
                    f"the shard index {index} is damaged ({reason(err)})",
                    "download the model again or re-save it with save_pretrained",
                ) from err
            return WeightsFiles(tuple(folder / s for s in shards), fmt)
    raise ModelLoadError(
        f"no weights file {name}.safetensors or {name}.bin in {folder}",
        "check that the download finished (or the variant name) and the folder is a saved diffusers model",
    )


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


__all__ = ["WeightsFiles", "check_safetensors", "find_weights", "hash_files", "sha256_file", "single_file"]
