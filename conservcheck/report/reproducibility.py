"""What an audit promises to reproduce, and to what tolerance (docs/report.md#reproducibility).

Bit-identical: two audits with the same model, data, options and seed, run with the same batch size
and memory budget, on the same kind of device, with the same library versions and the same number of
CPU threads, give identical JSON except the ``run`` object; so do a sharded audit merged and the
single-process run, and a resumed run and the uninterrupted one (units are computed whole and read back
bit-exactly).

Bit-identical everywhere: the random inputs. Every draw — the forward samples' noise, the loops'
pairings, vertices and bridges, the curl's index sets and probe vectors, the sampler's starting noise —
comes from a CPU generator keyed by (seed, stream, time point, sample index) and is drawn in float64,
so it does not depend on the batch size, the chunking, the shard, the thread count or the device.

Within :data:`TOLERANCE`: any other batch size, memory budget (loop chunking), shard split or thread
count. Matrix and convolution kernels choose their blocking and summation order by shape, CPU features
and thread count, so the model's output for one sample can move by a rounding error when its batch
changes. Every headline metric (the scale-free number the verdict reads: ``abs_circulation_ratio``,
``curl_rel_fro``, ``rel_asym``), per sample and in every summary statistic, then satisfies

    |a − b| ≤ rtol · |a| + atol

with (rtol, atol) of the forward precision; a curl by central differences (Jacobian strategy ``fd``)
divides both by its relative step h = ∛ε (:func:`tolerance`). ``atol`` bounds a value at the numerical
floor (a conservative field's circulation is rounding, which changes with the kernel); ``rtol`` the
values above it. Order statistics keep the bound: the k-th smallest of n values is a monotone function
of each of them, so a per-sample bound |a_i − b_i| ≤ rtol|a_i| + atol holds for every quantile, and for
the mean and the seeded bootstrap CI of the non-negative headline metrics — two samples that swap places
in the ordering were within the bound of each other.

The values were measured with ``benchmarks/bench_reproducibility.py`` (batch sizes 1, 3, 7 against 64,
one loop at a time, 1 and 2 threads; Gaussian-mixture, quadratic and linear fields, the embedded funnel
MLP and digits UNet) and carry a margin over the largest deviation seen (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from conservcheck.errors import UsageError
from conservcheck.geometry.jacobian import rel_step_for


@dataclass(frozen=True)
class Tolerance:
    """|a − b| ≤ rtol · |a| + atol · scale; ``scale`` is 1 for a scale-free (headline) metric."""

    rtol: float
    atol: float

    def bound(self, a: float, scale: float = 1.0) -> float:
        """The largest deviation from ``a`` the promise allows (``scale``: the magnitude atol is relative to)."""
        return self.rtol * abs(a) + self.atol * scale

    def allows(self, a: float, b: float, scale: float = 1.0) -> bool:
        return abs(a - b) <= self.bound(a, scale)


#: The reproducibility tolerance of the headline metrics per forward precision (see the module doc).
TOLERANCE: dict[str, Tolerance] = {
    "fp64": Tolerance(rtol=1e-12, atol=1e-14),
    "fp32": Tolerance(rtol=1e-5, atol=1e-6),
}


def tolerance(precision: str | torch.dtype, strategy: str | None = None) -> Tolerance:
    """The :data:`TOLERANCE` of a precision mode (``fp64``, ``fp32``) or storage dtype.

    ``strategy="fd"`` (a curl or divergence by central differences) divides it by the relative step
    h = ∛ε of the precision, as the differences divide the forward pass's rounding by h.
    """
    if isinstance(precision, torch.dtype):
        name = {torch.float64: "fp64", torch.float32: "fp32"}.get(precision, str(precision))
    else:
        name = precision
    if name not in TOLERANCE:
        raise UsageError(
            f"no reproducibility tolerance is stated for {precision}",
            f"use one of {', '.join(TOLERANCE)}",
        )
    tol = TOLERANCE[name]
    if strategy == "fd":
        h = rel_step_for(name)
        return Tolerance(tol.rtol / h, tol.atol / h)
    return tol


__all__ = ["TOLERANCE", "Tolerance", "tolerance"]
