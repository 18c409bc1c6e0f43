"""A report against a baseline report: is a metric worse, beyond what sampling noise explains?

Two audits of one checkpoint with different seeds give different per-sample values, and their medians
differ by tens of percent at 32 samples per time point; an absolute threshold cannot tell that noise from
a regression. This module compares the per-sample rows of two reports instead.

For one (diagnostic, variant, column) at one time point, the statistic is the ratio of medians

    r = median(new values) / median(baseline values)

over the model's per-sample values (a non-negative column: ``abs_circulation_ratio``, ``curl_rel_fro``, …;
r > 1 is worse). Its sampling distribution comes from a seeded bootstrap: :data:`RESAMPLES` resamples of the
samples, drawn jointly for both reports when they hold the same number of samples (sample i of both reports
is then one pair: with the same seed it saw the same noise, loop and probe-vector draws, which narrows the
interval; with different seeds the pairs are independent and joint resampling is still exact), and
independently otherwise. The resamples are keyed by (diagnostic, variant, column, time point) only, so a
comparison is reproducible bit for bit. Percentile intervals are used: they are invariant under the
log transform a ratio calls for.

A ``worse by P%`` condition (:mod:`conservcheck.report.gate`) holds at a time point when the one-sided lower
confidence bound of r exceeds 1 + P/100: the model is worse by more than P% with the stated confidence.
Over several time points (``at any time``) the level is split Bonferroni-wise, so the chance that noise
alone fails a build stays below 1 − confidence (5% by default) however many time points are tested.

Reports are comparable only when they measured the same thing: the same time points, the same loop and
probe settings (:func:`measurement_options`) and the same seed (the same loops and probe vectors for each
sample index). :func:`check_comparable` refuses anything else with one line naming the difference;
different seeds are accepted on request (``allow_seed_change``), for comparing independent draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from conservcheck import diagnostics, rng
from conservcheck.errors import UsageError
from conservcheck.report.audit_report import AuditReport
from conservcheck.report.summary import ID_COLUMNS

RESAMPLES = 4000
CONFIDENCE = 0.95
#: Options that choose *which* diagnostics run; any other option a diagnostic owns changes *how* it measures.
SELECTORS = ("paths", "curl", "stein")
#: Core options that change how a diagnostic measures (probe vectors of the Hutchinson curl and Stein).
CORE_MEASUREMENT = ("n_probes",)
SEED_HINT = (
    "audit both with the same --seed, or pass --allow-seed-change to compare independent draws of the loops "
    "and probe vectors"
)


def measurement_options() -> dict[str, str]:
    """Option name → the diagnostic that owns it, for every option that changes how a diagnostic measures
    (loop nodes and shapes, curl block size, probe vectors), from the diagnostic registry."""
    out: dict[str, str] = {}
    for name, spec in diagnostics.registered().items():
        for o in spec.options:
            if o.name not in SELECTORS:
                out.setdefault(o.name, name)
    for name in CORE_MEASUREMENT:
        out.setdefault(name, "probe")
    return out


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _time_points(report: AuditReport) -> list[tuple[str, float]]:
    return [(t["key"], float(t["t"])) for t in report.header.get("time_points", [])]


def check_comparable(new: AuditReport, baseline: AuditReport, *, allow_seed_change: bool = False) -> None:
    """Raise :class:`UsageError` (one line) unless ``new`` and ``baseline`` measured the same thing.

    Checked: time points (keys and canonical times), the measurement options (:func:`measurement_options`)
    and the seed (unless ``allow_seed_change``). The number of samples may differ.
    """
    what = "cannot compare with the baseline"
    a, b = _time_points(new), _time_points(baseline)
    same_times = all(math.isclose(x, y, rel_tol=1e-9) for (_, x), (_, y) in zip(a, b))
    if [k for k, _ in a] != [k for k, _ in b] or not same_times:
        here = ", ".join(new.time_label(k) for k, _ in a) or "none"
        there = ", ".join(baseline.time_label(k) for k, _ in b) or "none"
        raise UsageError(
            f"{what}: the time points differ ({here} here; {there} in the baseline)",
            "audit both at the same time points (--time-indices / --times / --sigmas)",
        )
    opts_new, opts_old = new.header.get("options", {}), baseline.header.get("options", {})
    for name, owner in measurement_options().items():
        x, y = opts_new.get(name), opts_old.get(name)
        if x != y:
            kind = "loops" if owner == "loop" else f"{owner} settings"
            raise UsageError(
                f"{what}: the {kind} differ ({name} {_fmt(x)} here, {_fmt(y)} in the baseline)",
                f"audit both with the same {name}",
            )
    seed_new, seed_old = opts_new.get("seed"), opts_old.get("seed")
    if seed_new != seed_old and not allow_seed_change:
        raise UsageError(f"{what}: the seeds differ ({seed_new} here, {seed_old} in the baseline)", SEED_HINT)


@dataclass
class Comparison:
    """One metric at one time point in a report and its baseline.

    ``ratio`` is median(new) / median(baseline); ``low`` – ``high`` its two-sided bootstrap interval at
    :data:`CONFIDENCE`; ``draws`` the bootstrap ratios (for one-sided bounds at other levels, :meth:`lower`).
    ``status`` is ``ok``, or the status of the new report's unit when it has no values (NaN/Inf, error,
    skipped): then every number is NaN.
    """

    diagnostic: str
    variant: str
    column: str
    time_key: str
    time_index: int | None
    t: float
    sigma: float
    n_new: int
    n_baseline: int
    median_new: float
    median_baseline: float
    ratio: float
    low: float
    high: float
    paired: bool
    status: str = "ok"
    draws: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)

    def lower(self, alpha: float) -> float:
        """The one-sided lower confidence bound of the ratio at level 1 − alpha (NaN without values)."""
        if self.draws.size == 0:
            return math.nan
        return float(np.quantile(self.draws, alpha))

    @property
    def metric(self) -> str:
        return f"{self.diagnostic}.{self.variant}.{self.column}"


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den for non-negative medians, with x/0 = inf for x > 0 and 0/0 = 1 (no change)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.inf), where=den > 0)
    return np.where((den == 0) & (num == 0), 1.0, out)


def ratio_draws(new: np.ndarray, old: np.ndarray, *keys: object, resamples: int = RESAMPLES) -> tuple[np.ndarray, bool]:
    """Bootstrap ratios of medians median(new*) / median(old*) from the stream (0, "baseline", *keys).

    Samples are resampled jointly (the same indices for both) when ``new`` and ``old`` have one length,
    independently otherwise; returns (ratios [resamples], whether the resampling was joint).
    """
    gen = np.random.default_rng(rng.derive_seed(0, "baseline", *keys))
    paired = len(new) == len(old)
    i = gen.integers(0, len(new), size=(resamples, len(new)))
    j = i if paired else gen.integers(0, len(old), size=(resamples, len(old)))
    return _ratio(np.median(new[i], axis=1), np.median(old[j], axis=1)), paired


def _values(report: AuditReport, diagnostic: str, variant: str, column: str, time_key: str) -> np.ndarray:
    rows = report.rows
    sel = rows[
        (rows["field"] == "model")
        & (rows["diagnostic"] == diagnostic)
        & (rows["variant"] == variant)
        & (rows["time_key"] == time_key)
    ]
    # Sample order, so that resampling jointly pairs sample i of one report with sample i of the other.
    values: np.ndarray = sel.sort_values("sample", kind="stable")[column].to_numpy(dtype=np.float64)
    return values


def _unit_status(report: AuditReport, diagnostic: str, variant: str, time_key: str) -> str | None:
    for u in report.units:
        if u["field"] == "model" and u["diagnostic"] == diagnostic and u["variant"] == variant:
            if u["time_key"] == time_key:
                return str(u["status"])
    return None


def compare_metric(
    new: AuditReport, baseline: AuditReport, diagnostic: str, variant: str, column: str
) -> list[Comparison]:
    """The ratio of medians of one non-negative column at every time point of ``new`` (module doc).

    A time point where the new report's unit has no values (not ``ok``) gives a Comparison with that status
    and NaN numbers. Raises :class:`UsageError` when either report lacks the column or the baseline lacks
    values at a time point (nothing to compare with), or when the column has negative values (a ratio of
    medians of a signed quantity says nothing about "worse": compare its ``abs_`` column).
    """
    name = f"{diagnostic}.{variant}.{column}"
    for which, r in (("report", new), ("baseline", baseline)):
        if column not in r.rows.columns:
            numeric = [c for c in r.rows.columns if c not in ID_COLUMNS]
            raise UsageError(f"the {which} has no column {column}", "columns: " + ", ".join(numeric))
    out: list[Comparison] = []
    for tp in new.header["time_points"]:
        key = tp["key"]
        status = _unit_status(new, diagnostic, variant, key)
        if status is None:
            continue
        old_status = _unit_status(baseline, diagnostic, variant, key)
        old = _values(baseline, diagnostic, variant, column, key)
        if old_status != "ok" or old.size == 0 or not np.isfinite(old).all():
            why = old_status if old_status not in (None, "ok") else "no values"
            raise UsageError(
                f"the baseline has no {name} at {baseline.time_label(key)} ({why})",
                "use a baseline report whose audit finished cleanly with this diagnostic",
            )
        vals = _values(new, diagnostic, variant, column, key)
        common: dict[str, Any] = {
            "diagnostic": diagnostic,
            "variant": variant,
            "column": column,
            "time_key": key,
            "time_index": tp.get("index"),
            "t": float(tp["t"]),
            "sigma": float(tp["sigma"]),
            "n_new": int(vals.size),
            "n_baseline": int(old.size),
            "median_baseline": float(np.median(old)),
        }
        if status != "ok" or vals.size == 0 or not np.isfinite(vals).all():
            nan = math.nan
            bad = status if status != "ok" else "nonfinite"
            out.append(Comparison(**common, median_new=nan, ratio=nan, low=nan, high=nan, paired=False, status=bad))
            continue
        if (vals < 0).any() or (old < 0).any():
            raise UsageError(
                f"{name} has negative values: a ratio of medians compares sizes",
                f"compare its absolute value, e.g. {diagnostic}.{variant}.abs_{column.removeprefix('abs_')}",
            )
        draws, paired = ratio_draws(vals, old, diagnostic, variant, column, key)
        alpha = 1.0 - CONFIDENCE
        low, high = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
        median = float(np.median(vals))
        ratio = float(_ratio(np.asarray(median), np.asarray(common["median_baseline"])))
        out.append(
            Comparison(
                **common,
                median_new=median,
                ratio=ratio,
                low=float(low),
                high=float(high),
                paired=paired,
                draws=draws,
            )
        )
    if not out:
        raise UsageError(f"the report has no {name}", "name a diagnostic, variant and column the report contains")
    return out


def headline_comparisons(new: AuditReport, baseline: AuditReport) -> list[Comparison]:
    """Every headline metric the two reports share, compared at every time point (for summaries and pages)."""
    seen: dict[tuple[str, str], str] = {}
    for u in new.units:
        metric = diagnostics.headline_metric(u["diagnostic"], u["variant"])
        if u["field"] == "model" and metric is not None:
            seen.setdefault((u["diagnostic"], u["variant"]), metric)
    have = {(u["diagnostic"], u["variant"]) for u in baseline.units if u["field"] == "model"}
    out: list[Comparison] = []
    for (diag, variant), metric in seen.items():
        if (diag, variant) in have:
            out += compare_metric(new, baseline, diag, variant, metric)
    return out


__all__ = [
    "CONFIDENCE",
    "RESAMPLES",
    "Comparison",
    "check_comparable",
    "compare_metric",
    "headline_comparisons",
    "measurement_options",
    "ratio_draws",
]
