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
from typing import Iterator

import torch

from .errors import UsageError

MODES = ("fp64", "fp32", "tf32", "bf16")


def check_mode(mode: str) -> str:
    """Validate a precision name; returns it lower-cased."""
    m = str(mode).lower()
    if m not in MODES:
        raise UsageError(f"unknown precision {mode!r}", f"use one of {', '.join(MODES)}")
    return m


def storage_dtype(mode: str) -> torch.dtype:
    """The dtype inputs and outputs are kept in for a mode."""
    return torch.float64 if check_mode(mode) == "fp64" else torch.float32


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
