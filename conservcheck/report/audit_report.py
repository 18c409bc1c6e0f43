"""`AuditReport`: the per-sample results of an audit, their summary, the verdict, and the JSON file.

An audit runs *units*: one diagnostic variant (``loop``/``rotation``, ``curl``/``hutchinson``, ...) at
one time point on one *field* — ``model`` (the audited probe) or ``control`` (an exactly conservative
Gaussian score evaluated on the same loops, which measures the audit's numerical floor). Each unit
gives one value per sample in named columns; :attr:`AuditReport.rows` holds them all as a tidy table,
:meth:`AuditReport.summary` their statistics (:mod:`conservcheck.report.summary`), and
:attr:`AuditReport.verdict` the verdict (:mod:`conservcheck.report.verdict`).

Reproducibility (:mod:`conservcheck.report.reproducibility`): two audits with the same options and seed,
run with the same batch size and memory budget on the same kind of device, library versions and thread
count, give identical JSON except the ``run`` object (start and end time, wall time, units reused from a
partial-results file, its path, and the options that only change how the audit runs: batch size, cache
folder, resume file, budgets, shard). Another batch size, memory budget, shard split or thread count
draws the same random inputs but may sum the model's products in another order: every headline metric
then agrees within :data:`~conservcheck.report.reproducibility.TOLERANCE` of the forward
precision. The batch size is part of an audit's fingerprint, so a resumed or merged audit keeps the one it
started with.

Reading a report back (:meth:`AuditReport.from_json`) checks it as the tool's own file: a regular file of
bounded size, the structure the code reads (a malformed one is one :class:`UsageError`, never a
``KeyError``), and a rows side file whose SHA-256 is the one the report records.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeGuard

import pandas as pd

from conservcheck import diagnostics
from conservcheck.errors import UsageError, reason
from conservcheck.files import MAX_READ_BYTES, input_file, json_safe, read_input, write_atomic
from conservcheck.report.schema import SCHEMA_VERSION
from conservcheck.report.summary import (
    STAT_COLUMNS,
    SUMMARY_COLUMNS,
    guidance_label,
    rows_from_units,
    summarize,
    time_label,
)
from conservcheck.report.verdict import Verdict, decide_verdict

ROWS_INLINE_MAX = 100_000


class AuditReport:
    """The result of :func:`conservcheck.runner.audit.audit`.

    Attributes:
        header: provenance and settings — model, process and time convention, time points, options,
            data source, environment, Jacobian strategy, problems, completeness (JSON fields of the same
            names; see docs/report.md).
        units: one record per unit (field, diagnostic, variant, time point, status, message, meta).
        rows: tidy per-sample DataFrame: ``field, diagnostic, variant, time_key, time_index, t, sigma,
            sample``, ``guidance`` (a conditional model's guidance scale w; NaN for the control) and one
            column per value (NaN where a column does not apply).
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
        #: The default partial-results file of the audit, kept until the report is written (None when
        #: removed, or when the audit had a ``resume`` file).
        self.default_partial_results: Path | None = None

    @classmethod
    def from_units(
        cls, header: dict[str, Any], units: list[dict[str, Any]], run: dict[str, Any] | None = None
    ) -> AuditReport:
        """Build rows, summary and verdict from unit records (each with its ``values``)."""
        header = json_safe(header)
        problems = list(header.get("problems", []))
        problems += [
            f"{u['diagnostic']}.{u['variant']} ({u['field']}) at "
            f"{time_label(u['time'], header['process']['time'])}{guidance_label(u.get('guidance'))}: {u['message']}"
            for u in units
            if u["status"] in ("nonfinite", "error")
        ]
        header["problems"] = problems
        verdict = decide_verdict(
            units,
            problems,
            header["model"].get("precision", "fp32"),
            header["process"]["time"],
            bool(header.get("complete", True)),
        )
        slim = [
            {
                "field": u["field"],
                "diagnostic": u["diagnostic"],
                "variant": u["variant"],
                "time_key": u["time"]["key"],
                "guidance": u.get("guidance"),
                "status": u["status"],
                "message": u.get("message"),
                "n": len(next(iter(u["values"].values()))) if u.get("values") else 0,
                "meta": json_safe(u.get("meta", {})),
            }
            for u in units
        ]
        return cls(header, slim, rows_from_units(units), summarize(units, int(header["options"]["seed"])), verdict, run)

    # ---------------------------------------------------------------------------------------- views

    def summary(self, field: str | None = "model") -> pd.DataFrame:
        """Statistics per (diagnostic, variant, time point, guidance scale, metric): n, median, q25, q75,
        mean, and the seeded bootstrap 95% CI of the mean (ci_low, ci_high); ``field=None`` includes the
        control."""
        s = self._summary
        return s.reset_index(drop=True) if field is None else s[s["field"] == field].reset_index(drop=True)

    @property
    def status(self) -> str:
        return self.verdict.status

    def time_label(self, time_key: str, guidance: Any = None) -> str:
        """``k=500`` or ``t=0.25`` for a time key; with a guidance scale, ``k=500, w=7.5``."""
        for t in self.header["time_points"]:
            if t["key"] == time_key:
                return time_label(t, self.header["process"]["time"]) + guidance_label(guidance)
        return time_key + guidance_label(guidance)

    @property
    def guidance_scales(self) -> list[float]:
        """The guidance scales w of a conditional model's audit (empty for an unconditional model)."""
        return list(self.header.get("model", {}).get("conditioning", {}).get("guidance_scales") or [])

    # ----------------------------------------------------------------------------------------- JSON

    def to_dict(self, rows: dict[str, Any] | None = None) -> dict[str, Any]:
        """The report as a JSON-ready dict (schema: conservcheck/schema/report.schema.json)."""
        if rows is None:
            rows = {"columns": list(self.rows.columns), "data": json_safe(self.rows.astype(object).values.tolist())}
        out = {
            "schema_version": SCHEMA_VERSION,
            **self.header,
            "verdict": self.verdict.to_dict(),
            "units": self.units,
            "summary": json_safe(self._summary.astype(object).to_dict(orient="records")),
            "rows": rows,
            "run": json_safe(self.run),
        }
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
    def from_dict(cls, data: dict[str, Any], base: Path | None = None, source: str = "the report") -> AuditReport:
        """A report from its JSON form; ``base`` is the folder of a rows side file. Raises
        :class:`UsageError` for a structure this version cannot read (``source`` names the file)."""
        if not isinstance(data, dict):
            raise UsageError(f"{source} is not a conservcheck report", "pass a file written with --json")
        version = str(data.get("schema_version", ""))
        if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
            raise UsageError(
                f"report schema version {version or 'missing'} is not readable by this conservcheck "
                f"(schema {SCHEMA_VERSION})",
                "re-run the audit with this version",
            )
        why = _malformed(data)
        if why:
            raise UsageError(
                f"{source} is not a valid conservcheck report ({why})", "pass a report written with --json, unedited"
            )
        rows_field = data["rows"]
        if "file" in rows_field:
            rows = _side_rows(rows_field, base or Path("."))
        else:
            rows = pd.DataFrame(rows_field["data"], columns=rows_field["columns"])
        for c in rows.columns:
            if c not in ("field", "diagnostic", "variant", "time_key"):
                rows[c] = pd.to_numeric(rows[c], errors="coerce")
        if "time_index" in rows:
            rows["time_index"] = rows["time_index"].astype("Int64")
        summary = pd.DataFrame(data["summary"], columns=list(SUMMARY_COLUMNS))
        for c in ("t", "sigma", "guidance", *STAT_COLUMNS):
            summary[c] = pd.to_numeric(summary[c], errors="coerce")
        for c in ("time_index", "n"):
            summary[c] = summary[c].astype("Int64")
        skip = {"schema_version", "verdict", "units", "summary", "rows", "run"}
        header = {k: v for k, v in data.items() if k not in skip}
        return cls(header, data["units"], rows, summary, Verdict.from_dict(data["verdict"]), data.get("run"))

    @classmethod
    def from_json(cls, path: str | Path) -> AuditReport:
        """Read a report written by :meth:`to_json` (checked: module doc)."""
        path = Path(path)
        raw = read_input(path, "report file", "pass the path of a JSON report written with --json")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise UsageError(f"{path} is not a JSON report ({err})", "pass a file written with --json") from None
        if not isinstance(data, dict) or "summary" not in data or "verdict" not in data:
            raise UsageError(f"{path} is not a conservcheck report", "pass a file written with --json")
        return cls.from_dict(data, path.parent, str(path))


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _malformed(data: dict[str, Any]) -> str | None:
    """What in a report's JSON this version cannot read, or None (the fields the tool uses, their types)."""

    def objects(value: Any, keys: Iterable[str]) -> TypeGuard[list[dict[str, Any]]]:
        return isinstance(value, list) and all(isinstance(v, dict) and all(k in v for k in keys) for v in value)

    verdict = data.get("verdict")
    if not isinstance(verdict, dict) or verdict.get("status") not in ("pass", "violation", "invalid"):
        return "its verdict has no status pass, violation or invalid"
    if not isinstance(verdict.get("reason"), str) or not objects(verdict.get("checks", []), ()):
        return "its verdict has no reason or its checks are not a list of objects"
    if not isinstance(verdict.get("rule", {}), dict):
        return "its verdict's rule is not an object"
    if not isinstance(data.get("process"), dict) or not isinstance(data["process"].get("time"), str):
        return "it has no process"
    if not isinstance(data.get("model"), dict) or not isinstance(data.get("options"), dict):
        return "it has no model or options"
    points = data.get("time_points")
    if not objects(points, ("key", "t", "index")) or not all(
        isinstance(p["t"], (int, float)) and (p["index"] is None or isinstance(p["index"], int)) for p in points
    ):
        return "its time points are not a list of objects with a key, a time t and an index"
    if not objects(data.get("units"), ("field", "diagnostic", "variant", "time_key", "status")):
        return "its units are not a list of unit objects"
    required = [c for c in SUMMARY_COLUMNS if c != "pooled"]  # reports of schema 1.1 have no pooled values
    if not objects(data.get("summary"), required):
        return "its summary is not a list of rows with " + ", ".join(required)
    if not isinstance(data.get("run", {}), dict):
        return "its run is not an object"
    rows = data.get("rows")
    if not isinstance(rows, dict):
        return "it has no rows"
    if "file" in rows:
        name = rows.get("file")
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            return "its rows file is not a file name beside the report"
        if not isinstance(rows.get("sha256"), str) or not _SHA256.match(rows["sha256"]):
            return "its rows file has no SHA-256"
        if not isinstance(rows.get("n_rows"), int):
            return "its rows file has no row count"
        return None
    columns, table = rows.get("columns"), rows.get("data")
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns) or not isinstance(table, list):
        return "its rows have no columns and data"
    if not all(isinstance(r, list) and len(r) == len(columns) for r in table):
        return "a row does not have one value per column"
    return None


def _side_rows(field: dict[str, Any], base: Path) -> pd.DataFrame:
    """The rows side file of a report, checked against the SHA-256 and row count the report records."""
    side = base / field["file"]
    hint = "keep the rows file the audit wrote beside its report, or write the report again"
    if not side.exists():
        raise UsageError(f"the report's rows file {side} is missing", "keep it beside the JSON report")
    input_file(side, "rows file", hint, MAX_READ_BYTES)
    data = read_input(side, "rows file", hint, MAX_READ_BYTES)
    if hashlib.sha256(data).hexdigest() != field["sha256"]:
        raise UsageError(
            f"the report's rows file {side} does not have the SHA-256 the report records: it was changed, "
            "or belongs to another report",
            hint,
        )
    try:
        rows = pd.read_csv(io.BytesIO(data))
    except Exception as err:  # pandas raises several types for text that is not CSV
        raise UsageError(f"cannot read the report's rows file {side}: {reason(err)}", hint) from None
    if len(rows) != field["n_rows"]:
        raise UsageError(f"the report's rows file {side} has {len(rows)} rows, the report says {field['n_rows']}", hint)
    return rows


def compare(a: AuditReport, b: AuditReport, metrics: Iterable[str] | None = None) -> pd.DataFrame:
    """Model medians of two reports side by side, per (diagnostic, variant, time point, guidance scale,
    metric).

    ``metrics`` defaults to each diagnostic's headline metric; rows present in only one report have an
    empty side. ``ratio`` is median_b / median_a.
    """
    keys = ["diagnostic", "variant", "time_key", "guidance", "metric"]

    def pick(r: AuditReport) -> pd.DataFrame:
        s = r.summary()
        if metrics is None:
            keep = [
                diagnostics.headline_metric(d, v) == m for d, v, m in zip(s["diagnostic"], s["variant"], s["metric"])
            ]
        else:
            keep = s["metric"].isin(list(metrics)).tolist()
        return s[keep][keys + ["time_index", "t", "median"]]

    merged = pd.merge(pick(a), pick(b), on=keys, how="outer", suffixes=("_a", "_b"), sort=False)
    merged["time_index"] = merged["time_index_a"].fillna(merged["time_index_b"]).astype("Int64")
    merged["t"] = merged["t_a"].fillna(merged["t_b"])
    merged["ratio"] = merged["median_b"] / merged["median_a"]
    merged = merged.sort_values(["diagnostic", "variant", "metric", "guidance", "t"], kind="stable").reset_index(
        drop=True
    )
    return merged[keys + ["time_index", "t", "median_a", "median_b", "ratio"]]


__all__ = ["AuditReport", "ROWS_INLINE_MAX", "compare"]
