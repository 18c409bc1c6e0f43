"""What every diagnostic returns: per-sample values in named columns, and how they were computed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
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


def ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den per sample, with 0 / 0 = 0: a field that is exactly zero along a loop (or whose Jacobian
    block vanishes) has no circulation and no asymmetry, which is a value, not a missing one. A nonzero
    numerator over a zero denominator stays Inf (it cannot happen for these bounded ratios)."""
    both_zero = (num == 0) & (den == 0)
    return torch.where(both_zero, torch.zeros_like(num), num / torch.where(both_zero, torch.ones_like(den), den))
