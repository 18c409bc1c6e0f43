"""The ``conservcheck`` command: audit, merge, plot, compare, gate and transport.

A thin layer over the API: ``conservcheck audit`` has one flag per option of
:func:`conservcheck.runner.options.audit_options` (built from that table) and calls
:func:`conservcheck.runner.audit.audit`. Tables and the verdict go to stdout (to stderr when ``--json -`` or
``--csv -`` put data on stdout); logs and the progress bar go to stderr. Every user mistake prints one
line ``error: …`` and exits with code 2; a ``--fail-if`` condition that holds exits with 1; Ctrl-C (or
SIGTERM, as a batch scheduler sends at its time limit) exits with 130 after saying how to resume. typer
and rich are imported here only.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from conservcheck.cli import display
from conservcheck.errors import ConservcheckError, UsageError
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


class _Group(TyperGroup):
    """Turns every usage mistake into one ``error: …`` line with exit code 2 (never a traceback)."""

    def main(
        self,
        args: Any = None,
        prog_name: Any = None,
        complete_var: Any = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(
                args=args,
                prog_name=prog_name or "conservcheck",
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
        except _click_errors() as err:
            if type(err).__name__ == "NoArgsIsHelpError" and getattr(err, "ctx", None) is not None:
                typer.echo(err.ctx.get_help(), err=True)  # type: ignore[attr-defined]
            else:
                _error(err.format_message())  # type: ignore[attr-defined]
            sys.exit(getattr(err, "exit_code", 2))
        except typer.Abort:
            _error("aborted")
            sys.exit(130)
        except ConservcheckError as err:
            _error(str(err))
            sys.exit(err.exit_code)
        except OSError as err:  # a file that cannot be read or written: the user's environment, not a bug
            _error(f"{err.strerror or err}: {err.filename}" if err.filename else str(err))
            sys.exit(2)
        sys.exit(rv if isinstance(rv, int) else 0)


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
) -> None:
    """conservcheck: is a diffusion model's vector field a score (a conservative field)?"""


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
    """A progress callback drawing one bar with ETA on stderr; None when stderr is not a terminal."""
    if not (enabled and err.is_terminal):
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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


def _writable(*paths: str | None) -> None:
    """Refuse output paths that cannot be written before any work is spent."""
    for p in paths:
        if not p or p == "-":
            continue
        folder = os.path.dirname(os.path.abspath(p))
        if not os.path.isdir(folder):
            raise UsageError(f"cannot write {p}: folder {folder} does not exist", "create it or choose another path")
        if not os.access(folder, os.W_OK) or os.path.isdir(p):
            raise UsageError(f"cannot write {p}", "choose a writable file path")


def _gates(texts: list[str]) -> list[Any]:
    from conservcheck.report.gate import parse

    return [parse(t) for t in texts]


def _apply_gates(exprs: list[Any], report: Any, junit: str | None, console: Console) -> int:
    from conservcheck.report.gate import evaluate, write_junit

    results = [evaluate(e, report) for e in exprs]
    for r in results:
        display.line(console, f"gate {'FAIL' if r.holds else 'ok'}: {r.expression.text}")
        for d in r.details[:10]:
            display.line(console, f"  {d}")
    if junit:
        write_junit(junit, results, report)
    return 1 if any(r.holds for r in results) else 0


# ---------------------------------------------------------------------------------------------- audit


def _check_outputs(json_path: str | None, csv_path: str | None, junit: str | None, exprs: list[Any]) -> None:
    if json_path == "-" and csv_path == "-":
        raise UsageError("--json - and --csv - would both write to stdout", "write one of them to a file")
    if junit and not exprs:
        raise UsageError("--junit needs at least one --fail-if condition", "add --fail-if 'verdict != pass'")
    _writable(json_path, csv_path, junit)


def _finish_report(
    report: Any, json_path: str | None, csv_path: str | None, junit: str | None, exprs: list[Any]
) -> None:
    """Write the report files (each atomically), print tables and verdict, apply the gates, exit."""
    console = display.out_console(json_path == "-" or csv_path == "-")
    if json_path:
        report.to_json(json_path)
    if csv_path:
        report.to_csv(csv_path)
    display.show(report, console)
    code = _apply_gates(exprs, report, junit, console) if exprs else 0
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
    **options: Any,
) -> None:
    from conservcheck.runner.audit import AuditInterrupted, audit

    exprs = _gates(fail_if or [])
    _check_outputs(json_path, csv_path, junit, exprs)
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    with _logging(quiet) as err, _terminate_as_interrupt():
        try:
            with _progress(err, not quiet) as progress:
                report = audit(model, progress=progress, **given)
        except AuditInterrupted as stop:
            _error(f"interrupted; {stop.n_done} finished units are saved — resume with {stop.resume_flags}")
            raise typer.Exit(130) from None
        except KeyboardInterrupt:
            _error("interrupted before any unit finished (nothing to resume; run the command again)")
            raise typer.Exit(130) from None
    _finish_report(report, json_path, csv_path, junit, exprs)


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
    ]
    return params


def _audit_command(**kwargs: Any) -> None:
    """Audit a model: loop integrals, curl and Stein diagnostics at several time points.

    Prints one table per diagnostic (rows: time points; columns: statistics) and a one-line verdict.
    Exit codes: 0 done, 1 a --fail-if condition holds, 2 usage error, 130 interrupted (Ctrl-C, SIGTERM).
    """
    _run_audit(**kwargs)


_audit_command.__signature__ = inspect.Signature(_audit_signature())  # type: ignore[attr-defined]
_audit_command.__annotations__ = {p.name: p.annotation for p in _audit_signature()}
app.command("audit")(_audit_command)


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
) -> None:
    """Combine the partial-results files of a sharded audit into its report (that of an unsharded run).

    Refuses files of different audits, and names the missing units, their shard and the command that
    finishes them when the files do not hold every unit. Exit codes as for audit.
    """
    from conservcheck.runner.merge import merge

    exprs = _gates(fail_if or [])
    _check_outputs(json_path, csv_path, junit, exprs)
    with _logging(quiet):
        report = merge(journals)
    _finish_report(report, json_path, csv_path, junit, exprs)


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
    for path in plot_report(_read(report), out, fmt):
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
            table.add_row(label, display.fmt(r["median_a"]), display.fmt(r["median_b"]), display.fmt(r["ratio"]))
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
    junit: str | None = typer.Option(None, "--junit", metavar="PATH", help="Write JUnit XML."),
) -> None:
    """Check --fail-if conditions on an existing report (exit 1 when one holds)."""
    exprs = _gates(fail_if)
    _writable(junit)
    rep = _read(report)
    console = display.out_console(False)
    display.line(console, f"verdict: {rep.verdict}")
    raise typer.Exit(_apply_gates(exprs, rep, junit, console))


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
    ref = resolve_reference(reference, probe)
    kw = {k: v for k, v in (("t_start", t_start), ("t_end", t_end)) if v is not None}
    result = transport_check(probe, ref, n_samples=samples, seed=seed, n_steps=steps, **kw)
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
            table.add_row(str(k), display.fmt(v))
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
    raise typer.Exit(1 if failed else 0)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``conservcheck`` command."""
    typer.main.get_command(app).main(args=argv, prog_name="conservcheck")


if __name__ == "__main__":
    main()
