"""What every diagnostic returns: per-sample values in named columns, and how they were computed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from conservcheck.timepoints import TimePoint


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
