"""``conservcheck compare``: two saved reports side by side, medians per time point and their ratio."""

from __future__ import annotations

from typing import Any

import typer
from rich import box
from rich.table import Table

from conservcheck.cli import display
from conservcheck.cli.outputs import read_report
from conservcheck.errors import UsageError
from conservcheck.report.views import fmt


def compare_cmd(
    a: str = typer.Argument(..., metavar="A", help="First JSON report."),
    b: str = typer.Argument(..., metavar="B", help="Second JSON report."),
    metric: list[str] = typer.Option([], "--metric", help="Metric columns to compare (default: the headline metrics)."),
) -> None:
    """Two reports side by side: medians per time point and their ratio B/A."""
    from conservcheck.report.audit_report import compare

    ra, rb = read_report(a), read_report(b)
    frame = compare(ra, rb, metric or None)
    console = display.out_console(False)
    if frame.empty:
        raise UsageError("the two reports share no metric to compare", "pass --metric with a column both contain")
    for (diag, variant, m), rows in frame.groupby(["diagnostic", "variant", "metric"], sort=False):
        title = f"{diag} · {variant} — {m} (median)"
        table = Table(title=title, title_justify="left", min_width=len(title), box=box.SIMPLE_HEAD)
        for name in ("time", "A", "B", "B / A"):
            table.add_column(name, justify="right")
        for _, r in rows.iterrows():
            label = f"k={r['time_index']}" if not _isna(r["time_index"]) else f"t={r['t']:.4g}"
            label += "" if _isna(r["guidance"]) else f", w={r['guidance']:g}"
            table.add_row(label, fmt(r["median_a"]), fmt(r["median_b"]), fmt(r["ratio"]))
        console.print(table)
    display.line(console, f"A {a}: verdict {ra.verdict}")
    display.line(console, f"B {b}: verdict {rb.verdict}")


def _isna(v: Any) -> bool:
    import pandas as pd

    return bool(pd.isna(v))
