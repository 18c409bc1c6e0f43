"""Reading torch files safely: ``torch.load(weights_only=True)`` first, arbitrary unpickling only when trusted.

A torch pickle can run code while it loads. Every torch file the tool reads (checkpoints, arrays of clean
samples, reference mixtures) goes through :func:`torch_load`, which unpickles only tensors and plain
containers unless the user passed ``--trust-remote-code``, and turns every failure into one line naming
the fix.
"""

from __future__ import annotations

import pathlib
import re
import warnings
import zipfile
from typing import Any

from conservcheck.errors import ModelLoadError, error_chain, reason

#: The fix for a weights file that is cut short or altered.
DAMAGED_HINT = "download it again (for a hub model, delete its folder in the hub cache) or re-save the model"
#: The fix for a pickle that needs arbitrary code to load.
TRUST_HINT = (
    "re-save it with tensors only (safetensors), or pass trust_remote_code=True (CLI: --trust-remote-code) "
    "if you trust its source"
)


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
            raise ModelLoadError(
                f"cannot read {file}: not a complete torch file ({reason(err)})", DAMAGED_HINT
            ) from err
        if not trust_remote_code:
            raise ModelLoadError(
                f"{file.name} needs arbitrary unpickling ({needed}), which can run code", TRUST_HINT
            ) from err
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
