"""What the console shows of a report: the model line, one rich table per diagnostic variant, the verdict.

The tables are :func:`conservcheck.report.views.diagnostic_tables` — the ones the Markdown summary and the
HTML page show — at the terminal's width: below 140 columns the mean and its confidence interval are left
out, below 100 also the second metric; the JSON and CSV reports always hold everything.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from conservcheck.report.audit_report import AuditReport
from conservcheck.report.baseline import Comparison
from conservcheck.report.views import MEDIUM, WIDE, TextTable, comparison_tables, diagnostic_tables
from conservcheck.runner.options import cpu_scaled_text


def out_console(data_on_stdout: bool) -> Console:
    stream = sys.stderr if data_on_stdout else sys.stdout
    return Console(file=stream, width=None if stream.isatty() else 160, highlight=False)


def rich_table(table: TextTable) -> Table:
    """A :class:`~conservcheck.report.views.TextTable` as a rich table, its flagged cells in bold red."""
    out = Table(title=table.title, title_justify="left", min_width=len(table.title), box=box.SIMPLE_HEAD)
    align = table.align or ["right"] * len(table.columns)
    for name, justify in zip(table.columns, align):
        out.add_column(name, justify="left" if justify == "left" else "right", no_wrap=True)
    for cells, flags in zip(table.rows, table.flags):
        out.add_row(*[Text(cell, style="bold red") if flag else Text(cell) for cell, flag in zip(cells, flags)])
    return out


def tables(report: AuditReport, width: int) -> list[Table]:
    """One table per (diagnostic, variant) — :func:`conservcheck.report.views.diagnostic_tables` at the
    console's width. A table still wider than the console (a ``w`` column, long labels) drops the columns
    of the next narrower width rather than have rich cut its numbers short with "…"."""
    widths = dict.fromkeys((width, min(width, WIDE - 1), min(width, MEDIUM - 1)))
    choices = zip(*(diagnostic_tables(report, w) for w in widths))
    measure = Console(width=100_000)  # wide enough that the measurement is not clamped to the console
    out = []
    for options in choices:
        for text in options:
            table = rich_table(text)
            if measure.measure(table).maximum <= width:
                break
        out.append(table)
    return out


def describe(report: AuditReport) -> list[str]:
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
        labels = cond["class_labels"]
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


def comparison(console: Console, report: AuditReport, comparisons: Sequence[Comparison]) -> None:
    """One table per compared metric (:func:`conservcheck.report.views.comparison_tables`)."""
    for table in comparison_tables(report, comparisons):
        console.print(rich_table(table))


def line(console: Console, text: str) -> None:
    """One unwrapped line of plain text (verdicts and gate results stay greppable)."""
    console.print(text, markup=False, soft_wrap=True)


def show(report: AuditReport, console: Console) -> None:
    for text in describe(report):
        line(console, text)
    for table in tables(report, console.width):
        console.print(table)
    for p in report.header.get("problems", []):
        line(console, f"problem: {p}")
    for w in report.header.get("warnings", []):
        line(console, f"warning: {w}")
    line(console, f"verdict: {report.verdict}")
