"""Files the tool writes and reads back: atomic writes, guarded reads, distinct outputs, locks, one cache.

Every file the tool writes (reports, partial-results heads, caches of samples and batch sizes) goes
through :func:`write_atomic`: a temporary file in the same folder, flushed and synced, then renamed over
the target, so a reader or a crash never sees half a file.

Every file the tool reads back (reports, their rows files, partial-results files, caches) is first
checked by :func:`input_file`: it must be a regular file (a FIFO would block the reader forever, a device
such as /dev/zero never ends) no larger than a stated limit, so a wrong path is one line, not a hang or an
exhausted memory. :func:`check_distinct` refuses, before any work starts, an output path that names an
input or another output; :func:`try_lock` gives one process at a time a partial-results file.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from conservcheck.errors import UsageError

#: Largest file the tool reads back whole: JSON reports, rows files and partial-results files.
MAX_READ_BYTES = 4 * 1024**3


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` through a temporary file and ``os.replace``.

    The file gets the permissions a plain ``open(path, "w")`` would give (0666 less the umask), not the
    private 0600 of a temporary file, so shared result folders and CI artefacts can read it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def input_file(path: str | Path, what: str, hint: str, max_bytes: int = MAX_READ_BYTES) -> Path:
    """``path`` if it is a regular file of at most ``max_bytes``; else a :class:`UsageError` naming ``what``.

    Checked with ``stat`` before anything opens the file: a folder, a FIFO (opening it blocks until a
    writer comes), a socket or a device (``/dev/zero`` never ends) is refused, and so is a file larger
    than the limit, so reading it can neither hang nor exhaust memory. The message for a missing file is
    ``no <what> <path>``.
    """
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise UsageError(f"no {what} {p}", hint) from None
    except OSError as err:
        raise UsageError(f"cannot read {p}: {err.strerror or err}", hint) from None
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{p} is a folder, not a {what}", hint)
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{p} is not a regular file (a pipe, socket or device), not a {what}", hint)
    if st.st_size > max_bytes:
        raise UsageError(f"{p} holds {_size(st.st_size)}, more than a {what} can ({_size(max_bytes)})", hint)
    return p


def read_input(path: str | Path, what: str, hint: str, max_bytes: int = MAX_READ_BYTES) -> bytes:
    """The bytes of ``path`` after :func:`input_file`'s checks (the read itself is capped at ``max_bytes``)."""
    p = input_file(path, what, hint, max_bytes)
    try:
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as err:
        raise UsageError(f"cannot read {p}: {err.strerror or err}", hint) from None
    if len(data) > max_bytes:
        raise UsageError(f"{p} holds more than a {what} can ({_size(max_bytes)})", hint)
    return data


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file: the same file on disk (links included) or the same resolved path."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    try:
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
    except OSError:
        pass
    return os.path.realpath(pa) == os.path.realpath(pb)


def check_distinct(inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
    """Refuse an output path that names an input or another output, before any work is spent.

    ``inputs`` and ``outputs`` map a label (the flag, e.g. ``--data``) to a path, or None / ``-`` for none;
    an output that overwrote an input would destroy it, two outputs naming one file would leave only the
    last. Raises :class:`UsageError` naming both flags and the path.
    """
    outs = [(k, v) for k, v in outputs.items() if v not in (None, "", "-")]
    ins = [(k, v) for k, v in inputs.items() if v not in (None, "", "-")]
    for i, (name, path) in enumerate(outs):
        for other, src in ins:
            if same_file(path, src):
                raise UsageError(
                    f"{name} {path} is also the {other} file: writing it would destroy that input",
                    f"choose another path for {name}",
                )
        for other, dst in outs[i + 1 :]:
            if same_file(path, dst):
                raise UsageError(
                    f"{name} and {other} both name {path}: one would overwrite the other",
                    "give each output its own path",
                )


def check_writable(path: str | Path, flag: str) -> None:
    """Refuse an output path that cannot be written, before any work is spent, by creating (and removing)
    a temporary file in its folder: a missing or read-only folder, a folder named as a file, a path
    under ``/proc``."""
    p = Path(path).expanduser()
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(
            f"cannot write {path}: folder {os.path.abspath(folder)} does not exist", "create it or choose another path"
        )
    if p.is_dir():
        raise UsageError(f"cannot write {path}: it is a folder", f"give {flag} a file path")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{p.name}.", suffix=".probe")
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err}", "choose a writable file path") from None
    os.close(fd)
    os.unlink(tmp)


def try_lock(fd: int) -> bool:
    """Take an exclusive advisory lock on the open file ``fd`` without waiting; False when another process
    holds it. The lock lasts until ``fd`` is closed (or the process ends, however it ends). On platforms
    without ``fcntl`` every lock succeeds."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks, one audit per file is then the user's to keep
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def json_safe(value: Any) -> Any:
    """A JSON-ready copy: NaN/Inf → None, tensors and numpy values → Python, tuples → lists, keys → str.

    Objects JSON cannot hold otherwise become their ``str``.
    """
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, str) or value is None:
        return value
    if hasattr(value, "tolist"):  # tensors and numpy arrays
        return json_safe(value.tolist())
    if hasattr(value, "item"):
        return json_safe(value.item())
    try:
        import pandas as pd

        if value is pd.NA:
            return None
    except ImportError:
        pass
    return str(value)


def cache_folder(cache_dir: str | Path | None = None, namespace: str = "samples") -> Path:
    """``<assets cache>/conservcheck/<namespace>``: where model samples, batch sizes and partial results live.

    huggingface_hub's assets cache (``HF_HOME`` / ``HF_ASSETS_CACHE`` decide where), or
    ``<cache_dir>/conservcheck/default/<namespace>`` when ``cache_dir`` is given.
    """
    from huggingface_hub import cached_assets_path

    kw: dict[str, Any] = {"assets_dir": Path(cache_dir).expanduser()} if cache_dir is not None else {}
    return Path(cached_assets_path(library_name="conservcheck", subfolder=namespace, **kw))


__all__ = [
    "MAX_READ_BYTES",
    "cache_folder",
    "check_distinct",
    "check_writable",
    "input_file",
    "json_safe",
    "read_input",
    "same_file",
    "try_lock",
    "write_atomic",
]
