"""The ``conservcheck`` command: audit, fetch, merge, report, plot, compare, gate, transport and selftest.

A thin layer over the API, one module per command in :mod:`conservcheck.cli.commands`, registered here in the
order ``--help`` lists them. Tables and the verdict go to stdout (to stderr when ``--json -`` or ``--csv -``
put data on stdout); logs and the progress bar go to stderr. typer and rich are imported in
:mod:`conservcheck.cli` only.

One exit-code contract for every command (:mod:`conservcheck.errors`, docs/cli.md), kept here: 0 done, 1 a
``--fail-if`` condition holds (or a self-test check misses), 2 a usage or input error — one line
``error: …`` —, 3 an internal error — one line, the traceback in a log file it names (printed with
``conservcheck --debug``) —, 130 interrupted (Ctrl-C or SIGTERM, with how to resume an audit). A closed
stdout (``… | head``) stops the output and nothing else: files are written, gates applied, and the exit
code is the command's own. Before any work, every output path is checked to be writable and distinct from
every input and from the other outputs (:mod:`conservcheck.cli.outputs`).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

import typer
from typer.core import TyperGroup

from conservcheck.cli.commands import audit, compare, fetch, gate, merge, plot, report, selftest, transport
from conservcheck.cli.console import error
from conservcheck.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, ConservcheckError, reason
from conservcheck.version import __version__


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
    error(
        f"internal error: {what} (a bug in conservcheck: {where}run with conservcheck --debug to print it, "
        "and please report it)"
    )


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


class _Group(TyperGroup):
    """Maps every outcome to the exit-code contract (module doc): one ``error: …`` line, never a traceback
    unless ``--debug``."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            error("interrupted")
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
                error(err.format_message())  # type: ignore[attr-defined]
            sys.exit(getattr(err, "exit_code", EXIT_USAGE))
        except typer.Abort:
            error("aborted")
            sys.exit(EXIT_INTERRUPTED)
        except KeyboardInterrupt:
            error("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        except ConservcheckError as err:
            error(str(err))
            sys.exit(err.exit_code)
        except MemoryError:
            error("out of memory (lower --samples, --points, --block or --batch-size, or set --memory-budget)")
            sys.exit(EXIT_USAGE)
        except BrokenPipeError as err:  # a pipe other than stdout: not the user's doing
            _internal(err)
            sys.exit(EXIT_INTERNAL)
        except OSError as err:  # a file that cannot be read or written: the user's environment, not a bug
            error(f"{err.strerror or err}: {err.filename}" if err.filename else str(err))
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


app.command("audit")(audit.audit_cmd)
app.command("fetch")(fetch.fetch_cmd)
app.command("merge")(merge.merge_cmd)
app.command("plot")(plot.plot_cmd)
app.command("compare")(compare.compare_cmd)
app.command("gate")(gate.gate_cmd)
app.command("report")(report.report_cmd)
app.command("transport")(transport.transport_cmd)
app.command("selftest")(selftest.selftest_cmd)


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
