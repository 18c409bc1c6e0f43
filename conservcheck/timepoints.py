"""Time points: where in the noising process the diagnostics run, and the forward samples there.

A :class:`TimePoint` names one time in every convention a report needs (canonical t, σ, α and, on a
discrete schedule, the native index k). :func:`forward_samples` draws x_t = α x0 + σ ε with ε keyed by
each sample's index, so a sample's x_t does not depend on how many others run beside it.

Default time points (:func:`time_points`), from nearly clean to nearly pure noise:

* a discrete schedule of T steps (DDPM-style index k): k = round(f·T) for f in
  :data:`DISCRETE_FRACTIONS` — k = 10, 100, 250, 500, 750, 990 for T = 1000, as on the paper's axes;
* the OU / VP process in continuous time and flow matching: the times where σ(t) takes the values in
  :data:`NOISE_LEVELS` (σ = 0.05 … 0.999);
* variance exploding: σ = :data:`VE_LEVELS` × the width of the model's data range (0.01 … 50 widths).

On a discrete schedule a model only knows its own indices: ``--times`` and ``--sigmas`` are snapped to
the nearest index k (the point then has that index's t_k and σ_k, which the report records, beside the
value asked for in ``requested``), and a value beyond the schedule's ends by more than half a step is
refused — clamping it to an end would feed the network k = 0 while the conversion used the requested σ.

:func:`noise_span` is the stretch of time the probability flow is integrated over (by the model sampler
and the transport check): from nearly pure noise (OU time 5, α ≈ 0.0067 like DDPM's last linear-schedule
index; flow time 0.999; σ = 50 data-range widths for VE) to σ = :data:`END_SIGMA_REL` (× the width for VE).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from conservcheck import rng
from conservcheck.errors import UsageError
from conservcheck.probe import VectorFieldProbe
from conservcheck.process import Process

log = logging.getLogger("conservcheck")

DISCRETE_FRACTIONS = (0.01, 0.1, 0.25, 0.5, 0.75, 0.99)
NOISE_LEVELS = (0.05, 0.2, 0.45, 0.7, 0.9, 0.999)
VE_LEVELS = (0.01, 0.05, 0.2, 1.0, 5.0, 50.0)
START_VE_WIDTHS = 50.0
START_OU_T = 5.0
START_FLOW_T = 0.999
END_SIGMA_REL = 1e-3


@dataclass(frozen=True)
class TimePoint:
    """One time point of an audit, in every convention a report needs.

    ``t`` is canonical time (OU time, σ for VE, flow time); ``index`` is the native discrete index
    when the model has a discrete schedule; ``key`` names the point in random streams and reports.
    """

    t: float
    sigma: float
    alpha: float
    index: int | None = None
    #: The value asked for (``{"flag": "--times", "value": 0.5}``) when it was snapped to an index.
    requested: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        return f"k{self.index}" if self.index is not None else f"t{self.t:.10g}"

    @classmethod
    def from_t(cls, process: Process, t: float, index: int | None = None) -> TimePoint:
        tt = torch.tensor(float(t), dtype=torch.float64)
        return cls(t=float(t), sigma=float(process.sigma(tt)), alpha=float(process.alpha(tt)), index=index)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "t": self.t, "sigma": self.sigma, "alpha": self.alpha}


SampleIndex = int | Sequence[int]


def sample_index(start: SampleIndex, b: int) -> list[int]:
    """Global sample indices of b rows: ``start + row`` for an int, or one non-negative index per row (the
    samples of one condition of a conditional audit are not contiguous). Raises UsageError otherwise."""
    if isinstance(start, int) and not isinstance(start, bool):
        if start < 0:
            raise UsageError(f"start must be a non-negative integer, got {start!r}", "pass the global index of x0[0]")
        return list(range(start, start + b))
    try:
        idx = [int(i) for i in (start.tolist() if isinstance(start, Tensor) else start)]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise UsageError(
            f"start must be an integer or one index per sample, got {start!r}", "pass the global index of x0[0]"
        ) from None
    if len(idx) != b or any(i < 0 for i in idx):
        raise UsageError(f"got {len(idx)} sample indices for {b} samples", "pass one non-negative index per row of x0")
    return idx


def forward_samples(x0: Tensor, time: TimePoint, seed: int, start: SampleIndex = 0) -> tuple[Tensor, Tensor]:
    """x_t = α x0 + σ ε with ε drawn per sample from the stream (seed, "eps", time.key, index).

    Args:
        x0: clean samples [B, *shape]; sample b has global index ``start + b`` (or ``start[b]`` when
            ``start`` lists one index per sample).
    Returns:
        (x_t, ε), both shaped like x0, same dtype and device.
    """
    index = sample_index(start, x0.shape[0])
    eps = torch.stack(
        [rng.normal(tuple(x0.shape[1:]), seed, "eps", time.key, i, dtype=x0.dtype, device=x0.device) for i in index]
    )
    return time.alpha * x0 + time.sigma * eps, eps


def noise_span(probe: VectorFieldProbe) -> tuple[float, float]:
    """(t_start, t_end): canonical times from nearly pure noise to nearly clean data (module doc).

    A discrete schedule's own ends (its last and first index); otherwise OU time :data:`START_OU_T`, flow
    time :data:`START_FLOW_T` or σ = :data:`START_VE_WIDTHS` data-range widths (VE), down to
    σ = :data:`END_SIGMA_REL` (× the width for VE).
    """
    conv, proc = probe.time_convention, probe.process
    if conv.num_steps is not None:
        grid = conv.to_canonical(torch.tensor([conv.num_steps - 1, 0], dtype=torch.float64))
        return float(grid[0]), float(grid[1])
    width = probe.data_range[1] - probe.data_range[0]
    start = {"ve": START_VE_WIDTHS * width, "flow": START_FLOW_T}.get(proc.name, START_OU_T)
    end = proc.t_from_sigma(torch.tensor(END_SIGMA_REL * (width if proc.name == "ve" else 1.0), dtype=torch.float64))
    return float(start), float(end)


def _from_index(probe: VectorFieldProbe, k: int) -> TimePoint:
    t = float(probe.time_convention.to_canonical(torch.tensor(float(k), dtype=torch.float64)))
    return TimePoint.from_t(probe.process, t, index=int(k))


def _snap(probe: VectorFieldProbe, steps: int, t: Tensor, flag: str, given: Sequence[float]) -> list[TimePoint]:
    """Canonical times t on a discrete schedule of ``steps`` indices → the nearest indices' points (module doc)."""
    conv = probe.time_convention
    grid = conv.to_canonical(torch.arange(steps, dtype=torch.float64))
    lo, hi = float(grid[0] - (grid[1] - grid[0]) / 2), float(grid[-1] + (grid[-1] - grid[-2]) / 2)
    sig = probe.process.sigma(grid)
    for v, tt in zip(given, t.tolist()):
        if not lo <= tt <= hi:
            axis = "σ" if flag == "--sigmas" else "t"
            ends = (grid[0], grid[-1]) if axis == "t" else (sig[0], sig[-1])
            raise UsageError(
                f"{flag} {v:g} is outside the model's {steps}-step schedule, whose {axis} runs from "
                f"{float(ends[0]):.4g} (k=0) to {float(ends[1]):.4g} (k={steps - 1})",
                f"pick values in that span, or name indices with --time-indices 0:{steps - 1}",
            )
    idx = conv.from_canonical(t).round().long().clamp(0, steps - 1)
    points = []
    for v, k in zip(given, idx.tolist()):
        point = replace(_from_index(probe, int(k)), requested={"flag": flag, "value": float(v)})
        log.info("%s %g → k=%d (t=%.4g, σ=%.4g)", flag, v, point.index, point.t, point.sigma)
        points.append(point)
    return points


def time_points(
    probe: VectorFieldProbe,
    times: Sequence[float] | None = None,
    time_indices: Sequence[int] | None = None,
    sigmas: Sequence[float] | None = None,
) -> list[TimePoint]:
    """The audit's time points, sorted from clean to noisy, duplicates removed (defaults: module doc)."""
    conv, proc = probe.time_convention, probe.process
    steps = conv.num_steps
    if time_indices is not None:
        if steps is None:
            raise UsageError(
                f"--time-indices needs a model with a discrete schedule; this one runs in {conv.name} time",
                "use --times or --sigmas",
            )
        bad = [k for k in time_indices if not 0 <= k < steps]
        if bad:
            raise UsageError(f"time index {bad[0]} is outside the schedule's 0 … {steps - 1}", "pick indices in range")
        points = [_from_index(probe, k) for k in time_indices]
    elif times is not None:
        proc.check_times(torch.tensor(times, dtype=torch.float64))
        if steps is not None:
            points = _snap(probe, steps, torch.tensor(times, dtype=torch.float64), "--times", times)
        else:
            points = [TimePoint.from_t(proc, t) for t in times]
    elif sigmas is not None:
        sig = torch.tensor(sigmas, dtype=torch.float64)
        if proc.name != "ve" and bool((sig >= 1).any()):
            raise UsageError(f"σ must lie in (0, 1) for the {proc.name} process", "pass noise levels below 1")
        t = proc.t_from_sigma(sig)
        if steps is not None:
            points = _snap(probe, steps, t, "--sigmas", sigmas)
        else:
            proc.check_times(t)
            points = [TimePoint.from_t(proc, float(v)) for v in t]
    elif steps is not None:
        points = [_from_index(probe, min(steps - 1, round(f * steps))) for f in DISCRETE_FRACTIONS]
    elif proc.name == "ve":
        width = probe.data_range[1] - probe.data_range[0]
        points = [TimePoint.from_t(proc, width * s) for s in VE_LEVELS]
    else:
        t = proc.t_from_sigma(torch.tensor(NOISE_LEVELS, dtype=torch.float64))
        points = [TimePoint.from_t(proc, float(v)) for v in t]
    unique: dict[str, TimePoint] = {}
    for p in points:
        unique.setdefault(p.key, p)
    return sorted(unique.values(), key=lambda p: p.t)
