"""How far an audit has come: a callback for API users and periodic log lines for everyone else.

Work is counted in estimated model evaluations (:mod:`conservcheck.runner.estimate`). :class:`ProgressLog`
calls the optional callback ``progress(done, total, description)`` whenever work finishes, and logs one
line on the logger ``conservcheck.progress`` at most every ``interval`` seconds — when work finishes, and
from the batcher between model batches (:meth:`ProgressLog.tick`), so a long unit is not silent:

    progress 41%: 15 of 36 units, now loop.brownian model k=250; 21 s elapsed, about 30 s left

A terminal's progress bar replaces these lines (the CLI turns the logger down while it draws one); with
stderr redirected to a file or a CI log they are what shows the audit is alive. The time left is the
work left at the rate measured so far (at the start, at the estimate's rate).
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

    def begin(self, description: str) -> None:
        """Work on ``description`` starts (what the next line says is running)."""
        self.now = description
        if self.callback is not None:
            self.callback(self.done, self.total, description)
        self._maybe_log()

    def advance(self, work: float, description: str, unit: bool = True) -> None:
        """``work`` model evaluations finished (a unit, when ``unit``)."""
        self.done = min(self.total, self.done + work)
        self.units_done += int(unit)
        if self.callback is not None:
            self.callback(self.done, self.total, description)
        self._maybe_log()

    def tick(self) -> None:
        """Called between model batches: a line if ``interval`` has passed since the last one."""
        self._maybe_log()

    def left(self) -> float | None:
        """Seconds left at the rate so far (the estimate's rate before any work finished); None if unknown."""
        elapsed = self.clock() - self.start
        rate = elapsed / self.done if self.done > 0 else self.seconds_per_eval
        return None if rate is None else (self.total - self.done) * rate

    def line(self) -> str:
        elapsed = self.clock() - self.start
        left = self.left()
        eta = f", about {duration_text(left)} left" if left is not None else ""
        return (
            f"progress {100 * self.done / self.total:.0f}%: {self.units_done} of {self.n_units} units, "
            f"now {self.now}; {duration_text(elapsed)} elapsed{eta}"
        )

    def _maybe_log(self) -> None:
        now = self.clock()
        if now - self.last_line >= self.interval:
            self.last_line = now
            log.info("%s", self.line())


__all__ = ["INTERVAL", "Progress", "ProgressLog"]
