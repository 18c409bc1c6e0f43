"""How far an audit has come: a callback for API users and periodic log lines for everyone else.

Work is counted in estimated model evaluations (:mod:`conservcheck.runner.estimate`). :class:`ProgressLog`
calls the optional callback ``progress(done, total, description)`` as x0 sampling starts and as each unit
finishes, and logs one line on the logger ``conservcheck.progress`` at most every ``interval`` seconds —
also from the batcher between model batches (:meth:`ProgressLog.tick`, with the rows just evaluated, which
count towards the running unit), so a long unit is not silent:

    progress 41%: 15 of 36 units, now loop.brownian model k=250; 21 s elapsed, about 30 s left

A terminal's progress bar replaces these lines (the CLI turns the logger down while it draws one); with
stderr redirected to a file or a CI log they are what shows the audit is alive. The time left is the
work left at the rate measured so far (before any model batch has finished, at the estimate's rate).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from conservcheck.runner.estimate import duration_text

log = logging.getLogger("conservcheck.progress")

Progress = Callable[[float, float, str], None]

#: Seconds between two progress lines.
INTERVAL = 10.0


class ProgressLog:
    """Progress of one audit (module doc).

    Args:
        total: the audit's work in model evaluations.
        n_units: the units the audit will run (for the "k of n units" count).
        callback: ``progress(done, total, description)``, or None.
        seconds_per_eval: the estimate's rate, used until some work has finished; None if unknown.
        interval: seconds between two log lines (default :data:`INTERVAL`).
        clock: the time source (seconds).
    """

    def __init__(
        self,
        total: float,
        n_units: int,
        callback: Progress | None = None,
        seconds_per_eval: float | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.total = max(float(total), 1e-9)
        self.n_units = n_units
        self.callback = callback
        self.seconds_per_eval = seconds_per_eval
        self.interval = INTERVAL if interval is None else interval
        self.clock = clock
        self.start = clock()
        self.last_line = self.start
        self.done = 0.0
        self.units_done = 0
        self.now = "starting"
        self.current = 0.0
        self.partial = 0.0

    @property
    def progress(self) -> float:
        """Work done, in model evaluations: finished work and the rows evaluated so far of the current piece
        (at most its planned work; a Jacobian product's row counts as one)."""
        return min(self.total, self.done + min(self.partial, self.current))

    def begin(self, description: str, work: float = 0.0, notify: bool = False) -> None:
        """Work on ``description`` (``work`` model evaluations) starts: the next line names it; the callback
        hears of it with ``notify``."""
        self.now, self.current, self.partial = description, float(work), 0.0
        self._report(description, notify)

    def advance(self, work: float, description: str, unit: bool = True) -> None:
        """``work`` model evaluations finished: a unit, when ``unit`` (the callback hears of units only)."""
        self.done = min(self.total, self.done + work)
        self.current = self.partial = 0.0
        self.units_done += int(unit)
        self._report(description, unit)

    def tick(self, rows: int = 0) -> None:
        """Called between model batches with the rows just evaluated; a line if ``interval`` has passed."""
        self.partial += rows
        self._report(self.now, False)

    def left(self) -> float | None:
        """Seconds left at the rate so far (the estimate's rate before any work is done); None if unknown."""
        elapsed, done = self.clock() - self.start, self.progress
        rate = elapsed / done if done > 0 else self.seconds_per_eval
        return None if rate is None else (self.total - done) * rate

    def line(self) -> str:
        elapsed = self.clock() - self.start
        left = self.left()
        eta = f", about {duration_text(left)} left" if left is not None else ""
        return (
            f"progress {100 * self.progress / self.total:.0f}%: {self.units_done} of {self.n_units} units, "
            f"now {self.now}; {duration_text(elapsed)} elapsed{eta}"
        )

    def _report(self, description: str, notify: bool) -> None:
        if notify and self.callback is not None:
            self.callback(self.progress, self.total, description)
        now = self.clock()
        if now - self.last_line >= self.interval:
            self.last_line = now
            log.info("%s", self.line())


__all__ = ["INTERVAL", "Progress", "ProgressLog"]
