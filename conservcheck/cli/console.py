"""What a command writes to stderr besides its data: the one-line ``error: …``, the logs, the progress bar."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console

log = logging.getLogger("conservcheck")


def error(message: str) -> None:
    """The one line of a usage, input or internal error on stderr (whitespace folded to single spaces)."""
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)


@contextmanager
def logging_to_stderr(quiet: bool) -> Iterator[Console]:
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
def progress_bar(err: Console, enabled: bool) -> Iterator[Any]:
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
