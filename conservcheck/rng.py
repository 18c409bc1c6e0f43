"""Seeded random streams keyed by position, so the random inputs do not depend on batching.

Each random object (one loop, one probe vector, one forward sample) draws from its own generator,
seeded from the audit seed and the object's keys (diagnostic, time index, sample index). Streams are
drawn on the CPU and moved to the target device once per object, so the same seed gives the same draws,
bit for bit, on every device, for every batch size, chunking, shard split and thread count. (What the
model computes from them can differ by rounding between batch shapes: see
:mod:`conservcheck.report.reproducibility`.)
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed from ``seed`` and any number of hashable keys (stable across runs and hosts)."""
    text = "/".join([str(int(seed))] + [str(k) for k in keys])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def generator(seed: int, *keys: object) -> torch.Generator:
    """A CPU ``torch.Generator`` for the stream named by ``(seed, *keys)``."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(seed, *keys))
    return g


def normal(
    shape: tuple[int, ...],
    seed: int,
    *keys: object,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal draws for one keyed stream, generated in float64 on the CPU then cast."""
    out = torch.randn(shape, generator=generator(seed, *keys), dtype=torch.float64)
    return out.to(device=device, dtype=dtype)


def rademacher(
    shape: tuple[int, ...],
    seed: int,
    *keys: object,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """±1 draws with equal probability for one keyed stream."""
    bits = torch.randint(0, 2, shape, generator=generator(seed, *keys))
    return (2 * bits - 1).to(device=device, dtype=dtype)


def permutation(n: int, seed: int, *keys: object) -> torch.Tensor:
    """A random permutation of ``range(n)`` for one keyed stream (CPU, int64)."""
    return torch.randperm(n, generator=generator(seed, *keys))
