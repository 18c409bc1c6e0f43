"""What the console shows of a report: the model line, one rich table per diagnostic variant, the verdict.

Rows are time points — for a conditional model, each time point at each guidance scale w, with a ``w``
column — and columns the statistics of the variant's main metric (its table metrics come from the
diagnostic registry, :meth:`conservcheck.diagnostics.Diagnostic.table_metrics`). Below 140 columns of
terminal the mean and its confidence interval are left out, below 100 also the second metric; the JSON
and CSV reports always hold everything. A metric pooled over samples (the curl's ratios) shows its
per-sample median and its pooled value side by side; a table whose values came from a Jacobian names the
method in its title (the floor is measured on the control with the same method); a check whose floor is
its own discretisation error reads ``not resolved at this node count``.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from conservcheck import diagnostics
from conservcheck.runner.options import cpu_scaled_text

#: How the console names a check's status.
CHECK_TEXT = {"unresolved": "not resolved at this node count"}
#: How the console names a Jacobian method.
METHOD_TEXT = {"jvp": "forward-mode autodiff", "double_vjp": "reverse-mode autodiff", "fd": "finite differences"}


def out_console(data_on_stdout: bool) -> Console:
    stream = sys.stderr if data_on_stdout else sys.stdout
    return Console(file=stream, width=None if stream.isatty() else 160, highlight=False)


def fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def tables(report: Any, width: int) -> list[Table]:
    """One table per (diagnostic, variant): rows are time points, columns the statistics (module doc)."""
    summary = report.summary()
    checks = {(c["diagnostic"], c["variant"], c["time_key"], _w(c.get("guidance"))): c for c in report.verdict.checks}
    guided = bool(summary["guidance"].notna().any())
    out = []
    groups = summary[["diagnostic", "variant"]].drop_duplicates().itertuples(index=False)
    for diag, variant in groups:
        spec = diagnostics.registered().get(diag)
        main, extra = spec.table_metrics(variant) if spec is not None else (None, None)
        rows = summary[(summary["diagnostic"] == diag) & (summary["variant"] == variant)]
        if main not in set(rows["metric"]):
            main = next(iter(rows["metric"].dropna()), None)
        if main is None:
            continue
        extra = extra if width >= 100 else None
        graded = spec is not None and spec.headline_metric(variant) == main
        pooled = spec is not None and main in spec.pooled
        columns: list[tuple[str, Any]] = [("time", lambda r, c: report.time_label(r["time_key"]))]
        if guided:
            columns.append(("w", lambda r, c: fmt(_w(r["guidance"]))))
        columns += [
            ("σ", lambda r, c: fmt(float(r["sigma"]))),
            ("per-sample median" if pooled else "median", lambda r, c: fmt(r["median"])),
        ]
        if pooled:
            columns.append(("pooled", lambda r, c: fmt(r.get("pooled"))))
        columns.append(("q25 – q75", lambda r, c: f"{fmt(r['q25'])} – {fmt(r['q75'])}"))
        if width >= 140:
            columns += [
                ("mean", lambda r, c: fmt(r["mean"])),
                ("95% CI of mean", lambda r, c: f"{fmt(r['ci_low'])} – {fmt(r['ci_high'])}"),
            ]
        columns.append(("n", lambda r, c: fmt(r["n"] if r["status"] == "ok" else None)))
        if extra:

            def extra_median(r: Any, c: Any, metric: str = extra) -> str:
                same_w = rows["guidance"].map(lambda g: _w(g) == _w(r["guidance"])).astype(bool)
                e = rows[(rows["metric"] == metric) & (rows["time_key"] == r["time_key"]) & same_w]["median"]
                return fmt(float(e.iloc[0])) if len(e) else "—"

            columns.append((f"{extra} median", extra_median))
        if graded:
            columns += [
                ("floor", lambda r, c: fmt(c.get("floor"))),
                ("check", lambda r, c: CHECK_TEXT.get(c.get("status", ""), c.get("status", r["status"]))),
            ]
        methods = sorted({c["method"] for k, c in checks.items() if k[:2] == (diag, variant) and c.get("method")})
        title = f"{diag} · {variant} — {main}"
        if methods:
            names = ", ".join(METHOD_TEXT.get(m, m) for m in methods)
            title += f" (Jacobian by {names}; floor measured on the control by the same method)"
        table = Table(title=title, title_justify="left", min_width=len(title), box=box.SIMPLE_HEAD)
        for name, _ in columns:
            table.add_column(name, justify="left" if name == "check" else "right", no_wrap=True)
        for _, r in rows[rows["metric"] == main].iterrows():
            c = checks.get((diag, variant, r["time_key"], _w(r["guidance"])), {})
            table.add_row(*[cell(r, c) for _, cell in columns])
        out.append(table)
    return out


def _w(value: Any) -> float | None:
    """A guidance scale as a float, None for none (NaN in a table)."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def describe(report: Any) -> list[str]:
    m, opts, src = report.header["model"], report.header["options"], report.header.get("data_source", {})
    name = m.get("reference") or m.get("name")
    lines = [
        f"model {name} ({m.get('adapter')}, {m.get('parameterization')} → score, {m['process']['name']} process) "
        f"on {report.header['environment']['device']}, precision {m.get('precision')}"
    ]
    cond = m.get("conditioning")
    if cond:
        lines.append(condition_line(cond))
    if src.get("kind") == "model":
        lines.append(
            f"x0: {src.get('n')} samples drawn from the model (deterministic DPM-Solver++(2M), "
            f"{src.get('steps')} steps)"
        )
    elif src.get("path"):
        span = src.get("value_range")
        values = f"; values in [{span[0]:.4g}, {span[1]:.4g}]" if isinstance(span, list) and len(span) == 2 else ""
        lines.append(f"x0: {src.get('n')} samples from {src['path']} ({src.get('mapping')}{values})")
    if opts.get("cpu_scaled"):
        lines.append(cpu_scaled_text(opts))
    return lines


def condition_line(cond: dict[str, Any]) -> str:
    """``conditions: 2 prompts ('a cat', 'a dog'), cycled over samples; guidance w = 1, 7.5``."""
    if cond.get("kind") == "text":
        prompts = cond.get("prompts") or []
        shown = ", ".join(repr(p if len(p) <= 40 else p[:37] + "…") for p in prompts[:3] if p is not None)
        more = f" +{len(prompts) - 3}" if len(prompts) > 3 else ""
        what = f"{len(prompts)} prompt{'s' if len(prompts) != 1 else ''}" + (f" ({shown}{more})" if shown else "")
        if cond.get("negative_prompt"):
            what += f", negative prompt {cond['negative_prompt']!r}"
    else:
        labels = cond.get("class_labels")
        what = (
            "random class labels"
            if labels == "random"
            else f"class label{'s' if len(labels) != 1 else ''} "
            + (", ".join(map(str, labels[:8])) + (" …" if len(labels) > 8 else ""))
        )
    many = len(cond.get("prompts") or []) > 1 or (
        isinstance(cond.get("class_labels"), list) and len(cond["class_labels"]) > 1
    )
    spread = "a seeded draw per sample" if cond.get("assignment") == "random" else "cycled over samples" if many else ""
    scales = ", ".join(f"{w:g}" for w in cond.get("guidance_scales") or [])
    return f"conditions: {what}{', ' + spread if spread else ''}; guidance w = {scales}"


def comparison(console: Console, report: Any, comparisons: list[Any]) -> None:
    """One table per compared metric: medians here and in the baseline, their ratio and its 95% interval."""
    by_metric: dict[str, list[Any]] = {}
    for c in comparisons:
        by_metric.setdefault(c.metric, []).append(c)
    for metric, rows in by_metric.items():
        title = f"against the baseline — {metric} (median)"
        table = Table(title=title, title_justify="left", min_width=len(title), box=box.SIMPLE_HEAD)
        for name in ("time", "baseline", "this report", "ratio", "95% interval"):
            table.add_column(name, justify="right", no_wrap=True)
        for c in rows:
            interval = f"{fmt(c.low)} – {fmt(c.high)}" if c.status == "ok" else c.status
            table.add_row(
                report.time_label(c.time_key), fmt(c.median_baseline), fmt(c.median_new), fmt(c.ratio), interval
            )
        console.print(table)


def line(console: Console, text: str) -> None:
    """One unwrapped line of plain text (verdicts and gate results stay greppable)."""
    console.print(text, markup=False, soft_wrap=True)


def show(report: Any, console: Console) -> None:
    for text in describe(report):
        line(console, text)
    for table in tables(report, console.width):
        console.print(table)
    for p in report.header.get("problems", []):
        line(console, f"problem: {p}")
    for w in report.header.get("warnings", []):
        line(console, f"warning: {w}")
    line(console, f"verdict: {report.verdict}")
