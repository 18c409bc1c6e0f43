"""``--fail-if`` conditions and the baseline they may compare with: parsed and checked before any work,
evaluated on a finished report, one console line per condition, optionally JUnit XML."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console

from conservcheck.cli import display
from conservcheck.cli.outputs import read_report
from conservcheck.errors import EXIT_GATE, EXIT_OK, UsageError

BASELINE_OPTION = typer.Option(
    None,
    "--baseline",
    metavar="OLD.json",
    help="A baseline report: compared per time point, and the reference of 'worse by' conditions.",
)
SEED_CHANGE_OPTION = typer.Option(
    False, "--allow-seed-change", help="Compare with a baseline audited with another seed (independent draws)."
)


def parse_gates(texts: list[str]) -> list[Any]:
    from conservcheck.report.gate import parse

    return [parse(t) for t in texts]


def require_baseline(exprs: list[Any], baseline_path: str | None) -> None:
    """Refuse a 'worse by' condition without ``--baseline`` to compare with."""
    from conservcheck.report.gate import needs_baseline

    for e in exprs:
        if needs_baseline(e) and baseline_path is None:
            raise UsageError(
                f"--fail-if {e.text!r}: 'worse by' compares with a baseline report", "add --baseline OLD.json"
            )


def read_baseline(path: str | None, report: Any, allow_seed_change: bool, fmt: str) -> Any:
    """The baseline report at ``path`` (None without one), refused unless comparable with ``report``; in the
    github format a refusal is also an ``::error`` annotation."""
    if path is None:
        if allow_seed_change:
            raise UsageError("--allow-seed-change applies to a comparison", "add --baseline OLD.json")
        return None
    from conservcheck.report.baseline import check_comparable

    try:
        baseline = read_report(path)
        check_comparable(report, baseline, allow_seed_change=allow_seed_change)
    except UsageError as err:
        if fmt == "github":
            from conservcheck.report.github import command

            typer.echo(command("error", str(err), "conservcheck"))
        raise
    return baseline


def apply_gates(
    exprs: list[Any],
    report: Any,
    junit: str | None,
    console: Console,
    baseline: Any = None,
    allow_seed_change: bool = False,
) -> tuple[int, list[Any]]:
    """Evaluate the gates, print one line per condition (and its values); (exit code, results)."""
    from conservcheck.report.gate import evaluate, write_junit

    results = [evaluate(e, report, baseline, allow_seed_change=allow_seed_change) for e in exprs]
    for r in results:
        display.line(console, f"gate {'FAIL' if r.holds else 'ok'}: {r.expression.text}")
        for d in r.details[:10]:
            display.line(console, f"  {d}")
    if junit:
        write_junit(junit, results, report)
    return (EXIT_GATE if any(r.holds for r in results) else EXIT_OK), results
