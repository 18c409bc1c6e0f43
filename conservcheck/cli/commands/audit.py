"""``conservcheck audit``: one flag per option of :func:`conservcheck.runner.options.audit_options` (the
signature is built from that table), then :func:`conservcheck.runner.audit.audit`, its report's files,
tables, gates and publishing. Ctrl-C or SIGTERM keeps the finished units and names how to resume."""

from __future__ import annotations

import inspect
import os
from typing import Any

import typer

from conservcheck.cli.console import error, logging_to_stderr, progress_bar
from conservcheck.cli.gating import BASELINE_OPTION, SEED_CHANGE_OPTION, parse_gates, require_baseline
from conservcheck.cli.outputs import check_report_outputs, local_file, read_report
from conservcheck.cli.publishing import FORMAT_OPTION, HTML_OPTION, check_format, finish_report
from conservcheck.errors import EXIT_INTERRUPTED
from conservcheck.runner.options import audit_options


def _run_audit(
    model: str,
    json_path: str | None,
    csv_path: str | None,
    junit: str | None,
    fail_if: list[str],
    quiet: bool,
    html_path: str | None = None,
    baseline_path: str | None = None,
    allow_seed_change: bool = False,
    fmt: str = "text",
    **options: Any,
) -> None:
    from conservcheck.runner.audit import AuditInterrupted, audit

    exprs = parse_gates(fail_if or [])
    stein = options.get("stein") or ""
    inputs = {
        "MODEL": model if os.path.exists(model) else None,
        "--data": local_file(options.get("data")),
        "--resume": options.get("resume"),
        "--stein": stein.partition(":")[2] if ":" in stein else None,
    }
    if baseline_path is not None:
        inputs["--baseline"] = baseline_path
    check_report_outputs(json_path, csv_path, junit, exprs, inputs, html_path)
    require_baseline(exprs, baseline_path)
    fmt = check_format(fmt)
    if baseline_path is not None:
        read_report(baseline_path)  # a missing or unreadable baseline is refused before the audit runs
    given = {k: v for k, v in options.items() if v is not None and v is not False and v != []}
    with logging_to_stderr(quiet) as err:
        try:
            with progress_bar(err, not quiet) as progress:
                report = audit(model, progress=progress, keep_partial_results=True, **given)
        except AuditInterrupted as stop:
            error(f"interrupted; {stop.n_done} finished units are saved — resume with {stop.resume_flags}")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except KeyboardInterrupt:
            error("interrupted before any unit finished (nothing to resume; run the command again)")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    finish_report(report, json_path, csv_path, junit, exprs, html_path, baseline_path, allow_seed_change, fmt)


def _audit_signature() -> list[inspect.Parameter]:
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter(
            "model",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=str,
            default=typer.Argument(
                "embedded:digits",
                metavar="MODEL",
                show_default=True,
                help="Model: embedded:<name>, a hub id owner/name[@rev], a local folder or file, or module:factory.",
            ),
        ),
    ]
    for o in audit_options():
        shown = o.shown if o.shown is not None else (o.default if o.default is not None else "off")
        if o.is_flag:
            params.append(
                inspect.Parameter(o.name, kw, annotation=bool, default=typer.Option(False, o.flag, help=o.help))
            )
        elif o.multiple:
            params.append(
                inspect.Parameter(
                    o.name,
                    kw,
                    annotation=list[str] | None,
                    default=typer.Option(
                        None,
                        o.flag,
                        help=f"{o.help} [default: {shown}]",
                        metavar=o.metavar,
                        show_default=False,
                    ),
                )
            )
        else:
            params.append(
                inspect.Parameter(
                    o.name,
                    kw,
                    annotation=str | None,
                    default=typer.Option(
                        None, o.flag, help=f"{o.help} [default: {shown}]", metavar=o.metavar, show_default=False
                    ),
                )
            )
    params += [
        inspect.Parameter(
            "json_path",
            kw,
            annotation=str | None,
            default=typer.Option(None, "--json", metavar="PATH|-", help="Write the JSON report (- for stdout)."),
        ),
        inspect.Parameter(
            "csv_path",
            kw,
            annotation=str | None,
            default=typer.Option(
                None, "--csv", metavar="PATH|-", help="Write the summary table as CSV (- for stdout)."
            ),
        ),
        inspect.Parameter(
            "junit",
            kw,
            annotation=str | None,
            default=typer.Option(None, "--junit", metavar="PATH", help="Write the --fail-if results as JUnit XML."),
        ),
        inspect.Parameter(
            "fail_if",
            kw,
            annotation=list[str],
            default=typer.Option(
                [],
                "--fail-if",
                metavar="EXPR",
                help="Exit with 1 when this condition holds (repeatable; grammar in docs/cli.md).",
            ),
        ),
        inspect.Parameter(
            "quiet",
            kw,
            annotation=bool,
            default=typer.Option(False, "--quiet", "-q", help="No logs and no progress bar."),
        ),
        inspect.Parameter("html_path", kw, annotation=str | None, default=HTML_OPTION),
        inspect.Parameter("baseline_path", kw, annotation=str | None, default=BASELINE_OPTION),
        inspect.Parameter("allow_seed_change", kw, annotation=bool, default=SEED_CHANGE_OPTION),
        inspect.Parameter("fmt", kw, annotation=str, default=FORMAT_OPTION),
    ]
    return params


def audit_cmd(**kwargs: Any) -> None:
    """Audit a model: loop integrals, curl and Stein diagnostics at several time points.

    Prints one table per diagnostic (rows: time points; columns: statistics) and a one-line verdict.
    Exit codes: 0 done, 1 a --fail-if condition holds, 2 usage or input error, 3 internal error, 130
    interrupted (Ctrl-C, SIGTERM).
    """
    _run_audit(**kwargs)


audit_cmd.__signature__ = inspect.Signature(_audit_signature())  # type: ignore[attr-defined]
audit_cmd.__annotations__ = {p.name: p.annotation for p in _audit_signature()}
