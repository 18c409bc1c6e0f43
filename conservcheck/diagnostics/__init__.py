"""The diagnostics, one registered plug-in per module: loop integrals (Eq. 4), curl (Eq. 5), Stein (Eq. 20–21).

A :class:`Diagnostic` is everything the rest of the tool needs to know about one diagnostic: the audit
options it owns, how it plans its variants from those options, which scale-free metric its verdict checks
read (its *headline*), how the console shows it, which figures draw it, and the extra numerical floor its
own values carry. The audit, the report, the console tables, the plots and the report's JSON schema all
read this registry; nothing else lists diagnostics. Built-ins are in :data:`BUILTIN`; third parties add
theirs through the entry-point group ``conservcheck.diagnostics`` (name → ``module:DIAGNOSTIC``).
docs/extending.md walks through it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from conservcheck import plugins
from conservcheck.diagnostics.result import DiagnosticResult
from conservcheck.errors import UsageError
from conservcheck.probe import VectorFieldProbe
from conservcheck.settings import Option

GROUP = "conservcheck.diagnostics"
BUILTIN: dict[str, str] = {
    "loop": "conservcheck.diagnostics.loop_integral:DIAGNOSTIC",
    "curl": "conservcheck.diagnostics.curl:DIAGNOSTIC",
    "stein": "conservcheck.diagnostics.stein:DIAGNOSTIC",
}
#: The key of a per-variant mapping that applies to every variant not named in it.
ANY = "*"

RunFn = Callable[..., DiagnosticResult]


@dataclass(frozen=True)
class Variant:
    """One variant of a diagnostic, planned for every time point of an audit.

    ``run(probe, x0, time, *, seed, batcher, **kwargs)`` computes it; ``cost`` is its model evaluations per
    time point (for the plan's estimate and the progress bar); a ``controlled`` variant also runs on the
    audit's conservative control field, whose values are its numerical floor.
    """

    name: str
    run: RunFn
    kwargs: dict[str, Any]
    cost: float
    controlled: bool = True


@dataclass(frozen=True)
class Figure:
    """A metric-against-time figure: the column drawn, its axis label, and whether the axis is logarithmic."""

    metric: str
    label: str
    log: bool = True


@dataclass(frozen=True)
class Diagnostic:
    """One diagnostic.

    Attributes:
        name: its name in reports, tables and ``--fail-if`` (``loop``, ``curl``, ``stein``).
        summary: one line for the docs.
        options: the audit options it owns (in the order ``--help`` lists them).
        plan: ``plan(options, probe) -> [Variant]``: what the resolved audit options ask of it.
        selected: ``selected(options) -> bool``: whether the options ask for any variant at all.
        headline: the verdict's scale-free metric per variant (key :data:`ANY` for every variant); a
            variant without one takes no part in the verdict.
        table: (main metric, second metric) of the console table per variant (key :data:`ANY`); the
            main one is shown with full statistics, the second by its median.
        abs_columns: signed columns whose absolute value the report adds as ``abs_<column>``.
        figures: metric-against-time figures; ``box_metrics``: per-sample box plots per time point.
        floor: ``floor(values) -> float``: a floor its own values carry beyond the control's (the loop
            integral's quadrature error), from a model unit's columns; None when there is none. A check
            that only this floor keeps from being a violation is *not resolved* at the unit's
            discretisation (:mod:`conservcheck.report.verdict`): more nodes would lower the floor.
        pooled: metric → (numerator column, denominator column, factor): the metric pooled over samples,
            factor · √(Σ numerator / Σ denominator), reported beside its per-sample median (the curl's
            ‖J − Jᵀ‖ / (2‖J‖) over all samples).
        coupled_control: the control field of its units is the Gaussian control turned by a fixed
            orthogonal map, so that every coordinate of the field depends on every other: a method whose
            rounding acts through those couplings (central differences) shows its floor on the control,
            which a diagonal field, whose off-diagonal Jacobian is exactly zero by any method, never does.
        control_follows: meta keys of a model unit passed as keywords to its control unit (the curl's
            Jacobian ``strategy``), so the floor is measured with the method the model's value was.
    """

    name: str
    summary: str
    options: tuple[Option, ...]
    plan: Callable[[Mapping[str, Any], VectorFieldProbe], list[Variant]]
    selected: Callable[[Mapping[str, Any]], bool]
    headline: Mapping[str, str] = field(default_factory=dict)
    table: Mapping[str, tuple[str, str | None]] = field(default_factory=dict)
    abs_columns: tuple[str, ...] = ()
    figures: tuple[Figure, ...] = ()
    box_metrics: tuple[str, ...] = ()
    floor: Callable[[Mapping[str, list[Any]]], float] | None = None
    pooled: Mapping[str, tuple[str, str, float]] = field(default_factory=dict)
    coupled_control: bool = False
    control_follows: tuple[str, ...] = ()

    def headline_metric(self, variant: str) -> str | None:
        """The verdict metric of ``variant``, or None when it takes no part in the verdict."""
        return self.headline.get(variant, self.headline.get(ANY))

    def table_metrics(self, variant: str) -> tuple[str | None, str | None]:
        """(main, second) metric of ``variant``'s console table."""
        return self.table.get(variant, self.table.get(ANY, (self.headline_metric(variant), None)))


def registered() -> dict[str, Diagnostic]:
    """Every diagnostic by name: built-ins first, then those of the entry points that import cleanly."""
    out: dict[str, Diagnostic] = {}
    for entry in plugins.entries(GROUP, BUILTIN):
        try:
            out[entry.name] = entry.load()
        except Exception:
            if entry.builtin:
                raise
    return out


def get(name: str) -> Diagnostic:
    """The diagnostic registered as ``name``."""
    diagnostics = registered()
    if name not in diagnostics:
        raise UsageError(f"unknown diagnostic {name!r}", f"use one of {', '.join(diagnostics)}")
    return diagnostics[name]


def headline_metric(diagnostic: str, variant: str) -> str | None:
    """The verdict metric of a diagnostic's variant; None for an unknown diagnostic or a variant without one."""
    spec = registered().get(diagnostic)
    return spec.headline_metric(variant) if spec is not None else None


def pooled_metric(diagnostic: str, metric: str) -> tuple[str, str, float] | None:
    """(numerator, denominator, factor) of a metric pooled over samples, or None (:attr:`Diagnostic.pooled`)."""
    spec = registered().get(diagnostic)
    return spec.pooled.get(metric) if spec is not None else None


def headline_rule() -> dict[str, str]:
    """The headline metrics as the report's verdict rule records them: ``diag`` or ``diag/variant`` → metric."""
    return {
        (name if variant == ANY else f"{name}/{variant}"): metric
        for name, spec in registered().items()
        for variant, metric in spec.headline.items()
    }


__all__ = [
    "ANY",
    "BUILTIN",
    "Diagnostic",
    "DiagnosticResult",
    "Figure",
    "GROUP",
    "Variant",
    "get",
    "headline_metric",
    "headline_rule",
    "pooled_metric",
    "registered",
]
