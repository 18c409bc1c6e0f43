"""What every diagnostic takes and returns.

A diagnostic runs at one :class:`TimePoint` over clean samples x0 [B, *shape] and returns a
:class:`DiagnosticResult` holding one value per sample (per loop, per probe point) in named columns.
Forward samples x_t are drawn by :func:`forward_samples` from streams keyed by the sample's index, so a
sample's numbers do not depend on how many others run beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import rng
from ..process import Process


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

    @property
    def key(self) -> str:
        return f"k{self.index}" if self.index is not None else f"t{self.t:.10g}"

    @classmethod
    def from_t(cls, process: Process, t: float, index: int | None = None) -> "TimePoint":
        tt = torch.tensor(float(t), dtype=torch.float64)
        return cls(t=float(t), sigma=float(process.sigma(tt)), alpha=float(process.alpha(tt)), index=index)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "t": self.t, "sigma": self.sigma, "alpha": self.alpha}


@dataclass
class DiagnosticResult:
    """Per-sample values of one diagnostic variant at one time point.

    ``values`` maps column names to float64 CPU tensors of shape [B] (one entry per loop / probe
    sample, in sample-index order); ``meta`` holds how it was computed (rule, Jacobian strategy,
    number of model evaluations, ...).
    """

    diagnostic: str
    variant: str
    time: TimePoint
    values: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return next(iter(self.values.values())).shape[0] if self.values else 0


def forward_samples(
    process: Process, x0: Tensor, time: TimePoint, seed: int, start: int = 0
) -> tuple[Tensor, Tensor]:
    """x_t = α x0 + σ ε with ε drawn per sample from the stream (seed, "eps", time.key, index).

    Args:
        x0: clean samples [B, *shape]; sample b has global index ``start + b``.
    Returns:
        (x_t, ε), both shaped like x0, same dtype and device.
    """
    eps = torch.stack(
        [
            rng.normal(tuple(x0.shape[1:]), seed, "eps", time.key, start + b, dtype=x0.dtype, device=x0.device)
            for b in range(x0.shape[0])
        ]
    )
    return time.alpha * x0 + time.sigma * eps, eps
