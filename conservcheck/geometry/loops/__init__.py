"""Closed loops for the integral constraint (paper §3.2), one registered loop type per module.

A :class:`LoopType` says how to build a batch of loops around clean samples at one time point and which
quadrature rules it supports; every loop type returns a :class:`~conservcheck.geometry.loops.batch.LoopBatch`,
so the loop-integral diagnostic treats them all alike. The built-in types:

* ``rotation`` (:mod:`.rotation`) — the noise ε of x_t = α x0 + σ ε rotated in randomly paired planes;
* ``brownian`` (:mod:`.brownian`) — x_t plus a Brownian bridge (out of distribution on purpose);
* ``projection`` (:mod:`.projection`) — noisy copies of one x0 joined on the noise shell;
* ``rectangle`` (:mod:`.rectangle`) — an axis-aligned rectangle in a random coordinate plane through x_t.

More are added through the entry-point group ``conservcheck.loops`` (name → ``module:LOOP``, a
:class:`LoopType`); docs/extending.md shows how. Randomness is keyed by (seed, path, time key, global
sample index), so a loop never depends on which other loops are built beside it. All geometry is float64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from conservcheck import plugins
from conservcheck.errors import UsageError
from conservcheck.geometry.loops.batch import Index, LoopBatch, loop_sums
from conservcheck.settings import Option
from conservcheck.timepoints import TimePoint

GROUP = "conservcheck.loops"
BUILTIN: dict[str, str] = {
    "rotation": "conservcheck.geometry.loops.rotation:LOOP",
    "brownian": "conservcheck.geometry.loops.brownian:LOOP",
    "projection": "conservcheck.geometry.loops.projection:LOOP",
    "rectangle": "conservcheck.geometry.loops.rectangle:LOOP",
}


@dataclass(frozen=True)
class LoopType:
    """One kind of closed loop.

    Attributes:
        name: the name used by ``--paths`` and in reports (the diagnostic's variant).
        build: ``build(x0, time, seed, *, n_points, rule, index, **params) -> LoopBatch``: one loop per
            row of x0 [B, *shape] at ``time``; row b has global sample index ``index`` (+ b).
        rules: the quadrature rules it supports; the first is its default.
        summary: one line for the docs and ``--help``.
        options: its own audit options; ``params`` holds their values, by option name.
        adaptive: whether ``n_points="auto"`` may refine it until the quadrature converges (False when
            refining changes the loop itself, as for a Brownian bridge).
        cpu_points: its nodes per loop in a CPU audit without ``--points``: what its default rule needs to
            resolve the loop integral (a GPU audit uses the paper's 1000 for every loop type).
        in_default: part of the audit's default ``--paths``.
        describe: ``describe(params, dim, time, seed) -> dict``: what the report's unit meta records about
            the loops beyond the rule and node count.
    """

    name: str
    build: Callable[..., LoopBatch]
    rules: tuple[str, ...]
    summary: str
    options: tuple[Option, ...] = ()
    adaptive: bool = True
    cpu_points: int = 128
    in_default: bool = True
    describe: Callable[[dict[str, Any], int, TimePoint, int], dict[str, Any]] | None = None

    @property
    def default_rule(self) -> str:
        return self.rules[0]

    def check_rule(self, rule: str) -> str:
        """``rule`` (``auto`` → the default rule) if this loop type supports it; else a UsageError."""
        rule = self.default_rule if rule in ("auto", None) else rule
        if rule not in self.rules:
            raise UsageError(
                f"rule {rule!r} is not available for {self.name} loops", f"use one of auto, {', '.join(self.rules)}"
            )
        return rule

    def params(self, values: dict[str, Any]) -> dict[str, Any]:
        """Its own options' values from ``values`` (the defaults for those not given)."""
        return {o.name: values.get(o.name, o.default) for o in self.options}


def registered() -> dict[str, LoopType]:
    """Every loop type by name: built-ins first, then those of the ``conservcheck.loops`` entry points.

    A third-party loop type that cannot be imported is left out (it is named in the error when asked for).
    """
    out: dict[str, LoopType] = {}
    for entry in plugins.entries(GROUP, BUILTIN):
        try:
            loop = entry.load()
        except Exception:
            if entry.builtin:
                raise
            continue
        out[entry.name] = loop
    return out


def get(name: str) -> LoopType:
    """The loop type registered as ``name``."""
    loops = registered()
    if name not in loops:
        raise UsageError(f"unknown loop path {name!r}", f"use one of {', '.join(loops)}")
    return loops[name]


def loop_options() -> tuple[Option, ...]:
    """The audit options of every registered loop type, each once, in registration order."""
    seen: dict[str, Option] = {}
    for loop in registered().values():
        for o in loop.options:
            seen.setdefault(o.name, o)
    return tuple(seen.values())


def check_options(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` if every key is an option of some registered loop type; else a UsageError naming it."""
    known = {o.name for o in loop_options()}
    unknown = [k for k in params if k not in known]
    if unknown:
        raise UsageError(f"unknown loop option {unknown[0]!r}", f"loop options: {', '.join(sorted(known))}")
    return params


def make_loops(
    path: str,
    x0: Tensor,
    time: TimePoint,
    seed: int,
    *,
    n_points: int = 1000,
    rule: str | None = None,
    index: Index = 0,
    **params: Any,
) -> LoopBatch:
    """Loops of the named ``path`` with ``rule`` (its default if None) around x0 [B, *shape].

    ``params`` are loop-type options by name (``n_vertices``, ``bridge_u``, ...); those of other loop
    types are ignored, so one set of audit options serves every path.
    """
    loop = get(path)
    return loop.build(
        x0,
        time,
        seed,
        n_points=n_points,
        rule=loop.check_rule(rule or "auto"),
        index=index,
        **loop.params(check_options(params)),
    )


__all__ = [
    "GROUP",
    "LoopBatch",
    "LoopType",
    "check_options",
    "get",
    "loop_options",
    "loop_sums",
    "make_loops",
    "registered",
]
