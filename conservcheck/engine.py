"""Batched evaluation of a probe over many inputs, with out-of-memory back-off.

Diagnostics hand the engine flat work: inputs [M, *shape] with one canonical time each. The engine
cuts it into model batches as large as allowed and, on CUDA out-of-memory, halves the batch and retries
instead of failing. Results come back in input order, so batching never changes a number.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .probe import VectorFieldProbe

DEFAULT_CPU_BATCH = 256
DEFAULT_CUDA_BATCH = 1024


def default_batch_size(probe: VectorFieldProbe) -> int:
    """The starting batch size for ``batch_size='auto'`` on the probe's device."""
    return DEFAULT_CUDA_BATCH if probe.device.type == "cuda" else DEFAULT_CPU_BATCH


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


class Batcher:
    """Runs ``fn`` over row chunks, halving the chunk size on out-of-memory; remembers what fit."""

    def __init__(self, batch_size: int | str = "auto", probe: VectorFieldProbe | None = None) -> None:
        if batch_size == "auto":
            self.batch_size = default_batch_size(probe) if probe is not None else DEFAULT_CPU_BATCH
        else:
            self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError("batch_size must be a positive integer or 'auto'")

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
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            start = stop
        return torch.cat(outs, 0) if outs else arrays[0].new_zeros((0,))


def evaluate(
    probe: VectorFieldProbe,
    x: Tensor,
    t: Tensor,
    batch_size: int | str = "auto",
    batcher: Batcher | None = None,
) -> Tensor:
    """s(x_m, t_m) for every row m, in batches (x: [M, *shape] on any device, t: [M] canonical times).

    Runs under ``torch.no_grad``; returns a tensor on the probe's device in the probe's dtype.
    """
    b = batcher if batcher is not None else Batcher(batch_size, probe)
    x = x.to(device=probe.device, dtype=probe.dtype)
    t = torch.as_tensor(t, dtype=torch.float64, device=probe.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    with torch.no_grad():
        return b.map(probe.score, x, t)
