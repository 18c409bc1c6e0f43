"""``conservcheck merge``: the partial-results files of a sharded audit combined into its report."""

from __future__ import annotations

import typer

from conservcheck.cli.console import logging_to_stderr
from conservcheck.cli.gating import BASELINE_OPTION, SEED_CHANGE_OPTION, parse_gates, require_baseline
from conservcheck.cli.outputs import check_report_outputs
from conservcheck.cli.publishing import FORMAT_OPTION, HTML_OPTION, check_format, finish_report


def merge_cmd(
    journals: list[str] = typer.Argument(
        ..., metavar="FILE", help="Partial-results files of the shards (conservcheck audit --shard i/n)."
    ),
    json_path: str | None = typer.Option(
        None, "--json", metavar="PATH|-", help="Write the JSON report (- for stdout)."
    ),
    csv_path: str | None = typer.Option(
        None, "--csv", metavar="PATH|-", help="Write the summary table as CSV (- for stdout)."
    ),
    junit: str | None = typer.Option(None, "--junit", metavar="PATH", help="Write the --fail-if results as JUnit XML."),
    fail_if: list[str] = typer.Option(
        [], "--fail-if", metavar="EXPR", help="Exit with 1 when this condition holds (repeatable)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No logs."),
    html_path: str | None = HTML_OPTION,
    baseline_path: str | None = BASELINE_OPTION,
    allow_seed_change: bool = SEED_CHANGE_OPTION,
    fmt: str = FORMAT_OPTION,
) -> None:
    """Combine the partial-results files of a sharded audit into its report (that of an unsharded run).

    Refuses files of different audits, and names the missing units, their shard and the command that
    finishes them when the files do not hold every unit. Exit codes as for audit.
    """
    from conservcheck.runner.merge import merge

    exprs = parse_gates(fail_if or [])
    inputs = {f"FILE {i + 1}": j for i, j in enumerate(journals)}
    if baseline_path is not None:
        inputs["--baseline"] = baseline_path
    check_report_outputs(json_path, csv_path, junit, exprs, inputs, html_path)
    require_baseline(exprs, baseline_path)
    fmt = check_format(fmt)
    with logging_to_stderr(quiet):
        report = merge(journals)
    finish_report(report, json_path, csv_path, junit, exprs, html_path, baseline_path, allow_seed_change, fmt)
