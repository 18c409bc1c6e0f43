"""Precision modes for model evaluation.

=========  ==========================================================================
mode       what runs
=========  ==========================================================================
``fp64``   inputs and weights in float64 (CPU mostly; the reference for floors)
``fp32``   float32 with TF32 tensor-core matmuls disabled (default: trustworthy numbers)
``tf32``   float32 storage, TF32 matmuls/convolutions on Ampere+ GPUs (~10-bit mantissa)
``bf16``   float32 storage, the model's forward under bfloat16 autocast (~8-bit mantissa)
=========  ==========================================================================

Only the network's forward pass changes: conversions to score units and all quadrature sums run in
float32 or float64 whatever the mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from conservcheck.errors import UsageError


@dataclass(frozen=True)
class Precision:
    """What a forward precision resolves.

    ``eps``: machine epsilon of the forward pass (tf32 and bf16 keep 10 and 7 mantissa bits).
    ``floor_rel``: the smallest scale-free value (|∮ s·dy| / ∮|s||dy|, a relative curl) it can resolve,
    ~10⁴ unit roundoffs for fp64 (2^-53), ~16 for fp32 (2^-24), ~2 for tf32 (2^-11) and bf16 (2^-8), whose
    rounding is then the noise.
    """

    storage: torch.dtype
    eps: float
    floor_rel: float


PRECISIONS: dict[str, Precision] = {
    "fp64": Precision(torch.float64, 2.0**-52, 1e-12),
    "fp32": Precision(torch.float32, 2.0**-23, 1e-6),
    "tf32": Precision(torch.float32, 2.0**-10, 1e-3),
    "bf16": Precision(torch.float32, 2.0**-7, 1e-2),
}
MODES = tuple(PRECISIONS)


def check_mode(mode: str) -> str:
    """Validate a precision name; returns it lower-cased."""
    m = str(mode).lower()
    if m not in MODES:
        raise UsageError(f"unknown precision {mode!r}", f"use one of {', '.join(MODES)}")
    return m


def storage_dtype(mode: str) -> torch.dtype:
    """The dtype inputs and outputs are kept in for a mode."""
    return PRECISIONS[check_mode(mode)].storage


def floor_rel(mode: str) -> float:
    """The smallest scale-free value the forward precision ``mode`` resolves (:class:`Precision`)."""
    return PRECISIONS[check_mode(mode)].floor_rel


@contextlib.contextmanager
def forward_context(mode: str, device: torch.device) -> Iterator[None]:
    """Context for one forward pass in the given mode on ``device``."""
    m = check_mode(mode)
    if device.type == "cuda":
        matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = m == "tf32"
        try:
            if m == "bf16":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    yield
            else:
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    elif m == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield
