"""The ``conservcheck`` command: audit, fetch, merge, report, plot, compare, gate, transport and selftest.

A thin layer over the API: ``conservcheck audit`` has one flag per option of
:func:`conservcheck.runner.options.audit_options` (built from that table) and calls
:func:`conservcheck.runner.audit.audit`. Tables and the verdict go to stdout (to stderr when ``--json -`` or
``--csv -`` put data on stdout); logs and the progress bar go to stderr. typer and rich are imported here
only.

One exit-code contract for every command (:mod:`conservcheck.errors`, docs/cli.md): 0 done, 1 a
``--fail-if`` condition holds (or a self-test check misses), 2 a usage or input error — one line
``error: …`` —, 3 an internal error — one line, the traceback in a log file it names (printed with
``conservcheck --debug``) —, 130 interrupted (Ctrl-C or SIGTERM, with how to resume an audit). A closed
stdout (``… | head``) stops the output and nothing else: files are written, gates applied, and the exit
code is the command's own. Before any work, every output path is checked to be writable and distinct from
every input and from the other outputs.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from conservcheck.cli import display
from conservcheck.errors import (
    EXIT_GATE,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    ConservcheckError,
    UsageError,
    reason,
)
from conservcheck.files import check_distinct, check_writable
from conservcheck.report.views import fmt
from conservcheck.runner.options import audit_options
from conservcheck.version import __version__

log = logging.getLogger("conservcheck")


def _error(message: str) -> None:
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)


def _click_errors() -> tuple[type[Exception], ...]:
    """The command-line parser's exception base classes (typer ≥ 0.20 vendors click; older typer uses it)."""
    found: list[type[Exception]] = [e for e in (getattr(typer, "TyperException", None),) if e is not None]
    try:
        import click

        found.append(click.ClickException)
    except ImportError:
        pass
    return tuple(found)


def _debug() -> bool:
    return _DEBUG["on"] or os.environ.get("CONSERVCHECK_DEBUG", "") not in ("", "0")


_DEBUG = {"on": False}


def _internal(err: BaseException) -> None:
    """An internal error: one line naming it and where its traceback is (printed too with --debug)."""
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    where = ""
    try:
        fd, log_path = tempfile.mkstemp(prefix="conservcheck-error-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"conservcheck {__version__}\nargv: {sys.argv}\n\n{text}")
        where = f"the traceback is in {log_path}; "
    except OSError:
        pass
    if _debug():
        typer.echo(text, err=True, nl=False)
    what = reason(err) if not isinstance(err, SystemExit) else f"sys.exit({err.code!r}) was called inside conservcheck"
    _error(
        f"internal error: {what} (a bug in conservcheck: {where}run with conservcheck --debug to print it, "
        "and please report it)"
    )


class _Group(TyperGroup):
    """Maps every outcome to the exit-code contract (module doc): one ``error: …`` line, never a traceback
    unless ``--debug``."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            _error("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            with _terminate_as_interrupt():
                rv = super().main(
                    args=args,
                    prog_name=prog_name or "conservcheck",
                    complete_var=complete_var,
                    standalone_mode=False,
                    windows_expand_args=windows_expand_args,
                    **extra,
                )
        except _click_errors() as err:
            if type(err).__name__ == "NoArgsIsHelpError" and getattr(err, "ctx", None) is not None:
                typer.echo(err.ctx.get_help(), err=True)  # type: ignore[attr-defined]
            else:
                _error(err.format_message())  # type: ignore[attr-defined]
            sys.exit(getattr(err, "exit_code", EXIT_USAGE))
        except typer.Abort:
            _error("aborted")
            sys.exit(EXIT_INTERRUPTED)
        except KeyboardInterrupt:
            _error("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        except ConservcheckError as err:
            _error(str(err))
            sys.exit(err.exit_code)
        except MemoryError:
            _error("out of memory (lower --samples, --points, --block or --batch-size, or set --memory-budget)")
            sys.exit(EXIT_USAGE)
        except BrokenPipeError as err:  # a pipe other than stdout: not the user's doing
            _internal(err)
            sys.exit(EXIT_INTERNAL)
        except OSError as err:  # a file that cannot be read or written: the user's environment, not a bug
            _error(f"{err.strerror or err}: {err.filename}" if err.filename else str(err))
            sys.exit(EXIT_USAGE)
        except (Exception, SystemExit) as err:  # noqa: BLE001 — the contract's exit 3, with the traceback kept
            _internal(err)
            sys.exit(EXIT_INTERNAL)
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    no_args_is_help=True,
    help="Has your diffusion model really learned a score function? Loop integrals, curl and Stein diagnostics.",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"conservcheck {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(
        False, "--debug", help="Print the traceback of an internal error (exit code 3) on stderr."
    ),
) -> None:
    """conservcheck: is a diffusion model's vector field a score (a conservative field)?"""
    _DEBUG["on"] = debug


# ------------------------------------------------------------------------------------------- plumbing


@contextmanager
def _logging(quiet: bool) -> Iterator[Console]:
    """Logs to stderr (through rich when stderr is a terminal); yields the stderr console."""
    err = Console(stderr=True)
    if err.is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=err, show_time=False, show_path=False, markup=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("conservcheck: %(message)s"))
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield err
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


@contextmanager
def _progress(err: Console, enabled: bool) -> Iterator[Any]:
    """A progress callback drawing one bar with ETA on stderr; None when stderr is not a terminal, where the
    audit's periodic progress lines in the log stand in for it (the bar replaces them on a terminal)."""
    if not (enabled and err.is_terminal):
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    lines = logging.getLogger("conservcheck.progress")
    old_level = lines.level
    lines.setLevel(logging.WARNING)
    try:
        with Progress(
            TextColumn("{task.description:<34}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        ) as bar:
            task = bar.add_task("audit", total=None)

            def update(done: float, total: float, description: str) -> None:
                bar.update(task, completed=done, total=total, description=description)

            yield update
    finally:
        lines.setLevel(old_level)


def _outputs(inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
    """Refuse, before any work is spent, an output that cannot be written or that names an input or
    another output (an overwritten input is lost; two outputs on one file leave only the last)."""
    for flag, path in outputs.items():
        if path not in (None, "", "-") and not flag.endswith("rows file"):
            check_writable(path, flag)
    check_distinct(inputs, outputs)


def _local(path: str | None) -> str | None:
    """A local file named by an input reference (``file.npz#key`` → ``file.npz``), or None."""
    if not path or "://" in path:
        return None
    base, sep, key = path.rpartition("#")
    return base if sep and key and "/" not in key else path


def _rows_file(json_path: str | None) -> str | None:
    """The rows side file a large report writes beside its JSON (``r.json`` → ``r.rows.csv``)."""
    return str(Path(json_path).with_suffix(".rows.csv")) if json_path not in (None, "-") else None


def _gates(texts: list[str]) -> list[Any]:
    from conservcheck.report.gate import parse

    return [parse(t) for t in texts]


def _apply_gates(
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


FORMATS = ("text", "github")


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise UsageError(f"--format: expected {' or '.join(FORMATS)}, got {fmt!r}", "use --format github in Actions")
    return fmt


def _read_baseline(path: str | None, report: Any, allow_seed_change: bool, fmt: str) -> Any:
    """The baseline report at ``path`` (None without one), refused unless comparable with ``report``; in the
    github format a refusal is also an ``::error`` annotation."""
    if path is None:
        if allow_seed_change:
            raise UsageError("--allow-seed-change applies to a comparison", "add --baseline OLD.json")
        return None
    from conservcheck.report.baseline import check_comparable

    try:
        baseline = _read(path)
        check_comparable(report, baseline, allow_seed_change=allow_seed_change)
    except UsageError as err:
        if fmt == "github":
            from conservcheck.report.github import command

            typer.echo(command("error", str(err), "conservcheck"))
        raise
    return baseline


def _publish(
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


# ---------------------------------------------------------------------------------------------- audit


def _check_outputs(
    json_path: str | None,
    csv_path: str | None,
    junit: str | None,
    exprs: list[Any],
    inputs: dict[str, Any],
    html_path: str | None = None,
) -> None:
    if json_path == "-" and csv_path == "-":
        raise UsageError("--json - and --csv - would both write to stdout", "write one of them to a file")
    if junit and not exprs:
        raise UsageError("--junit needs at least one --fail-if condition", "add --fail-if 'verdict != pass'")
    outputs = {
        "--json": json_path,
        "--csv": csv_path,
        "--junit": junit,
        "--json rows file": _rows_file(json_path),
        "--html": html_path,
    }
    _outputs(inputs, outputs)


def _needs_baseline(exprs: list[Any], baseline_path: str | None) -> None:
    from conservcheck.report.gate import needs_baseline

    for e in exprs:
        if needs_baseline(e) and baseline_path is None:
            raise UsageError(
                f"--fail-if {e.text!r}: 'worse by' compares with a baseline report", "add --baseline OLD.json"
            )


def _finish_report(
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
    baseline = _read_baseline(baseline_path, report, allow_seed_change, fmt)
    code, results = _apply_gates(exprs, report, junit, console, baseline, allow_seed_change) if exprs else (EXIT_OK, [])
    _publish(report, results, console, fmt, baseline, baseline_path, html_path)
    discard_partial_results(report)
    raise typer.Exit(code)


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler's time limit, ``kill``) stops the audit like Ctrl-C: finished units are kept
    and the message names the file to resume from."""

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


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

    exprs = _gates(fail_if or [])
    stein = options.get("stein") or ""
    inputs = {
        "MODEL": model if os.path.exists(model) else None,
        "--data": _local(options.get("data")),
        "--resume": options.get("resume"),
        "--stein": stein.partition(":")[2] if ":" in stein else None,
    }
    if baseline_path is not None:
        inputs["--baseline"] = baseline_path
    _check_outputs(json_path, csv_path, junit, exprs, inputs, html_path)
    _needs_baseline(exprs, baseline_path)
    fmt = _check_format(fmt)
    if baseline_path is not None:
        _read(baseline_path)  # a missing or unreadable baseline is refused before the audit runs
    given = {k: v for k, v in options.items() if v is not None and v is not False and v != []}
    with _logging(quiet) as err:
        try:
            with _progress(err, not quiet) as progress:
                report = audit(model, progress=progress, keep_partial_results=True, **given)
        except AuditInterrupted as stop:
            _error(f"interrupted; {stop.n_done} finished units are saved — resume with {stop.resume_flags}")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except KeyboardInterrupt:
            _error("interrupted before any unit finished (nothing to resume; run the command again)")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    _finish_report(report, json_path, csv_path, junit, exprs, html_path, baseline_path, allow_seed_change, fmt)


HTML_OPTION = typer.Option(
    None, "--html", metavar="PATH", help="Write the report as one self-contained HTML page (figures embedded)."
)
BASELINE_OPTION = typer.Option(
    None,
    "--baseline",
    metavar="OLD.json",
    help="A baseline report: compared per time point, and the reference of 'worse by' conditions.",
)
SEED_CHANGE_OPTION = typer.Option(
    False, "--allow-seed-change", help="Compare with a baseline audited with another seed (independent draws)."
)
FORMAT_OPTION = typer.Option(
    "text",
    "--format",
    metavar="text|github",
    help="github: also ::error/::warning annotations and a Markdown summary in $GITHUB_STEP_SUMMARY.",
)


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


def _audit_command(**kwargs: Any) -> None:
    """Audit a model: loop integrals, curl and Stein diagnostics at several time points.

    Prints one table per diagnostic (rows: time points; columns: statistics) and a one-line verdict.
    Exit codes: 0 done, 1 a --fail-if condition holds, 2 usage or input error, 3 internal error, 130
    interrupted (Ctrl-C, SIGTERM).
    """
    _run_audit(**kwargs)


_audit_command.__signature__ = inspect.Signature(_audit_signature())  # type: ignore[attr-defined]
_audit_command.__annotations__ = {p.name: p.annotation for p in _audit_signature()}
app.command("audit")(_audit_command)


@app.command("fetch")
def fetch_cmd(
    model: str = typer.Argument(..., metavar="MODEL", help="Hub model: owner/name or owner/name@revision."),
    revision: str | None = typer.Option(
        None, "--revision", metavar="REV", help="Hub revision (branch, tag or commit) of MODEL. [default: main]"
    ),
    cache_dir: str | None = typer.Option(
        None,
        "--cache-dir",
        metavar="DIR",
        help="Hub cache folder to fill (the folder audit --cache-dir reads). [default: the Hugging Face cache]",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No logs."),
) -> None:
    """Download the files of a hub model that conservcheck reads, and print the snapshot folder.

    For machines without network: fetch where there is network, copy the cache folder, then audit there
    with HF_HUB_OFFLINE=1. Only what the adapters read is downloaded (one weights format, no ONNX or Flax
    exports); the commit, files and sizes go to stderr, the snapshot folder to stdout. With HF_HUB_OFFLINE=1
    it checks the cache instead of downloading. Exit codes: 0 done, 2 usage error or a model that cannot be
    fetched.
    """
    from conservcheck.adapters.resolve import fetch

    with _logging(quiet):
        folder, adapter = fetch(model, revision=revision, cache_dir=cache_dir)
        log.info("%s: read by the %s adapter; load it offline with HF_HUB_OFFLINE=1", folder.name[:12], adapter)
    typer.echo(str(folder))


@app.command("merge")
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

    exprs = _gates(fail_if or [])
    inputs = {f"FILE {i + 1}": j for i, j in enumerate(journals)}
    if baseline_path is not None:
        inputs["--baseline"] = baseline_path
    _check_outputs(json_path, csv_path, junit, exprs, inputs, html_path)
    _needs_baseline(exprs, baseline_path)
    fmt = _check_format(fmt)
    with _logging(quiet):
        report = merge(journals)
    _finish_report(report, json_path, csv_path, junit, exprs, html_path, baseline_path, allow_seed_change, fmt)


# ------------------------------------------------------------------------------------------ reports


def _read(path: str) -> Any:
    from conservcheck.report.audit_report import AuditReport

    return AuditReport.from_json(path)


@app.command("plot")
def plot(
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
    rep = _read(report)
    for path in plot_report(rep, out, fmt):
        typer.echo(str(path))


@app.command("compare")
def compare_cmd(
    a: str = typer.Argument(..., metavar="A", help="First JSON report."),
    b: str = typer.Argument(..., metavar="B", help="Second JSON report."),
    metric: list[str] = typer.Option([], "--metric", help="Metric columns to compare (default: the headline metrics)."),
) -> None:
    """Two reports side by side: medians per time point and their ratio B/A."""
    from conservcheck.report.audit_report import compare

    ra, rb = _read(a), _read(b)
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


@app.command("gate")
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
    exprs = _gates(fail_if)
    _needs_baseline(exprs, baseline_path)
    fmt = _check_format(fmt)
    inputs = {"REPORT": report, "REPORT rows file": _rows_file(report), "--baseline": baseline_path}
    _outputs(inputs, {"--junit": junit, "--html": html_path})
    rep = _read(report)
    baseline = _read_baseline(baseline_path, rep, allow_seed_change, fmt)
    console = display.out_console(False)
    display.line(console, f"verdict: {rep.verdict}")
    code, results = _apply_gates(exprs, rep, junit, console, baseline, allow_seed_change)
    _publish(rep, results, console, fmt, baseline, baseline_path, html_path)
    raise typer.Exit(code)


@app.command("report")
def report_cmd(
    report: str = typer.Argument(..., metavar="REPORT", help="A JSON report written with --json."),
    html_path: str | None = HTML_OPTION,
    baseline_path: str | None = BASELINE_OPTION,
    allow_seed_change: bool = SEED_CHANGE_OPTION,
    fmt: str = FORMAT_OPTION,
) -> None:
    """Show a saved report: its tables and verdict, with --html as one self-contained page, with --baseline
    beside a baseline report (ratios of medians per time point with bootstrap intervals)."""
    fmt = _check_format(fmt)
    _outputs(
        {"REPORT": report, "REPORT rows file": _rows_file(report), "--baseline": baseline_path}, {"--html": html_path}
    )
    rep = _read(report)
    baseline = _read_baseline(baseline_path, rep, allow_seed_change, fmt)
    console = display.out_console(False)
    display.show(rep, console)
    _publish(rep, [], console, fmt, baseline, baseline_path, html_path)


@app.command("transport")
def transport_cmd(
    model: str = typer.Argument("embedded:digits", metavar="MODEL", help="Model reference."),
    reference: str = typer.Option(..., "--reference", help="Reference score (see docs: Stein references)."),
    samples: int = typer.Option(256, "--samples", min=1, help="Samples integrated with each field."),
    seed: int = typer.Option(0, "--seed", min=0),
    t_start: float | None = typer.Option(None, "--t-start", help="Canonical start time (noisy end)."),
    t_end: float | None = typer.Option(None, "--t-end", help="Canonical end time (clean end)."),
    steps: int = typer.Option(100, "--steps", min=2, help="Integration steps."),
    device: str = typer.Option("auto", "--device"),
    precision: str = typer.Option("fp32", "--precision"),
    revision: str | None = typer.Option(None, "--revision"),
    cache_dir: str | None = typer.Option(None, "--cache-dir"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    json_path: str | None = typer.Option(None, "--json", metavar="PATH|-", help="Write the result as JSON."),
) -> None:
    """Integrate the probability flow with the model and with the reference from the same noise; compare."""
    import json

    from conservcheck.analytic.reference_scores import resolve_reference
    from conservcheck.diagnostics.transport import transport_check
    from conservcheck.files import write_atomic
    from conservcheck.runner.audit import load_model
    from conservcheck.runner.options import resolve_options
    from conservcheck.runner.size_guard import check_memory

    _outputs(
        {"MODEL": model if os.path.exists(model) else None, "--reference": _local(reference.partition(":")[2])},
        {"--json": json_path},
    )
    opts = resolve_options(
        {
            "device": device,
            "precision": precision,
            "revision": revision,
            "cache_dir": cache_dir,
            "trust_remote_code": trust_remote_code,
        }
    )
    probe = load_model(model, opts, {"device", "precision", "revision", "trust_remote_code"})
    # Trajectories of both fields and their float64 copies: a few arrays of samples × D at once.
    check_memory(
        32 * samples * probe.dim,
        f"transport check would hold about {32 * samples * probe.dim / 2**30:.3g} GB ({samples} samples × "
        f"{probe.dim} components)",
        "lower --samples",
    )
    ref = resolve_reference(reference, probe)
    result = transport_check(probe, ref, n_samples=samples, seed=seed, t_start=t_start, t_end=t_end, n_steps=steps)
    data = {"model": probe.describe(), **result.to_dict()}
    text = json.dumps(data, indent=1, default=str, allow_nan=False) + "\n" if json_path else ""
    if json_path == "-":
        sys.stdout.write(text)
    elif json_path:
        write_atomic(json_path, text)
    console = display.out_console(json_path == "-")
    title = f"transport check — {model} vs {reference}"
    table = Table(title=title, title_justify="left", min_width=len(title), box=box.SIMPLE_HEAD)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for k, v in data.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            table.add_row(str(k), fmt(v))
    console.print(table)


@app.command("selftest")
def selftest_cmd(
    device: str = typer.Option("cpu", "--device", help="Device to check: cpu, cuda or cuda:N."),
) -> None:
    """Run every diagnostic on fields with exact answers on DEVICE (float64 and float32); exit 1 on a miss."""
    from conservcheck.runner.options import resolve_device, resolve_options
    from conservcheck.selftest import selftest

    dev = resolve_device(resolve_options({"device": device})["device"])
    checks = selftest(dev)
    console = display.out_console(False)
    title = f"known-answer self-test on {dev}"
    table = Table(title=title, title_justify="left", min_width=len(title), box=box.SIMPLE_HEAD)
    for name in ("check", "dtype", "value", "bound", "result"):
        table.add_column(name, justify="left" if name in ("check", "result") else "right")
    for c in checks:
        bound = f"≥ {c.bound:.3g}" if c.larger_is_better else f"≤ {c.bound:.3g}"
        table.add_row(c.name, c.dtype, f"{c.value:.3g}", bound, "ok" if c.ok else "FAIL")
    console.print(table)
    failed = sum(not c.ok for c in checks)
    display.line(console, f"selftest: {len(checks) - failed} of {len(checks)} checks passed")
    raise typer.Exit(EXIT_GATE if failed else EXIT_OK)


class _ClosedPipeSafe:
    """A standard stream that a reader closing its end (``… | head``) cannot break: on the first broken
    pipe the stream's file descriptor is pointed at the null device, and the command goes on (files
    written, gates applied, its own exit code) with nothing more shown."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def _silence(self) -> None:
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        except (OSError, ValueError):
            pass

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._silence()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._silence()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``conservcheck`` command."""
    streams = {name: getattr(sys, name) for name in ("stdout", "stderr")}
    for name, stream in streams.items():
        if stream is not None and not isinstance(stream, _ClosedPipeSafe):
            setattr(sys, name, _ClosedPipeSafe(stream))
    try:
        typer.main.get_command(app).main(args=argv, prog_name="conservcheck")
    finally:
        for name, stream in streams.items():
            setattr(sys, name, stream)


if __name__ == "__main__":
    main()
