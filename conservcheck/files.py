"""Files the tool writes: atomically, readable as the user's umask allows, in JSON-safe form, in one cache.

Every file the tool writes (reports, partial-results heads, caches of samples and batch sizes) goes
through :func:`write_atomic`: a temporary file in the same folder, flushed and synced, then renamed over
the target, so a reader or a crash never sees half a file.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


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


__all__ = ["cache_folder", "json_safe", "write_atomic"]
