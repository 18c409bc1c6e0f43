"""``conservcheck report``: a saved report shown again, as an HTML page, or beside a baseline."""

from __future__ import annotations

import typer

from conservcheck.cli import display
from conservcheck.cli.gating import BASELINE_OPTION, SEED_CHANGE_OPTION, read_baseline
from conservcheck.cli.outputs import check_paths, read_report, rows_file
from conservcheck.cli.publishing import FORMAT_OPTION, HTML_OPTION, check_format, publish


def report_cmd(
    report: str = typer.Argument(..., metavar="REPORT", help="A JSON report written with --json."),
    html_path: str | None = HTML_OPTION,
    baseline_path: str | None = BASELINE_OPTION,
    allow_seed_change: bool = SEED_CHANGE_OPTION,
    fmt: str = FORMAT_OPTION,
) -> None:
    """Show a saved report: its tables and verdict, with --html as one self-contained page, with --baseline
    beside a baseline report (ratios of medians per time point with bootstrap intervals)."""
    fmt = check_format(fmt)
    check_paths(
        {"REPORT": report, "REPORT rows file": rows_file(report), "--baseline": baseline_path}, {"--html": html_path}
    )
    rep = read_report(report)
    baseline = read_baseline(baseline_path, rep, allow_seed_change, fmt)
    console = display.out_console(False)
    display.show(rep, console)
    publish(rep, [], console, fmt, baseline, baseline_path, html_path)
