"""``conservcheck gate``: ``--fail-if`` conditions checked on a saved report, alone or against a baseline."""

from __future__ import annotations

import typer

from conservcheck.cli import display
from conservcheck.cli.gating import (
    BASELINE_OPTION,
    SEED_CHANGE_OPTION,
    apply_gates,
    parse_gates,
    read_baseline,
    require_baseline,
)
from conservcheck.cli.outputs import check_paths, read_report, rows_file
from conservcheck.cli.publishing import FORMAT_OPTION, HTML_OPTION, check_format, publish


def gate_cmd(
    report: str = typer.Argument(..., metavar="REPORT", help="A JSON report written with --json."),
    fail_if: list[str] = typer.Option(..., "--fail-if", metavar="EXPR", help="Condition (repeatable)."),
    baseline_path: str | None = BASELINE_OPTION,
    allow_seed_change: bool = SEED_CHANGE_OPTION,
    junit: str | None = typer.Option(None, "--junit", metavar="PATH", help="Write JUnit XML."),
    html_path: str | None = HTML_OPTION,
    fmt: str = FORMAT_OPTION,
) -> None:
    """Check --fail-if conditions on an existing report, absolute or against a baseline (exit 1 when one holds).

    'worse by P%' conditions compare the per-sample values with --baseline: they hold only when the ratio of
    medians exceeds 1 + P/100 with 95% confidence. Reports whose time points, loops or seeds differ are
    refused (exit 2).
    """
    exprs = parse_gates(fail_if)
    require_baseline(exprs, baseline_path)
    fmt = check_format(fmt)
    inputs = {"REPORT": report, "REPORT rows file": rows_file(report), "--baseline": baseline_path}
    check_paths(inputs, {"--junit": junit, "--html": html_path})
    rep = read_report(report)
    baseline = read_baseline(baseline_path, rep, allow_seed_change, fmt)
    console = display.out_console(False)
    display.line(console, f"verdict: {rep.verdict}")
    code, results = apply_gates(exprs, rep, junit, console, baseline, allow_seed_change)
    publish(rep, results, console, fmt, baseline, baseline_path, html_path)
    raise typer.Exit(code)
