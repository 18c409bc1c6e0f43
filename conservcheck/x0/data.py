"""Clean samples x0 from the user's data, in the probe's data coordinates and sample shape.

``--data`` accepts

* a folder of images (png, jpg, bmp, gif, webp, tif; searched recursively, so class sub-folders work);
* an array file: ``.npy``, ``.npz`` or ``.pt``/``.pth`` (a tensor, or a dict / npz archive holding one
  array — name it with ``file.npz#key`` when there are several);
* a table file read with pandas — ``.parquet``, ``.csv``, ``.tsv``, ``.json``, ``.jsonl`` — local or on the
  Hugging Face Hub (``hf://datasets/<owner>/<name>/<file>``); one image column (encoded image bytes, as
  in the Hub's image datasets) or one numeric column per component (``label``/``target``/``class``/``y``
  columns are never components); choose a column with ``file.parquet#column``.

Values: 8-bit data (uint8 arrays, image files, integer tables within 0 … 255) is mapped linearly from
[0, 255] onto the probe's ``data_range``; floating-point arrays and tables are taken as already in the
model's data coordinates and must lie inside ``data_range``. Float data that occupies only one half of
the range (all values on one side of its middle, like images in [0, 1] given to a model of [−1, 1]) is
used, with a warning that the report records; the values' range is recorded too (``value_range``).
Arrays must have one of the layouts [N, *sample_shape], channels-last images [N, H, W, C],
single-channel [N, H, W] or flat [N, D]: an array of any other shape is refused, never resized. Image
files and image columns are decoded at the probe's height and width (resized when they differ).

Only regular files are read (a FIFO would block, a device never ends).

For a latent probe (one with ``encode`` and ``image_shape``, see :func:`image_target`) images are read at
the autoencoder's input size, mapped onto its ``image_range`` and encoded into clean latents; arrays shaped
like the latents are taken as latents.

When the source holds more than n samples, a seeded random subset (stream (seed, "data")) is used.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from conservcheck import rng
from conservcheck.errors import UsageError, reason
from conservcheck.files import input_file
from conservcheck.probe import VectorFieldProbe
from conservcheck.safe_load import quiet_torch_load, unsafe_global

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
ARRAY_SUFFIXES = {".npy", ".npz", ".pt", ".pth"}
TABLE_SUFFIXES = {".parquet", ".csv", ".tsv", ".json", ".jsonl"}
LABEL_COLUMNS = {"label", "labels", "target", "targets", "class", "y"}
HINT = "pass a folder of images, an .npy/.npz/.pt array, or a .parquet/.csv/.jsonl table (local or hf://)"


def tensor_sha256(x: Tensor) -> str:
    """SHA-256 of a tensor's values as little-endian float64 in C order (identifies an x0 batch)."""
    arr = np.ascontiguousarray(x.detach().to("cpu", torch.float64).numpy()).astype("<f8", copy=False)
    h = hashlib.sha256(str(tuple(arr.shape)).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def _split_key(spec: str) -> tuple[str, str | None]:
    """``file.npz#key`` → (``file.npz``, ``key``); a ``#`` inside a folder name is left alone."""
    base, sep, key = spec.rpartition("#")
    if sep and key and "/" not in key:
        return base, key
    return spec, None


def _pil() -> ModuleType:
    try:
        from PIL import Image
    except ImportError:
        raise UsageError("reading images needs Pillow, which is not installed", "pip install pillow") from None
    return Image


def _decode(image: Any, channels: int, size: tuple[int, int]) -> np.ndarray:
    """One PIL image → uint8 [C, H, W] with the probe's channel count, resized to ``size`` (H, W)."""
    Image = _pil()
    modes = {1: "L", 3: "RGB", 4: "RGBA"}
    if channels not in modes:
        raise UsageError(f"images cannot fill {channels} channels", "pass an array file in the model's layout")
    img = image.convert(modes[channels])
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR, reducing_gap=None)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _read_image(source: Any, channels: int, size: tuple[int, int]) -> np.ndarray:
    """An image file (path or file object) decoded by :func:`_decode`; PIL's notes on damaged metadata
    (EXIF, TIFF tags) are dropped, since only the pixels are used."""
    Image = _pil()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
        with Image.open(source) as img:
            return _decode(img, channels, size)


@dataclass(frozen=True)
class Target:
    """What the read samples must become: per-sample ``shape`` with values in ``data_range``."""

    shape: tuple[int, ...]
    data_range: tuple[float, float]

    @property
    def dim(self) -> int:
        return math.prod(self.shape)


@runtime_checkable
class _Encodes(Protocol):
    """A latent probe: its autoencoder maps images in ``image_range`` to clean latents."""

    def encode(self, images: Tensor) -> Tensor: ...


def image_target(probe: VectorFieldProbe) -> Target | None:
    """The images a latent probe's autoencoder takes, for a probe with ``encode`` and ``image_shape``
    (e.g. :class:`conservcheck.adapters.latent.LatentProbe`); None for a probe in pixel space."""
    shape = getattr(probe, "image_shape", None)
    if shape is None or not callable(getattr(probe, "encode", None)):
        return None
    lo, hi = getattr(probe, "image_range", (-1.0, 1.0))
    return Target(tuple(int(v) for v in shape), (float(lo), float(hi)))


def _image_shape(target: Target, what: str) -> tuple[int, int, int]:
    if len(target.shape) != 3:
        raise UsageError(
            f"{what}, but the model's samples have shape {target.shape}",
            "pass an array file with one row per sample",
        )
    return target.shape


def _subset(count: int, n: int, seed: int, source: str) -> list[int]:
    if count < n:
        raise UsageError(f"{source} holds {count} samples, the audit needs {n}", f"pass --samples {count} or more data")
    if count == n:
        return list(range(n))
    return sorted(rng.permutation(count, seed, "data")[:n].tolist())


def _from_folder(folder: Path, target: Target, n: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UsageError(f"no image files in {folder}", "the folder must hold png/jpg/... images")
    c, h, w = _image_shape(target, f"{folder} holds images")
    chosen = [files[i] for i in _subset(len(files), n, seed, str(folder))]
    arrays = []
    for path in chosen:
        try:
            arrays.append(_read_image(path, c, (h, w)))
        except UsageError:
            raise
        except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
            raise UsageError(f"cannot read image {path}: {reason(err)}", "remove or fix the file") from None
    return np.stack(arrays), {"kind": "folder", "n_available": len(files)}


def _torch_file(path: Path) -> Any:
    """``torch.load(weights_only=True)``: data files never run code, whatever they hold."""
    try:
        return quiet_torch_load(path, weights_only=True)
    except Exception as err:
        needed = unsafe_global(err)
        if needed is not None:
            raise UsageError(
                f"{path} holds a pickled {needed}, and loading it would run code",
                "save the samples as a plain tensor (torch.save(x)) or as .npy",
            ) from None
        raise UsageError(f"cannot read array file {path}: {reason(err)}", HINT) from None


def _numpy(value: Tensor, path: Path) -> np.ndarray:
    if value.dtype.is_complex or value.dtype == torch.bool or value.is_quantized or value.layout != torch.strided:
        raise UsageError(f"{path} holds a {value.dtype} tensor, not real numbers", "save a float or uint8 tensor")
    # numpy has no bfloat16: widen it (exactly) to float64
    return (value.double() if value.dtype == torch.bfloat16 else value).detach().numpy()


def _load_array(path: Path, key: str | None) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        obj = _torch_file(path)
        if isinstance(obj, Tensor):
            return _numpy(obj, path)
        if not isinstance(obj, dict):
            raise UsageError(f"{path} holds a {type(obj).__name__}, not a tensor", "save a tensor or a dict of tensors")
        items = {str(k): _numpy(v, path) for k, v in obj.items() if isinstance(v, Tensor)}
    else:
        try:
            if suffix == ".npy":
                array: np.ndarray = np.load(path, allow_pickle=False)
                return array
            with np.load(path, allow_pickle=False) as z:
                items = {k: z[k] for k in z.files}
        except Exception as err:  # numpy raises ValueError, OSError, EOFError, zipfile errors for a bad file
            raise UsageError(f"cannot read array file {path}: {reason(err)}", HINT) from None
    if key is not None:
        if key not in items:
            raise UsageError(f"{path} has no array {key!r}", f"choose one of {', '.join(items) or '(none)'}")
        return items[key]
    if len(items) != 1:
        listed = f" ({', '.join(items)})" if items else ""
        raise UsageError(
            f"{path} holds {len(items)} arrays{listed}", f"name one as {path.name}#<key>" if items else "save one array"
        )
    return next(iter(items.values()))


def _read_table(spec: str, key: str | None) -> tuple[Any, str | None]:
    import pandas as pd

    suffix = Path(spec.split("?")[0]).suffix.lower()
    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(spec)
        elif suffix in (".csv", ".tsv"):
            frame = pd.read_csv(spec, sep="\t" if suffix == ".tsv" else ",")
        else:
            frame = pd.read_json(spec, lines=suffix == ".jsonl")
    except ImportError:
        raise UsageError(
            f"reading {suffix} files needs pyarrow, which is not installed", "pip install pyarrow"
        ) from None
    except FileNotFoundError:
        raise UsageError(f"data file not found: {spec}", HINT) from None
    except Exception as err:  # pandas and fsspec raise many types for unreadable or unreachable files
        raise UsageError(f"cannot read table {spec}: {reason(err)}", HINT) from None
    return frame, key


def _is_image_cell(value: Any) -> bool:
    return isinstance(value, (bytes, bytearray)) or (isinstance(value, dict) and "bytes" in value)


def _from_table(
    spec: str, key: str | None, pixels: Target, rows: Target, n: int, seed: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """An image column decoded at ``pixels``' size, else one numeric column per component of ``rows``."""
    import pandas as pd

    frame, key = _read_table(spec, key)
    if key is not None and key not in frame.columns:
        raise UsageError(f"{spec} has no column {key!r}", f"choose one of {', '.join(map(str, frame.columns))}")
    first = frame.iloc[0] if len(frame) else pd.Series(dtype=object)
    image_cols = [c for c in ([key] if key else frame.columns) if len(frame) and _is_image_cell(first[c])]
    idx = _subset(len(frame), n, seed, spec)
    if image_cols:
        c, h, w = _image_shape(pixels, f"{spec} has an image column")
        cells = frame[image_cols[0]].iloc[idx]
        arrays = []
        for cell in cells:
            data = cell["bytes"] if isinstance(cell, dict) else cell
            try:
                arrays.append(_read_image(io.BytesIO(data), c, (h, w)))
            except UsageError:
                raise
            except Exception as err:  # as for image files
                raise UsageError(f"cannot decode an image in {spec}: {reason(err)}", "check the image column") from None
        return np.stack(arrays), {"kind": "table", "column": str(image_cols[0]), "n_available": len(frame)}
    numeric = frame[[key]] if key else frame.select_dtypes("number")
    if not key:
        numeric = numeric[[c for c in numeric.columns if str(c).lower() not in LABEL_COLUMNS]]
    if numeric.shape[1] != rows.dim:
        raise UsageError(
            f"{spec} has {numeric.shape[1]} numeric columns, the model's samples have {rows.dim} components",
            "pass a table with one column per component or one image column (name it with #column)",
        )
    return numeric.iloc[idx].to_numpy(), {"kind": "table", "n_available": len(frame)}


def _to_layout(arr: np.ndarray, target: Target, source: str) -> Tensor:
    """[N, ...] array → float64 tensor [N, *target.shape]: the same layout, flat [N, D], channels-last
    [N, H, W, C] or single-channel [N, H, W]; any other shape is refused (never resized)."""
    shape = target.shape
    x = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float64)
    n = x.shape[0]
    if 0 in x.shape[1:]:
        raise UsageError(
            f"{source} holds empty samples (shape {tuple(arr.shape[1:])})",
            "save one non-empty row per sample: [N, ...]",
        )
    if tuple(x.shape[1:]) == shape:
        return x
    if x.ndim == 2 and x.shape[1] == target.dim:
        return x.reshape(n, *shape)
    if len(shape) == 3:
        c, h, w = shape
        if c == 1 and tuple(x.shape[1:]) == (h, w):
            return x[:, None]
        if tuple(x.shape[1:]) == (h, w, c):
            return x.permute(0, 3, 1, 2).contiguous()
    raise UsageError(
        f"{source} holds samples of shape {tuple(arr.shape[1:])}, the model expects {shape}",
        "save the samples as [N, *sample_shape], [N, H, W, C] or [N, D] (arrays are never resized)",
    )


def _to_range(x: Tensor, eight_bit: bool, target: Target, source: str) -> tuple[Tensor, str]:
    lo, hi = target.data_range
    if eight_bit:
        return lo + (hi - lo) * x.clamp(0, 255) / 255.0, f"8-bit [0, 255] → [{lo:g}, {hi:g}]"
    if not bool(torch.isfinite(x).all()):
        raise UsageError(f"{source} contains NaN or Inf", "clean the data")
    tol = 1e-3 * (hi - lo)
    vmin, vmax = float(x.min()), float(x.max())
    if vmin < lo - tol or vmax > hi + tol:
        raise UsageError(
            f"{source} values span [{vmin:.4g}, {vmax:.4g}], outside the model's data range [{lo:g}, {hi:g}]",
            "rescale the data to the model's range, or save 8-bit images (uint8)",
        )
    return x, "values used as given, in the model's data coordinates"


def range_warning(x: Tensor, data_range: tuple[float, float], source: str) -> str | None:
    """A warning when float data lie on one side of the middle of the model's data range (module doc)."""
    lo, hi = data_range
    mid, tol = 0.5 * (lo + hi), 1e-3 * (hi - lo)
    vmin, vmax = float(x.min()), float(x.max())
    if vmax - vmin <= tol or not (vmin >= mid - tol or vmax <= mid + tol):
        return None
    return (
        f"{source} values span [{vmin:.4g}, {vmax:.4g}], one half of the model's data range [{lo:g}, {hi:g}] "
        "(if the data use another convention, e.g. images in [0, 1] for a model of [-1, 1], rescale them; "
        "8-bit images are mapped automatically)"
    )


def load_data(spec: str, probe: VectorFieldProbe, n: int, seed: int) -> tuple[Tensor, dict[str, Any]]:
    """n clean samples from ``spec`` (see the module doc) and a description of the source for reports.

    For a latent probe (see :func:`image_target`) images — a folder, an image column, uint8 arrays or
    arrays shaped like the autoencoder's input — are mapped onto its ``image_range`` and encoded into
    clean latents with ``probe.encode``; arrays shaped like the latents are used as latents, with no
    range check (scaled latents have no fixed bounds).

    Returns:
        (x0 [n, *sample_shape] float64 on the CPU, {"kind", "path", "n", "mapping", "value_range", ...},
        with ``warning`` when float data occupy one half of the model's range).
    """
    path_text, key = _split_key(str(spec))
    is_remote = "://" in path_text
    path = Path(path_text).expanduser()
    suffix = Path(path_text.split("?")[0]).suffix.lower()
    model = Target(tuple(probe.sample_shape), probe.data_range)
    images = image_target(probe)
    read_as = images or model
    if not is_remote and not path.exists():
        raise UsageError(f"data not found: {path_text}", HINT)
    if not is_remote and not path.is_dir():
        input_file(path, "data file", HINT)
    if not is_remote and path.is_dir():
        raw, info = _from_folder(path, read_as, n, seed)
        eight_bit = True
    elif suffix in ARRAY_SUFFIXES and not is_remote:
        full = _load_array(path, key)
        if full.ndim < 2:
            raise UsageError(f"{path} holds an array of shape {full.shape}", "save one row per sample: [N, ...]")
        idx = _subset(full.shape[0], n, seed, str(path))
        raw, info = full[idx], {"kind": "array", "n_available": int(full.shape[0])}
        eight_bit = raw.dtype == np.uint8
    elif suffix in TABLE_SUFFIXES:
        raw, info = _from_table(path_text, key, read_as, model, n, seed)
        eight_bit = raw.dtype == np.uint8 or (
            np.issubdtype(raw.dtype, np.integer) and raw.size > 0 and raw.min() >= 0 and raw.max() <= 255
        )
    else:
        raise UsageError(f"cannot read {path_text!r}: unknown data format {suffix or '(none)'}", HINT)
    if not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)):
        raise UsageError(f"{path_text} does not hold real numbers (dtype {raw.dtype})", HINT)
    if images is not None and not eight_bit and _is_latent_layout(raw, model):
        x = _to_layout(raw, model, path_text)
        if not bool(torch.isfinite(x).all()):
            raise UsageError(f"{path_text} contains NaN or Inf", "clean the data")
        mapping = "latents used as given"
    elif images is not None:
        pixels, mapping = _to_range(_to_layout(raw, images, path_text), bool(eight_bit), images, path_text)
        assert isinstance(probe, _Encodes), "image_target accepts only a probe with encode"
        x = probe.encode(pixels).to("cpu", torch.float64)
        mapping = f"{mapping}, encoded into latents by the model's autoencoder"
    else:
        x = _to_layout(raw, model, path_text)
        x, mapping = _to_range(x, bool(eight_bit), model, path_text)
        warning = None if eight_bit else range_warning(x, model.data_range, path_text)
        if warning:
            info["warning"] = warning
    info = {
        **info,
        "path": str(spec),
        "n": n,
        "mapping": mapping,
        "value_range": [float(x.min()), float(x.max())],
        "sha256": tensor_sha256(x),
    }
    return x, info


def _is_latent_layout(raw: np.ndarray, latent: Target) -> bool:
    return tuple(raw.shape[1:]) in (latent.shape, (latent.dim,))
