"""A size guard: an audit that cannot fit in memory is refused before it starts, with its estimate.

:func:`check_size` compares what an audit holds at once — its clean samples x0 (float64, plus a copy in
the model's dtype) and the per-sample values of every unit (about :data:`COLUMNS_PER_UNIT` columns of
Python floats in the records and their table) — with the memory the machine has available, and refuses
the run with one line giving the estimate and the planned model evaluations. It is deliberately simple
(a plan-level estimate of time and memory can replace :func:`estimate` later); model activations are
bounded by the batch size and loop nodes by ``--memory-budget``, so neither is counted here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from conservcheck.errors import UsageError
from conservcheck.probe import VectorFieldProbe

#: Values per sample a unit keeps (the loop integral's 11 columns and their absolute values).
COLUMNS_PER_UNIT = 16
#: Bytes a kept value costs: a Python float in a record's list (24 + 8), its float64 row and JSON text.
BYTES_PER_VALUE = 64


@dataclass(frozen=True)
class Estimate:
    """What an audit holds at once (``bytes``) and the model evaluations it plans (``evaluations``)."""

    bytes: int
    evaluations: float
    n_samples: int
    dim: int
    units: int


def estimate(plan: list[Any], probe: VectorFieldProbe, opts: dict[str, Any]) -> Estimate:
    """The memory and evaluations of an audit's plan (module doc)."""
    n, dim = int(opts["n_samples"]), probe.dim
    x0 = n * dim * (8 + probe.dtype.itemsize)
    values = len(plan) * n * COLUMNS_PER_UNIT * BYTES_PER_VALUE
    return Estimate(x0 + values, float(sum(s.cost for s in plan)), n, dim, len(plan))


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``, else physical memory), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PB"


def check_memory(needed: int, what: str, hint: str, available: int | None = None) -> None:
    """Refuse work that would hold ``needed`` bytes when fewer are available (``available``; default: the
    machine's): ``the <what> would hold about <size> in memory …, more than the <size> available``."""
    limit = available_memory() if available is None else available
    if limit is not None and needed > limit:
        raise UsageError(f"the {what}, more than the {_size(limit)} available", hint)


def check_size(plan: list[Any], probe: VectorFieldProbe, opts: dict[str, Any], available: int | None = None) -> None:
    """Refuse an audit whose estimate exceeds the available memory (``available`` bytes; default: the
    machine's), naming the estimate, its parts and the planned model evaluations."""
    est = estimate(plan, probe, opts)
    check_memory(
        est.bytes,
        f"audit would hold about {_size(est.bytes)} in memory ({est.n_samples} samples × {est.dim} components, "
        f"{est.units} units) and run about {est.evaluations:.3g} model evaluations",
        "lower --samples (or audit fewer time points or diagnostics)",
        available,
    )


__all__ = ["Estimate", "available_memory", "check_memory", "check_size", "estimate"]
