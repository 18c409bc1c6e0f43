"""`AuditReport`: the per-sample results of an audit, their summary, the verdict, and the JSON file.

An audit runs *units*: one diagnostic variant (``loop``/``rotation``, ``curl``/``hutchinson``, ...) at
one time point on one *field* — ``model`` (the audited probe) or ``control`` (an exactly conservative
Gaussian score evaluated on the same loops, which measures the audit's numerical floor). Each unit
gives one value per sample in named columns; :attr:`AuditReport.rows` holds them all as a tidy table.

Verdict rule (:func:`decide_verdict`)
------------------------------------
For every (diagnostic, variant, time point) with a *headline* metric (:data:`HEADLINE`: scale-free
numbers in [0, 1]) the model's median is compared with the numerical floor

    floor = max(control median, quadrature floor, precision floor)

where the control median is the same metric on the conservative control field, the quadrature floor
(loops only) is the median of the model's own nested-rule error estimate relative to ∮|s||dy|, and the
precision floor is the smallest resolvable relative value of the forward precision
(:data:`conservcheck.diagnostics.loops.FLOOR_REL`). The check is a *violation* when the median exceeds
:data:`FLOOR_FACTOR` × floor. The verdict is

* ``invalid`` when the model broke its contract (NaN/Inf, wrong shape, ignored time input,
  non-determinism, batch dependence) or any unit failed — no number computed from NaNs is used;
* ``violation`` when any check is a violation (an incomplete audit says what it left unmeasured);
* ``invalid`` when units were skipped (time budget, or a shard's partial report) and no measured check
  is a violation — an incomplete audit never passes; the reason names the unmeasured diagnostics;
* ``pass`` otherwise.

Reproducibility: two audits with the same options and seed give identical JSON except the ``run``
object (start and end time, wall time, units reused from a partial-results file, its path, and the
options that only change how the audit runs: batch size, cache folder, resume file, budgets, shard).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from . import rng
from .diagnostics.loops import FLOOR_REL
from .errors import UsageError

SCHEMA_VERSION = "1.0"
ID_COLUMNS = ("field", "diagnostic", "variant", "time_key", "time_index", "t", "sigma", "sample")
STAT_COLUMNS = ("n", "median", "q25", "q75", "mean", "ci_low", "ci_high")
SUMMARY_COLUMNS = ("field", "diagnostic", "variant", "time_key", "time_index", "t", "sigma", "metric", "status",
                   *STAT_COLUMNS)
BOOTSTRAP_RESAMPLES = 1000
ROWS_INLINE_MAX = 100_000
FLOOR_FACTOR = 10.0
#: Scale-free metric each verdict check compares with the floor, per diagnostic (or diagnostic/variant).
HEADLINE: dict[str, str] = {
    "loop": "abs_circulation_ratio",
    "curl/subjacobian": "curl_rel_fro",
    "curl/hutchinson": "rel_asym",
}


def headline_metric(diagnostic: str, variant: str) -> str | None:
    """The verdict metric of a diagnostic variant, or None when it takes no part in the verdict."""
    return HEADLINE.get(f"{diagnostic}/{variant}", HEADLINE.get(diagnostic))


def time_label(time: dict[str, Any], time_name: str = "t") -> str:
    """``k=500`` for a discrete index, else ``t=0.25`` (``σ=0.5`` when canonical time is σ)."""
    if time.get("index") is not None:
        return f"k={time['index']}"
    return f"{'σ' if time_name == 'sigma' else 't'}={time['t']:.4g}"


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_safe(value: Any) -> Any:
    """JSON-safe copy: NaN/Inf → None, numpy scalars → Python, tuples → lists."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    if value is pd.NA:
        return None
    return value


# ----------------------------------------------------------------------------------------------- rows


def rows_from_units(units: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """The tidy per-sample table of unit records (one row per loop / probe point)."""
    frames = []
    for u in units:
        if not u.get("values"):
            continue
        vals = {k: np.asarray([np.nan if v is None else v for v in col], dtype=np.float64)
                for k, col in u["values"].items()}
        n = len(next(iter(vals.values())))
        t = u["time"]
        ids = {
            "field": [u["field"]] * n, "diagnostic": [u["diagnostic"]] * n, "variant": [u["variant"]] * n,
            "time_key": [t["key"]] * n, "time_index": [t["index"]] * n, "t": [t["t"]] * n,
            "sigma": [t["sigma"]] * n, "sample": list(range(n)),
        }
        frames.append(pd.DataFrame({**ids, **vals}))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in ID_COLUMNS})
    rows = pd.concat(frames, ignore_index=True, sort=False)
    rows["time_index"] = rows["time_index"].astype("Int64")
    rows["sample"] = rows["sample"].astype("int64")
    return rows


def value_columns(rows: pd.DataFrame) -> list[str]:
    return [c for c in rows.columns if c not in ID_COLUMNS]


# -------------------------------------------------------------------------------------------- summary


def _stats(values: np.ndarray, draws: np.ndarray) -> dict[str, float]:
    """Median, quartiles, mean and the bootstrap 95% CI of the mean (percentile method)."""
    means = values[draws].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    q25, med, q75 = np.quantile(values, [0.25, 0.5, 0.75])
    return {"n": int(values.size), "median": float(med), "q25": float(q25), "q75": float(q75),
            "mean": float(values.mean()), "ci_low": float(lo), "ci_high": float(hi)}


def summarize(units: list[dict[str, Any]], seed: int) -> pd.DataFrame:
    """Per (field, diagnostic, variant, time point, metric) statistics of the unit records.

    The bootstrap resamples of a unit come from the stream (seed, "bootstrap", field, diagnostic,
    variant, time key), so summaries are reproducible. Units that did not finish cleanly (status
    ``nonfinite``, ``error``, ``skipped``) get rows with empty statistics: no number is computed from NaNs.
    """
    known: dict[tuple[str, str], list[str]] = {}
    for u in units:
        if u.get("values"):
            known.setdefault((u["diagnostic"], u["variant"]), list(u["values"]))
    out: list[dict[str, Any]] = []
    for u in units:
        t = u["time"]
        ids = {"field": u["field"], "diagnostic": u["diagnostic"], "variant": u["variant"], "time_key": t["key"],
               "time_index": t["index"], "t": t["t"], "sigma": t["sigma"]}
        metrics = list(u.get("values") or known.get((u["diagnostic"], u["variant"]), [None]))
        if u["status"] != "ok":
            out += [{**ids, "metric": m, "status": u["status"], **dict.fromkeys(STAT_COLUMNS)} for m in metrics]
            continue
        n = len(next(iter(u["values"].values())))
        gen = np.random.default_rng(rng.derive_seed(seed, "bootstrap", u["field"], u["diagnostic"], u["variant"], t["key"]))
        draws = gen.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))
        for m in metrics:
            vals = np.asarray(u["values"][m], dtype=np.float64)
            out.append({**ids, "metric": m, "status": "ok", **_stats(vals, draws)})
    frame = pd.DataFrame(out, columns=list(SUMMARY_COLUMNS))
    for col in ("time_index", "n"):
        frame[col] = frame[col].astype("Int64")
    return frame


# -------------------------------------------------------------------------------------------- verdict


@dataclass
class Verdict:
    """``status`` is pass, violation or invalid; ``reason`` is one line; ``checks`` one dict per check."""

    status: str
    reason: str
    checks: list[dict[str, Any]] = field(default_factory=list)
    rule: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Verdict":
        return cls(data["status"], data["reason"], list(data.get("checks", [])), dict(data.get("rule", {})))


def _median(units: dict[tuple, dict[str, Any]], key: tuple, metric: str) -> float | None:
    u = units.get(key)
    if u is None or u["status"] != "ok" or metric not in u["values"]:
        return None
    return float(np.median(np.asarray(u["values"][metric], dtype=np.float64)))


def _quadrature_floor(unit: dict[str, Any]) -> float:
    v = unit["values"]
    if "quad_error" not in v or "abs_score_length" not in v:
        return 0.0
    err, scale = np.asarray(v["quad_error"], float), np.asarray(v["abs_score_length"], float)
    return float(np.median(np.divide(err, scale, out=np.zeros_like(err), where=scale > 0)))


def _unmeasured(units: list[dict[str, Any]], checks: list[dict[str, Any]], time_name: str) -> str:
    """``loop.rotation at t=1, t=2; stein.funnel at t=2``: the model diagnostics a skipped unit left
    unmeasured (the model unit itself, or the control unit its check needs)."""
    where: dict[str, list[str]] = {}
    seen: set[tuple[str, str, str]] = set()
    for item in [u for u in units if u["field"] == "model" and u["status"] == "skipped"] + [
            c for c in checks if c["status"] == "skipped"]:
        time = item.get("time") or {"index": item["time_index"], "t": item["t"]}
        key = (item["diagnostic"], item["variant"], item.get("time_key") or item["time"]["key"])
        if key not in seen:
            seen.add(key)
            where.setdefault(f"{key[0]}.{key[1]}", []).append(time_label(time, time_name))
    return "; ".join(f"{name} at {', '.join(labels)}" for name, labels in where.items())


def _incomplete(units: list[dict[str, Any]], checks: list[dict[str, Any]], time_name: str) -> str:
    """One clause saying how many units did not run, why, and which diagnostics that leaves unmeasured."""
    skipped = [u for u in units if u["status"] == "skipped"]
    why = "; ".join(dict.fromkeys(u.get("message") or "skipped" for u in skipped))
    text = f"incomplete: {len(skipped)} of {len(units)} units not run ({why})"
    unmeasured = _unmeasured(units, checks, time_name)
    return f"{text}, unmeasured: {unmeasured}" if unmeasured else text


def decide_verdict(
    units: list[dict[str, Any]], problems: list[str], precision: str, time_name: str = "t", complete: bool = True
) -> Verdict:
    """The verdict of an audit from its unit records (rule in the module docstring).

    A unit that did not run (status ``skipped``: time budget, or another shard's unit) leaves its check
    ``skipped``; an audit with skipped units (or ``complete=False``) is never ``pass``: without a
    violation among the measured checks it is ``invalid``, and every reason names what is unmeasured.
    """
    rule = {"factor": FLOOR_FACTOR, "headline": dict(HEADLINE), "precision_floor": FLOOR_REL.get(precision, 0.0)}
    by_key = {(u["field"], u["diagnostic"], u["variant"], u["time"]["key"]): u for u in units}
    checks: list[dict[str, Any]] = []
    for u in units:
        metric = headline_metric(u["diagnostic"], u["variant"])
        if u["field"] != "model" or metric is None:
            continue
        key = (u["diagnostic"], u["variant"], u["time"]["key"])
        check = {"diagnostic": u["diagnostic"], "variant": u["variant"], "time_key": u["time"]["key"],
                 "time_index": u["time"]["index"], "t": u["time"]["t"], "sigma": u["time"]["sigma"], "metric": metric}
        control_unit = by_key.get(("control", *key))
        if u["status"] == "skipped" or (control_unit is not None and control_unit["status"] == "skipped"):
            # Without its own values or its floor, the check cannot be judged either way.
            checks.append({**check, "status": "skipped", "median": None, "floor": None, "ratio": None})
            continue
        median = _median(by_key, ("model", *key), metric)
        if median is None:
            checks.append({**check, "status": "invalid", "median": None, "floor": None, "ratio": None})
            continue
        control = _median(by_key, ("control", *key), metric) or 0.0
        quad = _quadrature_floor(u)
        floor = max(control, quad, rule["precision_floor"])
        ratio = median / floor if floor > 0 else math.inf
        checks.append({**check, "status": "violation" if median > FLOOR_FACTOR * floor else "pass", "median": median,
                       "control": control, "quadrature": quad, "floor": floor, "ratio": ratio})
    measured = [c for c in checks if c["status"] != "skipped"]
    incomplete = not complete or any(u["status"] == "skipped" for u in units)
    clause = _incomplete(units, checks, time_name) if incomplete else ""
    suffix = f"; {clause}" if clause else ""
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return Verdict("invalid", f"{problems[0]}{more}{suffix}", checks, rule)
    if not measured:
        return Verdict("invalid", clause or "no diagnostic finished", checks, rule)

    def where(c: dict[str, Any]) -> str:
        return f"{c['diagnostic']}.{c['variant']} {c['metric']} at {time_label({'index': c['time_index'], 't': c['t']}, time_name)}"

    bad = [c for c in measured if c["status"] == "violation"]
    if bad:
        worst = max(bad, key=lambda c: c["ratio"])
        return Verdict(
            "violation",
            f"{where(worst)}: median {worst['median']:.3g} is {worst['ratio']:.3g}× the numerical floor "
            f"{worst['floor']:.2g} ({len(bad)} of {len(measured)} checks above {FLOOR_FACTOR:g}×){suffix}",
            checks, rule,
        )
    top = max(measured, key=lambda c: c["ratio"])
    largest = f"largest {top['ratio']:.2g}× for {where(top)}"
    if incomplete:
        # Unmeasured diagnostics could hold a violation: an incomplete audit never passes.
        return Verdict("invalid", f"{clause}; the {len(measured)} measured checks are within {FLOOR_FACTOR:g}× the "
                                  f"numerical floor ({largest})", checks, rule)
    return Verdict("pass", f"all {len(measured)} checks within {FLOOR_FACTOR:g}× the numerical floor ({largest})",
                   checks, rule)


# --------------------------------------------------------------------------------------------- report


class AuditReport:
    """The result of :func:`conservcheck.audit.audit`.

    Attributes:
        header: provenance and settings — model, process and time convention, time points, options,
            data source, environment, Jacobian strategy, problems, completeness (JSON fields of the same
            names; see docs/report.md).
        units: one record per unit (field, diagnostic, variant, time point, status, message, meta).
        rows: tidy per-sample DataFrame: ``field, diagnostic, variant, time_key, time_index, t, sigma,
            sample`` and one column per value (NaN where a column does not apply).
        verdict: :class:`Verdict`.
        run: timing and run-control fields (start and end time, wall time, units reused, the
            partial-results file, batch size, cache folder, budgets) — the only fields that may differ
            between two audits with the same settings.
    """

    def __init__(
        self,
        header: dict[str, Any],
        units: list[dict[str, Any]],
        rows: pd.DataFrame,
        summary: pd.DataFrame,
        verdict: Verdict,
        run: dict[str, Any] | None = None,
    ) -> None:
        self.header = header
        self.units = units
        self.rows = rows
        self._summary = summary
        self.verdict = verdict
        self.run = run or {}

    @classmethod
    def from_units(
        cls, header: dict[str, Any], units: list[dict[str, Any]], run: dict[str, Any] | None = None
    ) -> "AuditReport":
        """Build rows, summary and verdict from unit records (each with its ``values``)."""
        header = json_safe(header)
        problems = list(header.get("problems", []))
        problems += [f"{u['diagnostic']}.{u['variant']} ({u['field']}) at "
                     f"{time_label(u['time'], header['process']['time'])}: {u['message']}"
                     for u in units if u["status"] in ("nonfinite", "error")]
        header["problems"] = problems
        verdict = decide_verdict(units, problems, header["model"].get("precision", "fp32"),
                                 header["process"]["time"], bool(header.get("complete", True)))
        slim = [{"field": u["field"], "diagnostic": u["diagnostic"], "variant": u["variant"], "time_key": u["time"]["key"],
                 "status": u["status"], "message": u.get("message"),
                 "n": len(next(iter(u["values"].values()))) if u.get("values") else 0, "meta": json_safe(u.get("meta", {}))}
                for u in units]
        return cls(header, slim, rows_from_units(units), summarize(units, int(header["options"]["seed"])), verdict, run)

    # ---------------------------------------------------------------------------------------- views

    def summary(self, field: str | None = "model") -> pd.DataFrame:
        """Statistics per (diagnostic, variant, time point, metric): n, median, q25, q75, mean, and the
        seeded bootstrap 95% CI of the mean (ci_low, ci_high); ``field=None`` includes the control."""
        s = self._summary
        return s.reset_index(drop=True) if field is None else s[s["field"] == field].reset_index(drop=True)

    @property
    def status(self) -> str:
        return self.verdict.status

    def time_label(self, time_key: str) -> str:
        for t in self.header["time_points"]:
            if t["key"] == time_key:
                return time_label(t, self.header["process"]["time"])
        return time_key

    # ----------------------------------------------------------------------------------------- JSON

    def to_dict(self, rows: dict[str, Any] | None = None) -> dict[str, Any]:
        """The report as a JSON-ready dict (schema: conservcheck/schema/report.schema.json)."""
        if rows is None:
            rows = {"columns": list(self.rows.columns), "data": json_safe(self.rows.astype(object).values.tolist())}
        out = {"schema_version": SCHEMA_VERSION, **self.header, "verdict": self.verdict.to_dict(), "units": self.units,
               "summary": json_safe(self._summary.astype(object).to_dict(orient="records")), "rows": rows,
               "run": json_safe(self.run)}
        return out

    def to_json(self, path: str | Path = "-", inline_rows: bool | None = None) -> str:
        """Write the report as JSON to ``path`` (atomically) or to stdout for ``"-"``; returns the text.

        Per-sample rows are inline unless there are more than :data:`ROWS_INLINE_MAX` of them (or
        ``inline_rows=False``); then they go to a side file ``<name>.rows.csv`` beside the JSON, named
        with its SHA-256 in the ``rows`` field. Writing to stdout always inlines.
        """
        to_stdout = str(path) == "-"
        inline = to_stdout or (inline_rows if inline_rows is not None else len(self.rows) <= ROWS_INLINE_MAX)
        rows = None
        if not inline:
            side = Path(path).with_suffix(".rows.csv")
            csv = self.rows.to_csv(index=False, lineterminator="\n")
            write_atomic(side, csv)
            rows = {"file": side.name, "sha256": hashlib.sha256(csv.encode()).hexdigest(), "n_rows": len(self.rows)}
        text = json.dumps(self.to_dict(rows), indent=1, ensure_ascii=False, allow_nan=False) + "\n"
        if to_stdout:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            write_atomic(path, text)
        return text

    def to_csv(self, path: str | Path, table: str = "summary") -> None:
        """Write the ``summary`` (model and control) or the per-sample ``rows`` as CSV (``-``: stdout)."""
        if table not in ("summary", "rows"):
            raise UsageError(f"unknown table {table!r}", "use summary or rows")
        frame = self._summary if table == "summary" else self.rows
        text = frame.to_csv(index=False, lineterminator="\n")
        if str(path) == "-":
            sys.stdout.write(text)
        else:
            write_atomic(path, text)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path | None = None) -> "AuditReport":
        version = str(data.get("schema_version", ""))
        if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
            raise UsageError(
                f"report schema version {version or 'missing'} is not readable by this conservcheck (schema {SCHEMA_VERSION})",
                "re-run the audit with this version",
            )
        rows_field = data["rows"]
        if "file" in rows_field:
            side = (base or Path(".")) / rows_field["file"]
            try:
                rows = pd.read_csv(side)
            except FileNotFoundError:
                raise UsageError(f"the report's rows file {side} is missing", "keep it beside the JSON report") from None
        else:
            rows = pd.DataFrame(rows_field["data"], columns=rows_field["columns"])
        for c in rows.columns:
            if c not in ("field", "diagnostic", "variant", "time_key"):
                rows[c] = pd.to_numeric(rows[c], errors="coerce")
        if "time_index" in rows:
            rows["time_index"] = rows["time_index"].astype("Int64")
        summary = pd.DataFrame(data["summary"], columns=list(SUMMARY_COLUMNS))
        for c in ("t", "sigma", *STAT_COLUMNS):
            summary[c] = pd.to_numeric(summary[c], errors="coerce")
        for c in ("time_index", "n"):
            summary[c] = summary[c].astype("Int64")
        skip = {"schema_version", "verdict", "units", "summary", "rows", "run"}
        header = {k: v for k, v in data.items() if k not in skip}
        return cls(header, data["units"], rows, summary, Verdict.from_dict(data["verdict"]), data.get("run"))

    @classmethod
    def from_json(cls, path: str | Path) -> "AuditReport":
        """Read a report written by :meth:`to_json`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"no report file {path}", "pass the path of a JSON report written with --json") from None
        except (ValueError, UnicodeDecodeError) as err:
            raise UsageError(f"{path} is not a JSON report ({err})", "pass a file written with --json") from None
        except OSError as err:
            raise UsageError(f"cannot read {path}: {err.strerror or err}", "pass a JSON report file") from None
        if not isinstance(data, dict) or "summary" not in data or "verdict" not in data:
            raise UsageError(f"{path} is not a conservcheck report", "pass a file written with --json")
        return cls.from_dict(data, path.parent)


def compare(a: AuditReport, b: AuditReport, metrics: Iterable[str] | None = None) -> pd.DataFrame:
    """Model medians of two reports side by side, per (diagnostic, variant, time point, metric).

    ``metrics`` defaults to each diagnostic's headline metric; rows present in only one report have an
    empty side. ``ratio`` is median_b / median_a.
    """
    keys = ["diagnostic", "variant", "time_key", "metric"]

    def pick(r: AuditReport) -> pd.DataFrame:
        s = r.summary()
        if metrics is None:
            keep = [headline_metric(d, v) == m for d, v, m in zip(s["diagnostic"], s["variant"], s["metric"])]
        else:
            keep = s["metric"].isin(list(metrics)).tolist()
        return s[keep][keys + ["time_index", "t", "median"]]

    merged = pd.merge(pick(a), pick(b), on=keys, how="outer", suffixes=("_a", "_b"), sort=False)
    merged["time_index"] = merged["time_index_a"].fillna(merged["time_index_b"]).astype("Int64")
    merged["t"] = merged["t_a"].fillna(merged["t_b"])
    merged["ratio"] = merged["median_b"] / merged["median_a"]
    merged = merged.sort_values(["diagnostic", "variant", "metric", "t"], kind="stable").reset_index(drop=True)
    return merged[keys + ["time_index", "t", "median_a", "median_b", "ratio"]]


__all__ = [
    "AuditReport",
    "FLOOR_FACTOR",
    "HEADLINE",
    "SCHEMA_VERSION",
    "Verdict",
    "compare",
    "decide_verdict",
    "headline_metric",
    "json_safe",
    "rows_from_units",
    "summarize",
    "time_label",
    "write_atomic",
]
