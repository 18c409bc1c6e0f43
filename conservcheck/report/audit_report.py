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
then agrees within :data:`~conservcheck.report.reproducibility.TOLERANCE` of the forward precision.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from conservcheck import diagnostics
from conservcheck.errors import UsageError
from conservcheck.files import json_safe, write_atomic
from conservcheck.report.schema import SCHEMA_VERSION
from conservcheck.report.summary import STAT_COLUMNS, SUMMARY_COLUMNS, rows_from_units, summarize, time_label
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
    ) -> AuditReport:
        """Build rows, summary and verdict from unit records (each with its ``values``)."""
        header = json_safe(header)
        problems = list(header.get("problems", []))
        problems += [
            f"{u['diagnostic']}.{u['variant']} ({u['field']}) at "
            f"{time_label(u['time'], header['process']['time'])}: {u['message']}"
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
    def from_dict(cls, data: dict[str, Any], base: Path | None = None) -> AuditReport:
        version = str(data.get("schema_version", ""))
        if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
            raise UsageError(
                f"report schema version {version or 'missing'} is not readable by this conservcheck "
                f"(schema {SCHEMA_VERSION})",
                "re-run the audit with this version",
            )
        rows_field = data["rows"]
        if "file" in rows_field:
            side = (base or Path(".")) / rows_field["file"]
            try:
                rows = pd.read_csv(side)
            except FileNotFoundError:
                raise UsageError(
                    f"the report's rows file {side} is missing", "keep it beside the JSON report"
                ) from None
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
    def from_json(cls, path: str | Path) -> AuditReport:
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
    merged = merged.sort_values(["diagnostic", "variant", "metric", "t"], kind="stable").reset_index(drop=True)
    return merged[keys + ["time_index", "t", "median_a", "median_b", "ratio"]]


__all__ = ["AuditReport", "ROWS_INLINE_MAX", "compare"]
