"""The per-sample table of an audit's units and its statistics per time point.

:func:`rows_from_units` turns unit records into a tidy table, one row per loop / probe point:
``field, diagnostic, variant, time_key, time_index, t, sigma, sample``, then ``guidance`` (the guidance
scale w; only in the report of a conditional model) and one column per value. :func:`summarize` gives,
per (field, diagnostic, variant, time point, guidance scale, metric), the median, the quartiles, the mean
and a seeded bootstrap 95% confidence interval of the mean (``guidance`` empty for an unconditional
model and for the control, which does not depend on w), and for a ratio metric its diagnostic pools over
samples (:attr:`conservcheck.diagnostics.Diagnostic.pooled`, the curl's ‖J − Jᵀ‖ / (2‖J‖)) the *pooled*
value factor · √(Σ numerator / Σ denominator) beside its per-sample median.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from conservcheck import diagnostics, rng

ID_COLUMNS = ("field", "diagnostic", "variant", "time_key", "time_index", "t", "sigma", "sample")
STAT_COLUMNS = ("n", "median", "q25", "q75", "mean", "ci_low", "ci_high", "pooled")
SUMMARY_COLUMNS = (
    "field",
    "diagnostic",
    "variant",
    "time_key",
    "time_index",
    "t",
    "sigma",
    "guidance",
    "metric",
    "status",
    *STAT_COLUMNS,
)
BOOTSTRAP_RESAMPLES = 1000


def time_label(time: dict[str, Any], time_name: str = "t") -> str:
    """``k=500`` for a discrete index, else ``t=0.25`` (``σ=0.5`` when canonical time is σ)."""
    if time.get("index") is not None:
        return f"k={time['index']}"
    return f"{'σ' if time_name == 'sigma' else 't'}={time['t']:.4g}"


def guidance_label(w: Any) -> str:
    """``, w=7.5`` for a guided unit, empty for an unguided one (unconditional model or control)."""
    return "" if w is None or (isinstance(w, float) and np.isnan(w)) else f", w={float(w):g}"


def rows_from_units(units: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """The tidy per-sample table of unit records (one row per loop / probe point)."""
    frames = []
    guided = any(u.get("guidance") is not None for u in units)
    for u in units:
        if not u.get("values"):
            continue
        vals = {
            k: np.asarray([np.nan if v is None else v for v in col], dtype=np.float64) for k, col in u["values"].items()
        }
        n = len(next(iter(vals.values())))
        t = u["time"]
        ids = {
            "field": [u["field"]] * n,
            "diagnostic": [u["diagnostic"]] * n,
            "variant": [u["variant"]] * n,
            "time_key": [t["key"]] * n,
            "time_index": [t["index"]] * n,
            "t": [t["t"]] * n,
            "sigma": [t["sigma"]] * n,
            "sample": list(range(n)),
        }
        if guided:
            ids["guidance"] = [np.nan if u.get("guidance") is None else float(u["guidance"])] * n
        frames.append(pd.DataFrame({**ids, **vals}))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in ID_COLUMNS})
    rows = pd.concat(frames, ignore_index=True, sort=False)
    rows["time_index"] = rows["time_index"].astype("Int64")
    rows["sample"] = rows["sample"].astype("int64")
    return rows


def _stats(values: np.ndarray, draws: np.ndarray) -> dict[str, float]:
    """Median, quartiles, mean and the bootstrap 95% CI of the mean (percentile method)."""
    means = values[draws].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    q25, med, q75 = np.quantile(values, [0.25, 0.5, 0.75])
    return {
        "n": int(values.size),
        "median": float(med),
        "q25": float(q25),
        "q75": float(q75),
        "mean": float(values.mean()),
        "ci_low": float(lo),
        "ci_high": float(hi),
    }


def _pooled(unit: dict[str, Any], metric: str) -> float | None:
    """factor · √(Σ numerator / Σ denominator) over the unit's samples for a pooled metric, else None."""
    spec = diagnostics.pooled_metric(unit["diagnostic"], metric)
    if spec is None or spec[0] not in unit["values"] or spec[1] not in unit["values"]:
        return None
    num = float(np.sum(np.asarray(unit["values"][spec[0]], dtype=np.float64)))
    den = float(np.sum(np.asarray(unit["values"][spec[1]], dtype=np.float64)))
    return 0.0 if num == 0 and den == 0 else spec[2] * float(np.sqrt(num / den))


def summarize(units: list[dict[str, Any]], seed: int) -> pd.DataFrame:
    """Per (field, diagnostic, variant, time point, guidance scale, metric) statistics of the unit records.

    The bootstrap resamples of a unit come from the stream (seed, "bootstrap", field, diagnostic,
    variant, time key) — the same resamples of the same samples at every guidance scale — so summaries are
    reproducible. Units that did not finish cleanly (status
    ``nonfinite``, ``error``, ``skipped``) get rows with empty statistics: no number is computed from NaNs.
    ``pooled`` is empty for metrics without a pooled form.
    """
    known: dict[tuple[str, str], list[str | None]] = {}
    for u in units:
        if u.get("values"):
            known.setdefault((u["diagnostic"], u["variant"]), list(u["values"]))
    out: list[dict[str, Any]] = []
    for u in units:
        t = u["time"]
        ids = {
            "field": u["field"],
            "diagnostic": u["diagnostic"],
            "variant": u["variant"],
            "time_key": t["key"],
            "time_index": t["index"],
            "t": t["t"],
            "sigma": t["sigma"],
            "guidance": u.get("guidance"),
        }
        metrics = list(u.get("values") or known.get((u["diagnostic"], u["variant"]), [None]))
        if u["status"] != "ok":
            out += [{**ids, "metric": m, "status": u["status"], **dict.fromkeys(STAT_COLUMNS)} for m in metrics]
            continue
        n = len(next(iter(u["values"].values())))
        gen = np.random.default_rng(
            rng.derive_seed(seed, "bootstrap", u["field"], u["diagnostic"], u["variant"], t["key"])
        )
        draws = gen.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))
        for m in metrics:
            vals = np.asarray(u["values"][m], dtype=np.float64)
            out.append({**ids, "metric": m, "status": "ok", **_stats(vals, draws), "pooled": _pooled(u, m)})
    frame = pd.DataFrame(out, columns=list(SUMMARY_COLUMNS))
    for col in ("time_index", "n"):
        frame[col] = frame[col].astype("Int64")
    frame["guidance"] = pd.to_numeric(frame["guidance"], errors="coerce")
    return frame
