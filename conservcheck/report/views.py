"""What a report shows a reader, as plain tables of strings: the console, the Markdown summary and the HTML
page render them.

* :func:`provenance` — the model and how it was audited (reference, weights, units, settings, versions);
* :func:`diagnostic_tables` — one table per diagnostic variant, rows the time points, columns the
  statistics of its table metrics and, for a headline metric, the verdict's floor and check (the console
  renders the same tables, with the columns its width allows);
* :func:`headline_table` — the headline medians, one row per variant and one column per time point;
* :func:`comparison_tables` — the ratios of medians against a baseline, one table per metric.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
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
    #: "left" or "right" per column (all right-aligned when None).
    align: list[str] | None = None


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


def _setting(value: Any) -> str:
    """An option's value as the provenance block shows it: ``a,b`` for a list, ``rotation 48, brownian 128``
    for a mapping."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


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
        f"{k} {_setting(v)}"
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


#: How a table names a check's status.
CHECK_TEXT = {"unresolved": "not resolved at this node count"}
#: How a table names a Jacobian method.
METHOD_TEXT = {"jvp": "forward-mode autodiff", "double_vjp": "reverse-mode autodiff", "fd": "finite differences"}
#: Below this many characters of width a diagnostic table leaves out the mean and its confidence interval …
WIDE = 140
#: … and below this many also the variant's second metric.
MEDIUM = 100


def guidance_value(value: Any) -> float | None:
    """A guidance scale as a float; None for none (NaN in a summary table)."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def diagnostic_tables(report: AuditReport, width: int | None = None) -> list[TextTable]:
    """One table per (diagnostic, variant), the console's, the Markdown summary's and the HTML page's.

    Rows are time points — for a conditional model each time point at each guidance scale, with a ``w``
    column — and columns the statistics of the variant's main metric (its table metrics come from the
    diagnostic registry, :meth:`conservcheck.diagnostics.Diagnostic.table_metrics`): ``median`` (``per-sample
    median`` beside ``pooled`` for a metric pooled over samples), ``q25 – q75``, ``mean`` and ``95% CI of
    mean``, ``n``, the second metric's median, and for the verdict's headline metric ``floor``, ``median /
    floor`` and ``check`` (a check only its own discretisation floor keeps from being a violation reads
    ``not resolved at this node count``). A table whose values came from a Jacobian names the method in
    its title (the floor is measured on the control by the same method).

    Args:
        report: the audit report.
        width: characters available (a terminal's width); below :data:`WIDE` the mean and its interval are
            left out, below :data:`MEDIUM` also the second metric, and ``median / floor`` only shows when
            the width is unlimited (None, the documents' tables).
    Returns:
        the tables; a row's ``median`` and ``check`` cells are flagged when its check is a violation or
        invalid.
    """
    summary = report.summary()
    checks = {
        (c["diagnostic"], c["variant"], c["time_key"], guidance_value(c.get("guidance"))): c
        for c in report.verdict.checks
    }
    guided = bool(summary["guidance"].notna().any())
    out: list[TextTable] = []
    for diag, variant in summary[["diagnostic", "variant"]].drop_duplicates().itertuples(index=False):
        spec = diagnostics.registered().get(diag)
        main, extra = spec.table_metrics(variant) if spec is not None else (None, None)
        rows = summary[(summary["diagnostic"] == diag) & (summary["variant"] == variant)]
        if main not in set(rows["metric"]):
            main = next(iter(rows["metric"].dropna()), None)
        if main is None:
            continue
        extra = extra if width is None or width >= MEDIUM else None
        graded = spec is not None and spec.headline_metric(variant) == main
        pooled = spec is not None and main in spec.pooled

        def extra_median(r: Any, c: dict[str, Any], metric: str) -> str:
            same_w = rows["guidance"].map(lambda g: guidance_value(g) == guidance_value(r["guidance"])).astype(bool)
            e = rows[(rows["metric"] == metric) & (rows["time_key"] == r["time_key"]) & same_w]["median"]
            return fmt(float(e.iloc[0])) if len(e) else "—"

        columns: list[tuple[str, Callable[[Any, dict[str, Any]], str]]] = [
            ("time", lambda r, c: report.time_label(r["time_key"]))
        ]
        if guided:
            columns.append(("w", lambda r, c: fmt(guidance_value(r["guidance"]))))
        columns += [
            ("σ", lambda r, c: fmt(float(r["sigma"]))),
            ("per-sample median" if pooled else "median", lambda r, c: fmt(r["median"])),
        ]
        if pooled:
            columns.append(("pooled", lambda r, c: fmt(r.get("pooled"))))
        columns.append(("q25 – q75", lambda r, c: f"{fmt(r['q25'])} – {fmt(r['q75'])}"))
        if width is None or width >= WIDE:
            columns += [
                ("mean", lambda r, c: fmt(r["mean"])),
                ("95% CI of mean", lambda r, c: f"{fmt(r['ci_low'])} – {fmt(r['ci_high'])}"),
            ]
        columns.append(("n", lambda r, c: fmt(r["n"] if r["status"] == "ok" else None)))
        if extra:
            columns.append((f"{extra} median", partial(extra_median, metric=extra)))
        if graded:
            columns.append(("floor", lambda r, c: fmt(c.get("floor"))))
            if width is None:
                columns.append(("median / floor", lambda r, c: fmt(c.get("ratio"))))
            columns.append(("check", lambda r, c: CHECK_TEXT.get(c.get("status", ""), c.get("status", r["status"]))))
        methods = sorted({c["method"] for k, c in checks.items() if k[:2] == (diag, variant) and c.get("method")})
        title = f"{diag} · {variant} — {main}"
        if methods:
            method_names = ", ".join(METHOD_TEXT.get(m, m) for m in methods)
            title += f" (Jacobian by {method_names}; floor measured on the control by the same method)"
        names = [name for name, _ in columns]
        body: list[list[str]] = []
        flags: list[list[bool]] = []
        for _, r in rows[rows["metric"] == main].iterrows():
            c = checks.get((diag, variant, r["time_key"], guidance_value(r["guidance"])), {})
            body.append([cell(r, c) for _, cell in columns])
            bad = graded and c.get("status") in ("violation", "invalid")
            flags.append([bad and name in ("median", "per-sample median", "check") for name in names])
        align = ["left" if name == "check" else "right" for name in names]
        out.append(TextTable(title, names, body, flags, align))
    return out


def headline_table(report: AuditReport) -> TextTable:
    """The verdict's checks: one row per (diagnostic, variant, headline metric) — and guidance scale w, for a
    conditional model — one column per time point; each cell the model's median, flagged when the check is
    a violation (or invalid)."""
    keys = [t["key"] for t in report.header.get("time_points", [])]
    guided = len({guidance_value(c.get("guidance")) for c in report.verdict.checks}) > 1
    series: dict[str, dict[str, dict[str, Any]]] = {}
    for c in report.verdict.checks:
        w = guidance_value(c.get("guidance"))
        name = f"{c['diagnostic']}.{c['variant']} {c['metric']}" + (f" w={w:g}" if guided and w is not None else "")
        series.setdefault(name, {})[c["time_key"]] = c
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


__all__ = [
    "CHECK_TEXT",
    "METHOD_TEXT",
    "TextTable",
    "comparison_tables",
    "diagnostic_tables",
    "fmt",
    "guidance_value",
    "headline_table",
    "provenance",
]
