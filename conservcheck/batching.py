"""Batched evaluation of a probe over many inputs, with out-of-memory back-off.

Diagnostics hand the engine flat work: inputs [M, *shape] with one canonical time each. The engine
cuts it into model batches as large as allowed and, on CUDA out-of-memory, halves the batch and retries
instead of failing. Results come back in input order, and every row is computed independently of its
neighbours, so batching never changes which inputs are evaluated. It can change the last bits of the
outputs: matrix and convolution kernels choose their blocking and summation order by batch shape (and
thread count), so a row's score may differ by a rounding error from one batch size to another. The
same batch size gives the same bits; other batch sizes agree within the reproducibility tolerance
(:mod:`conservcheck.report.reproducibility`).

``batch_size="auto"`` on CUDA searches once for the largest power-of-two batch whose forward pass
fits (up to :data:`MAX_AUTO_BATCH`) and caches the answer per model identity, device name, precision
and sample shape in a small JSON file under the cache directory; on CPU it uses
:data:`DEFAULT_CPU_BATCH`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from conservcheck.files import write_atomic
from conservcheck.probe import VectorFieldProbe

DEFAULT_CPU_BATCH = 256
MAX_AUTO_BATCH = 4096
CACHE_FILE = "batch_sizes.json"


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _free_cuda() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _cache_key(probe: VectorFieldProbe) -> str:
    dev = probe.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    ident = probe.info.weights_sha256 or probe.info.reference or probe.info.name
    return f"{ident}|{name}|{probe.precision}|{'x'.join(map(str, probe.sample_shape))}"


def _read_cache(path: Path) -> dict[str, int]:
    try:
        return {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _write_cache(path: Path, data: dict[str, int]) -> None:
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def find_batch_size(probe: VectorFieldProbe, cache_dir: str | Path | None = None, limit: int = MAX_AUTO_BATCH) -> int:
    """Largest power-of-two batch (≤ ``limit``) whose forward pass fits on the probe's CUDA device.

    Doubles from 16 until a forward pass runs out of memory or ``limit`` is reached, keeps half of the
    first size that failed, and caches the result under ``cache_dir`` (keyed by weights, device name,
    precision and sample shape, so a stale entry for another model or card is never returned).
    """
    if probe.device.type != "cuda":
        return DEFAULT_CPU_BATCH
    path = Path(cache_dir) / CACHE_FILE if cache_dir is not None else None
    key = _cache_key(probe)
    if path is not None and key in (cached := _read_cache(path)):
        return cached[key]
    size, fits = 16, 0
    while size <= limit:
        try:
            x = torch.zeros(size, *probe.sample_shape, device=probe.device, dtype=probe.dtype)
            with torch.no_grad():
                probe.score(x, probe.process.t_from_sigma(torch.tensor(0.5, dtype=torch.float64)))
            fits = size
            del x
            size *= 2
        except RuntimeError as err:
            if not _is_oom(err):
                raise
            break
        finally:
            _free_cuda()
    # Half headroom for activations kept alive by Jacobian products and for fragmentation.
    best = max(1, fits // 2 if fits >= 32 else fits)
    if path is not None:
        data = _read_cache(path)
        data[key] = best
        _write_cache(path, data)
    return best


class Batcher:
    """Runs ``fn`` over row chunks, halving the chunk size on out-of-memory; remembers what fit.

    ``on_batch``, when set, is called after every chunk with its number of rows (an audit's progress uses it).
    """

    def __init__(
        self,
        batch_size: int | str = "auto",
        probe: VectorFieldProbe | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        if batch_size == "auto":
            self.batch_size = find_batch_size(probe, cache_dir) if probe is not None else DEFAULT_CPU_BATCH
        else:
            self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError("batch_size must be a positive integer or 'auto'")
        self.on_batch: Callable[[int], None] | None = None

    def map(self, fn: Callable[..., Tensor], *arrays: Tensor) -> Tensor:
        """Concatenate ``fn(*chunks)`` over aligned row chunks of ``arrays``."""
        n = arrays[0].shape[0]
        outs: list[Tensor] = []
        start = 0
        while start < n:
            stop = min(n, start + self.batch_size)
            try:
                outs.append(fn(*(a[start:stop] for a in arrays)))
            except RuntimeError as err:
                if not _is_oom(err) or self.batch_size == 1:
                    raise
                self.batch_size = max(1, self.batch_size // 2)
                _free_cuda()
                continue
            if self.on_batch is not None:
                self.on_batch(stop - start)
            start = stop
        return torch.cat(outs, 0) if outs else arrays[0].new_zeros((0,))


def evaluate(
    probe: VectorFieldProbe,
    x: Tensor,
    t: Tensor | float,
    batch_size: int | str = "auto",
    batcher: Batcher | None = None,
) -> Tensor:
    """s(x_m, t_m) for every row m, in batches (x: [M, *shape] on any device, t: [M] canonical times or
    one time for every row).

    Runs under ``torch.no_grad``; returns a tensor on the probe's device in the probe's dtype.
    """
    b = batcher if batcher is not None else Batcher(batch_size, probe)
    x = x.to(device=probe.device, dtype=probe.dtype)
    t = torch.as_tensor(t, dtype=torch.float64, device=probe.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    with torch.no_grad():
        return b.map(probe.score, x, t)
