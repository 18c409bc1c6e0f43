"""What an audit will cost, said before it starts: its units, its model evaluations and their time.

An audit's work is counted in *model evaluations* — forward-pass equivalents of the audited model, phase
by phase: drawing x0 with the model's sampler (none when x0 is given or cached), the contract check, and
each planned diagnostic variant at every time point (its :attr:`~conservcheck.diagnostics.Variant.cost`:
one per loop node; a Jacobian product counts as the passes it costs,
:data:`~conservcheck.geometry.jacobian.PRODUCT_COST`). Its time is that count times the time of one
evaluation, measured on this model, device, precision and batch size by :func:`forward_seconds`; the
control field's units are counted at their measured share (:data:`~conservcheck.runner.units.CONTROL_COST`).

:func:`plan_evals` needs no model run, so a caller can refuse an audit that is too large before loading
anything heavy; :func:`estimate` adds the measured forward time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from conservcheck.contract import CHECK_EVALS
from conservcheck.probe import VectorFieldProbe
from conservcheck.runner.units import UnitSpec

#: A forward-pass timing stops growing its batch once one pass takes this long (seconds).
TIMING_SECONDS = 0.2
#: Smallest batch timed; it doubles up to the audit's batch size, or at most to :data:`TIMING_MAX`.
TIMING_START = 32
TIMING_MAX = 1024


@dataclass(frozen=True)
class Phase:
    """One phase of an audit: its name (``x0``, ``checks``, ``loop.rotation``, …), model evaluations and units."""

    name: str
    evals: float
    units: int = 0


@dataclass(frozen=True)
class Estimate:
    """An audit's plan: phases with their model evaluations, and the measured time of one evaluation.

    Attributes:
        phases: in run order.
        n_time_points: time points of the audit.
        seconds_per_eval: measured seconds per model evaluation (per sample) at ``batch_size``; None when
            the model could not be timed.
        batch_size: the model batch size the audit runs with.
    """

    phases: tuple[Phase, ...]
    n_time_points: int
    seconds_per_eval: float | None
    batch_size: int

    @property
    def evals(self) -> float:
        """Model evaluations of the whole audit."""
        return sum(p.evals for p in self.phases)

    @property
    def units(self) -> int:
        return sum(p.units for p in self.phases)

    @property
    def seconds(self) -> float | None:
        """Estimated wall time of the audit's model work (seconds), or None."""
        return None if self.seconds_per_eval is None else self.evals * self.seconds_per_eval

    def line(self) -> str:
        """One line for the log: units, evaluations by phase, the measured forward pass and the estimate."""
        parts = ", ".join(f"{p.name} {p.evals:,.0f}" for p in self.phases if p.evals >= 1)
        text = (
            f"plan: {self.units} units over {self.n_time_points} time points, "
            f"{self.evals:,.0f} model evaluations ({parts})"
        )
        if self.seconds_per_eval is None:
            return text + "; forward pass not timed, no time estimate"
        return (
            f"{text}; forward pass {1e3 * self.seconds_per_eval:.3g} ms per sample at batch {self.batch_size} "
            f"→ about {duration_text(self.seconds or 0.0)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_evals": round(self.evals),
            "seconds": None if self.seconds is None else round(self.seconds, 3),
            "seconds_per_eval": self.seconds_per_eval,
            "batch_size": self.batch_size,
            "phases": {p.name: round(p.evals) for p in self.phases},
        }


def duration_text(seconds: float) -> str:
    """``45 s``, ``3 min 20 s``, ``2 h 05 min``: a duration as a person reads it."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def plan_evals(plan: Iterable[UnitSpec], sampling_evals: float, contract: bool = True) -> tuple[Phase, ...]:
    """The phases of an audit and their model evaluations, without running the model.

    Args:
        plan: the audit's units (:func:`~conservcheck.runner.units.plan_units`); a unit's ``cost`` is its
            model evaluations (the control's already scaled by its share).
        sampling_evals: model evaluations of drawing x0 (n_samples × sampler steps; 0 when x0 is given or
            cached).
        contract: whether the contract check runs.
    """
    phases: dict[str, list[float]] = {}
    if sampling_evals:
        phases["x0"] = [float(sampling_evals), 0]
    if contract:
        phases["checks"] = [float(CHECK_EVALS), 0]
    for spec in plan:
        entry = phases.setdefault(f"{spec.diagnostic}.{spec.variant}", [0.0, 0])
        entry[0] += spec.cost
        entry[1] += 1
    return tuple(Phase(name, evals, int(units)) for name, (evals, units) in phases.items())


def forward_seconds(
    probe: VectorFieldProbe, batch_size: int, t: float | None = None, rows: float | None = None
) -> float:
    """Seconds per sample of one batched forward pass of ``probe`` (no autograd), measured.

    One untimed pass first (lazy initialisation, kernel selection), then batches of 32, 64, … rows until
    one pass takes :data:`TIMING_SECONDS` or the batch reaches ``batch_size`` (or 1024 rows, where a pass
    of a model worth timing is long enough, or a quarter of ``rows``, the evaluations of the whole audit:
    the timing's three passes then cost less than the audit itself); at that size the best of two
    passes counts, so one slow spell of a shared machine does not set the estimate. Small batches are
    not timed: on a CPU their per-sample time says little about the audit's batches. The inputs are
    unit-variance noise at the middle of the process's noise range. Costs about three times the last pass.
    """
    shape = probe.sample_shape
    tt = probe.process.t_from_sigma(torch.tensor(0.5, dtype=torch.float64)) if t is None else t
    largest = min(batch_size, TIMING_MAX)
    if rows is not None:
        largest = max(1, min(largest, math.ceil(rows / 4)))
    size = min(TIMING_START, largest)

    def timed(rows: int) -> float:
        x = torch.randn(rows, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        x = x.to(device=probe.device, dtype=probe.dtype)
        with torch.no_grad():
            _sync(probe.device)
            start = time.perf_counter()
            probe.score(x, tt)
            _sync(probe.device)
        return time.perf_counter() - start

    timed(size)
    while True:
        seconds = timed(size)
        if seconds >= TIMING_SECONDS or size >= largest:
            return min(seconds, timed(size)) / size
        size = min(largest, 2 * size)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def estimate(
    probe: VectorFieldProbe,
    plan: Iterable[UnitSpec],
    n_time_points: int,
    batch_size: int,
    sampling_evals: float = 0.0,
    *,
    measure: bool = True,
) -> Estimate:
    """The audit's :class:`Estimate`: :func:`plan_evals` and, with ``measure``, the forward time of the
    model (:func:`forward_seconds`; a model that fails to run gives no time estimate, and the audit
    reports its failure where it happens)."""
    phases = plan_evals(plan, sampling_evals)
    per_eval = None
    if measure:
        try:
            per_eval = forward_seconds(probe, batch_size, rows=sum(p.evals for p in phases))
        except Exception:  # the audit itself reports the model's failure, unit by unit
            per_eval = None
    return Estimate(phases, n_time_points, per_eval, batch_size)


__all__ = ["Estimate", "Phase", "duration_text", "estimate", "forward_seconds", "plan_evals"]
