"""``conservcheck plot``: the paper's figures drawn from a saved report."""

from __future__ import annotations

import os

import typer

from conservcheck.cli.outputs import read_report
from conservcheck.errors import UsageError


def plot_cmd(
    report: str = typer.Argument(..., metavar="REPORT", help="A JSON report written with --json."),
    out: str = typer.Option("figures", "--out", help="Folder for the figures."),
    fmt: str = typer.Option("png", "--format", help="png or svg."),
) -> None:
    """Draw the paper's figures from a report: each metric vs time per loop type, and box plots."""
    from conservcheck.report.plots import plot_report

    if fmt not in ("png", "svg"):
        raise UsageError(f"--format: expected png or svg, got {fmt!r}", "use --format png or --format svg")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file, not a folder", "give --out a folder for the figures")
    rep = read_report(report)
    for path in plot_report(rep, out, fmt):
        typer.echo(str(path))
