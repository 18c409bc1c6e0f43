"""What a report shows a reader, as plain tables of strings: the Markdown summary and the HTML page use them.

* :func:`provenance` — the model and how it was audited (reference, weights, units, settings, versions);
* :func:`diagnostic_tables` — one table per diagnostic variant, rows the time points, columns the
  statistics of its table metrics and, for a headline metric, the verdict's floor and check (the console
  tables' content, every column);
* :func:`headline_table` — the headline medians, one row per variant and one column per time point;
* :func:`comparison_tables` — the ratios of medians against a baseline, one table per metric.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from conservcheck import diagnostics
from conservcheck.report.audit_report import AuditReport
from conservcheck.report.baseline import Comparison


@dataclass
class TextTable:
    """A titled table of strings; ``flags[i][j]`` marks cell (i, j) as a failed check (shown highlighted)."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    flags: list[list[bool]]


def fmt(v: Any) -> str:
    """Three significant digits; ``—`` for a missing value."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    try:
        import pandas as pd

        if pd.isna(v):
            return "—"
    except (TypeError, ValueError):
        pass
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _convention(header: dict[str, Any]) -> str:
    conv = dict(header.get("time_convention") or {})
    name = conv.pop("name", "—")
    return f"{name} ({', '.join(f'{k} {v}' for k, v in conv.items())})" if conv else str(name)


def provenance(report: AuditReport) -> list[tuple[str, str]]:
    """(label, value) pairs: what was audited, in which units, with which settings, on what, when."""
    h = report.header
    m, opts, src, env = h.get("model", {}), h.get("options", {}), h.get("data_source", {}), h.get("environment", {})
    out = [
        ("model", str(m.get("reference") or m.get("name") or "—")),
        ("adapter", str(m.get("adapter") or "—")),
        ("weights SHA-256", str(m.get("weights_sha256") or "—")),
        ("output", f"{m.get('parameterization', '—')} → score ({m.get('conversion', 'score')})"),
        ("process", f"{h.get('process', {}).get('name', '—')}, time convention {_convention(h)}"),
        ("precision", f"{m.get('precision', '—')} on {env.get('device', '—')} ({env.get('device_name', '—')})"),
    ]
    if src.get("kind") == "model":
        data = f"{src.get('n')} samples drawn from the model ({src.get('sampler')}, {src.get('steps')} steps)"
    else:
        data = f"{src.get('n')} samples from {src.get('path', src.get('kind', '—'))}"
    out.append(("x0", data + (f", SHA-256 {src['sha256']}" if src.get("sha256") else "")))
    settings = ", ".join(
        f"{k} {','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
        for k, v in opts.items()
        if v is not None and v is not False and k not in ("device", "precision", "data", "revision", "cpu_scaled")
    )
    if opts.get("cpu_scaled"):
        settings += " (CPU-scaled defaults)"
    out.append(("settings", settings))
    out.append(("time points", ", ".join(report.time_label(t["key"]) for t in h.get("time_points", []))))
    versions = ", ".join(f"{k} {env[k]}" for k in ("conservcheck", "torch", "python", "cuda") if env.get(k))
    out.append(("software", versions))
    run = report.run or {}
    if run.get("started_at"):
        out.append(("run", f"started {run['started_at']}, {run.get('wall_time_s', '—')} s"))
    out.append(("complete", "yes" if h.get("complete", True) else "no (units were skipped)"))
    return [(k, v) for k, v in out if v]


def diagnostic_tables(report: AuditReport) -> list[TextTable]:
    """One table per (diagnostic, variant): rows are time points (module doc)."""
    summary = report.summary()
    checks = {(c["diagnostic"], c["variant"], c["time_key"]): c for c in report.verdict.checks}
    out: list[TextTable] = []
    for diag, variant in summary[["diagnostic", "variant"]].drop_duplicates().itertuples(index=False):
        spec = diagnostics.registered().get(diag)
        main, extra = spec.table_metrics(variant) if spec is not None else (None, None)
        rows = summary[(summary["diagnostic"] == diag) & (summary["variant"] == variant)]
        if main not in set(rows["metric"]):
            main = next(iter(rows["metric"].dropna()), None)
        if main is None:
            continue
        graded = spec is not None and spec.headline_metric(variant) == main
        columns = ["time", "σ", "median", "q25 – q75", "mean", "95% CI of mean", "n"]
        if extra:
            columns.append(f"{extra} median")
        if graded:
            columns += ["floor", "median / floor", "check"]
        body: list[list[str]] = []
        flags: list[list[bool]] = []
        for _, r in rows[rows["metric"] == main].iterrows():
            c = checks.get((diag, variant, r["time_key"]), {})
            cells = [
                report.time_label(r["time_key"]),
                fmt(float(r["sigma"])),
                fmt(r["median"]),
                f"{fmt(r['q25'])} – {fmt(r['q75'])}",
                fmt(r["mean"]),
                f"{fmt(r['ci_low'])} – {fmt(r['ci_high'])}",
                fmt(r["n"] if r["status"] == "ok" else None),
            ]
            if extra:
                e = rows[(rows["metric"] == extra) & (rows["time_key"] == r["time_key"])]["median"]
                cells.append(fmt(float(e.iloc[0])) if len(e) else "—")
            if graded:
                cells += [fmt(c.get("floor")), fmt(c.get("ratio")), str(c.get("status", r["status"]))]
            bad = graded and c.get("status") in ("violation", "invalid")
            body.append(cells)
            flags.append([bad and name in ("median", "check") for name in columns])
        out.append(TextTable(f"{diag} · {variant} — {main}", columns, body, flags))
    return out


def headline_table(report: AuditReport) -> TextTable:
    """The verdict's checks: one row per (diagnostic, variant, headline metric), one column per time point;
    each cell the model's median, flagged when the check is a violation (or invalid)."""
    keys = [t["key"] for t in report.header.get("time_points", [])]
    series: dict[str, dict[str, dict[str, Any]]] = {}
    for c in report.verdict.checks:
        series.setdefault(f"{c['diagnostic']}.{c['variant']} {c['metric']}", {})[c["time_key"]] = c
    rows, flags = [], []
    for name, by_time in series.items():
        rows.append([name] + [fmt(by_time.get(k, {}).get("median")) for k in keys])
        flags.append([False] + [by_time.get(k, {}).get("status") in ("violation", "invalid") for k in keys])
    return TextTable(
        "median of each headline metric (flagged: above 10× the numerical floor)",
        ["metric"] + [report.time_label(k) for k in keys],
        rows,
        flags,
    )


def comparison_tables(report: AuditReport, comparisons: Sequence[Comparison]) -> list[TextTable]:
    """Against the baseline, one table per metric: rows the time points; the medians, their ratio and its
    95% bootstrap interval, the ratio flagged when the whole interval lies above 1 (worse beyond noise)."""
    series: dict[str, list[Comparison]] = {}
    for c in comparisons:
        series.setdefault(c.metric, []).append(c)
    out = []
    for name, rows in series.items():
        body, flags = [], []
        for c in rows:
            interval = f"{fmt(c.low)} – {fmt(c.high)}" if c.status == "ok" else f"no value ({c.status})"
            body.append(
                [report.time_label(c.time_key), fmt(c.median_baseline), fmt(c.median_new), fmt(c.ratio), interval]
            )
            worse = c.status != "ok" or c.low > 1.0
            flags.append([False, False, False, worse, worse])
        columns = ["time", "baseline median", "median", "ratio", "95% interval of the ratio"]
        out.append(TextTable(f"{name}: median against the baseline's", columns, body, flags))
    return out


__all__ = ["TextTable", "comparison_tables", "diagnostic_tables", "fmt", "headline_table", "provenance"]
