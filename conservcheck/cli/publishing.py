"""What a report becomes beyond its JSON: the console tables and verdict, the baseline comparison, GitHub
annotations and job summary (``--format github``), the HTML page; and the shared end of audit and merge."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console

from conservcheck.cli import display
from conservcheck.cli.gating import apply_gates, read_baseline
from conservcheck.errors import EXIT_OK, UsageError

HTML_OPTION = typer.Option(
    None, "--html", metavar="PATH", help="Write the report as one self-contained HTML page (figures embedded)."
)
FORMAT_OPTION = typer.Option(
    "text",
    "--format",
    metavar="text|github",
    help="github: also ::error/::warning annotations and a Markdown summary in $GITHUB_STEP_SUMMARY.",
)
FORMATS = ("text", "github")


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise UsageError(f"--format: expected {' or '.join(FORMATS)}, got {fmt!r}", "use --format github in Actions")
    return fmt


def publish(
    report: Any,
    results: list[Any],
    console: Console,
    fmt: str,
    baseline: Any = None,
    baseline_path: str | None = None,
    html_path: str | None = None,
) -> None:
    """The outputs beyond the console: GitHub annotations and job summary, the HTML page."""
    comparisons = None
    if baseline is not None:
        from conservcheck.report.baseline import headline_comparisons

        comparisons = headline_comparisons(report, baseline)
        display.comparison(console, report, comparisons)
    if fmt == "github":
        from conservcheck.report.github import summary_markdown, workflow_commands, write_step_summary

        for a in workflow_commands(report, results):
            typer.echo(a)
        markdown = summary_markdown(report, results, comparisons, baseline_path)
        if write_step_summary(markdown) is None:
            typer.echo("conservcheck: GITHUB_STEP_SUMMARY is not set; the job summary follows on stdout", err=True)
            typer.echo(markdown)
    if html_path:
        from conservcheck.report.html import write_html

        write_html(
            html_path,
            report,
            baseline=baseline,
            comparisons=comparisons,
            baseline_name=baseline_path,
            results=results,
        )
        display.line(console, f"html report: {html_path}")


def finish_report(
    report: Any,
    json_path: str | None,
    csv_path: str | None,
    junit: str | None,
    exprs: list[Any],
    html_path: str | None = None,
    baseline_path: str | None = None,
    allow_seed_change: bool = False,
    fmt: str = "text",
) -> None:
    """Write the report files (each atomically), print tables and verdict, apply the gates, exit; only then
    is the audit's default partial-results file removed (a failed write keeps it and names it)."""
    from conservcheck.runner.audit import discard_partial_results

    console = display.out_console(json_path == "-" or csv_path == "-")
    try:
        if json_path:
            report.to_json(json_path)
        if csv_path:
            report.to_csv(csv_path)
    except OSError as err:
        kept = getattr(report, "default_partial_results", None) or report.run.get("partial_results")
        where = f"; the finished units are kept in {kept}" if kept else ""
        raise UsageError(
            f"cannot write {err.filename or json_path}: {err.strerror or err}{where}",
            f"free space or choose another path, then run again with --resume {kept}"
            if kept
            else "free space or choose another path",
        ) from None
    display.show(report, console)
    baseline = read_baseline(baseline_path, report, allow_seed_change, fmt)
    code, results = apply_gates(exprs, report, junit, console, baseline, allow_seed_change) if exprs else (EXIT_OK, [])
    publish(report, results, console, fmt, baseline, baseline_path, html_path)
    discard_partial_results(report)
    raise typer.Exit(code)
