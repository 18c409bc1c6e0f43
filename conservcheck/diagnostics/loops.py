"""The integral-constraint diagnostic: ∮ s·dy around closed loops at one time point (paper §3.2).

A score is a gradient, so its loop integral vanishes around every closed loop (Eq. 4). For each clean
sample x0 this builds one loop through (or around) the forward sample x_t (:mod:`conservcheck.paths`),
evaluates the probe at the loop's nodes in batches, and reports per loop:

=========================  ==========================================================================
column                     value
=========================  ==========================================================================
``circulation``            ∮ s·dy (Eq. 4); dimensionless (score 1/data × data), a log-density change
``abs_circulation``        |∮ s·dy|
``length``                 ∮|dy| (data units)
``circulation_per_length`` ∮ s·dy / ∮|dy| (score units; the paper's Fig. 3 / Fig. 12 normalisation)
``eq7``                    2 ∮ s·dy / ∮|y||dy| (Eq. 7; 1/data units², a pure number in the OU
                           process's unit-variance coordinates: the score drift 2s against the drift y)
``circulation_ratio``      ∮ s·dy / ∮|s||dy| ∈ [−1, 1] (scale free: ±1 only if s ∥ dy everywhere)
``quad_error``             |I_N − I_coarse|, the nested-rule error estimate of ∮ s·dy
``abs_score_length``       ∮|s||dy| (dimensionless), the denominator of ``circulation_ratio``
``abs_y_length``           ∮|y||dy| (data units²), the denominator of ``eq7``
``n_points``               the number of nodes N the values were computed with
``converged``              1.0 if quad_error ≤ max(tol·|∮ s·dy|, floor·∮|s||dy|), else 0.0
=========================  ==========================================================================

``quad_error`` compares the rule with its nested coarse half (every second node): for the spectral
rules (periodic, Clenshaw–Curtis) it is about the error of the coarse value, so it over-estimates the
error of ∮ s·dy; for the polygon rule on a smooth loop it is about three times the error.

``n_points="auto"`` (rotation and projection loops) starts at 16 nodes and doubles until ``converged``
or the next doubling would pass 4096 nodes. Every rule is nested, so each doubling evaluates only the
new half of the nodes. The floor is the relative rounding level the probe's precision can resolve
(:data:`FLOOR_REL`); without it a conservative field, whose ∮ s·dy is rounding noise, could never
meet a relative tolerance. Brownian loops have no limit to converge to (refining a bridge adds detail
to the loop itself; its length grows like √N), so for them ``"auto"`` means the paper's fixed
N = 1000 (:data:`BROWNIAN_AUTO_POINTS`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..engine import Batcher, evaluate
from ..errors import UsageError
from ..paths import DEFAULT_RULES, PATH_RULES, LoopBatch, make_loops, shell_radius
from ..probe import VectorFieldProbe
from ..quadrature import loop_sums
from .base import DiagnosticResult, TimePoint

AUTO_START = 16
AUTO_CAP = 4096
# Smallest |∮ s·dy| / ∮|s||dy| a probe's forward precision resolves: ~10⁴ unit roundoffs for fp64
# (2^-53), ~16 for fp32 (2^-24), ~2 for tf32 (2^-11) and bf16 (2^-8), whose rounding is the noise.
FLOOR_REL: dict[str, float] = {"fp64": 1e-12, "fp32": 1e-6, "tf32": 1e-3, "bf16": 1e-2}
MAX_CHUNK_ELEMENTS = 2**24  # ≈ 0.8 GB at the ~50 bytes per element the geometry and sums take at peak
BROWNIAN_AUTO_POINTS = 1000

COLUMNS = (
    "circulation",
    "abs_circulation",
    "length",
    "circulation_per_length",
    "eq7",
    "circulation_ratio",
    "quad_error",
    "abs_score_length",
    "abs_y_length",
    "n_points",
    "converged",
)


def _check(
    probe: VectorFieldProbe, x0: Tensor, path: str, rule: str, n_points: int | str, tol: float, start: int
) -> str:
    if tuple(x0.shape[1:]) != probe.sample_shape or x0.ndim < 2 or x0.shape[0] == 0:
        raise UsageError(
            f"x0 has shape {tuple(x0.shape)}, expected [B, {', '.join(map(str, probe.sample_shape))}] with B ≥ 1",
            "pass a batch of clean samples in the probe's data coordinates",
        )
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise UsageError(f"start must be a non-negative integer, got {start!r}", "pass the global index of x0[0]")
    if path not in PATH_RULES:
        raise UsageError(f"unknown loop path {path!r}", f"use one of {', '.join(PATH_RULES)}")
    rule = DEFAULT_RULES[path] if rule == "auto" else rule
    if rule not in PATH_RULES[path]:
        raise UsageError(
            f"rule {rule!r} is not available for {path} loops", f"use one of auto, {', '.join(PATH_RULES[path])}"
        )
    fixed_ok = isinstance(n_points, int) and not isinstance(n_points, bool) and 4 <= n_points <= 10**6
    if n_points != "auto" and not fixed_ok:
        raise UsageError(f"n_points must be 'auto' or an integer in [4, 10⁶], got {n_points!r}", "the paper uses 1000")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise UsageError(f"tol must be a positive number, got {tol!r}", "use e.g. 1e-6")
    return rule


def loop_diagnostic(
    probe: VectorFieldProbe,
    x0: Tensor,
    time: TimePoint,
    *,
    seed: int,
    batcher: Batcher,
    path: str = "rotation",
    n_points: int | str = 1000,
    rule: str = "auto",
    tol: float = 1e-6,
    n_vertices: int = 8,
    bridge_U: float = 9.0,
    start: int = 0,
    max_chunk_elements: int = MAX_CHUNK_ELEMENTS,
) -> DiagnosticResult:
    """Loop integrals ∮ s·dy (Eq. 4) and their normalisations (Eq. 7) for one loop per clean sample.

    Args:
        probe: the field, evaluated at canonical time ``time.t``.
        x0: clean samples [B, *sample_shape]; sample b has global index ``start + b`` in every random
            stream, so splitting x0 into chunks (with matching ``start``) gives identical loops.
        time: the time point (α, σ and the stream key).
        seed: audit seed.
        batcher: runs the probe over flattened [loops × nodes] rows.
        path: ``rotation`` (default), ``projection`` or ``brownian``.
        n_points: nodes per loop (paper: 1000; rounded up to even, and for projection to an even
            number per edge), or ``"auto"`` (adaptive doubling from 16 to at most 4096, see module doc;
            for Brownian loops the paper's fixed 1000).
        rule: ``auto`` (periodic for rotation, clenshaw_curtis for projection, polygon for brownian),
            or ``periodic`` / ``polygon`` / ``clenshaw_curtis`` where the path allows it.
        tol: relative tolerance on ∮ s·dy for ``converged`` and ``n_points="auto"``.
        n_vertices: K, noisy copies per projection loop (paper: several; default 8).
        bridge_U: fictitious time U of the Brownian bridge (paper: 9).
        start: global sample index of x0[0].
        max_chunk_elements: at most this many node components (loops × nodes × D) are held at once.
    Returns:
        ``DiagnosticResult(diagnostic="loop", variant=path)`` with the columns listed in the module
        docstring (float64 CPU, [B]) and meta: rule, n_points (requested), n_points_max, n_evals
        (forward passes), tol, floor_rel, and n_vertices / shell_radius or bridge_U where they apply.
    """
    rule = _check(probe, x0, path, rule, n_points, tol, start)
    auto = n_points == "auto" and path != "brownian"
    n0 = AUTO_START if auto else BROWNIAN_AUTO_POINTS if n_points == "auto" else int(n_points)
    floor_rel = FLOOR_REL[probe.precision]
    dim = probe.dim
    bsz = x0.shape[0]
    x0 = x0.to(device=probe.device, dtype=torch.float64)
    out = {c: torch.zeros(bsz, dtype=torch.float64) for c in COLUMNS}
    n_evals = 0

    def build(rows: Tensor, n: int) -> LoopBatch:
        return make_loops(
            path, x0[rows.to(x0.device)], time, seed, n_points=n, rule=rule, index=(start + rows).tolist(),
            n_vertices=n_vertices, bridge_U=bridge_U,
        )

    def run(points: Tensor) -> Tensor:
        nonlocal n_evals
        flat = points.reshape(-1, *probe.sample_shape)
        n_evals += flat.shape[0]
        return evaluate(probe, flat, time.t, batcher=batcher).reshape(points.shape)

    def chunks(rows: Tensor, n: int) -> list[Tensor]:
        per = max(1, max_chunk_elements // max(1, n * dim))
        return list(torch.split(rows, per))

    # Depth-first work list of (rows, N, scores at the N/2 nodes of the previous level or None).
    work: list[tuple[Tensor, int, Tensor | None]] = [(r, n0, None) for r in reversed(chunks(torch.arange(bsz), n0))]
    while work:
        rows, n, prev = work.pop()
        loops = build(rows, n)
        n_actual = loops.n_points
        if prev is None:
            scores = run(loops.points)
        else:
            scores = torch.empty(loops.points.shape, dtype=prev.dtype, device=prev.device)
            scores[:, 0::2] = prev
            scores[:, 1::2] = run(loops.points[:, 1::2])
        sums = loop_sums(scores, loops)
        circ = sums["circulation"]
        err = (circ - sums["circulation_coarse"]).abs()
        ok = err <= torch.maximum(tol * circ.abs(), floor_rel * sums["abs_score_length"])
        done = ok | torch.tensor(not auto or 2 * n_actual > AUTO_CAP, device=ok.device)
        _record(out, rows[done.cpu()], sums, err, ok, n_actual, done)
        if not bool(done.all()):
            todo = (~done).cpu()
            rest, rest_scores = rows[todo], scores[todo.to(scores.device)]
            parts = chunks(torch.arange(rest.shape[0]), 2 * n_actual)
            work.extend((rest[p], 2 * n_actual, rest_scores[p.to(scores.device)]) for p in reversed(parts))
    meta: dict[str, Any] = {
        "rule": rule,
        "n_points": n_points,
        "n_points_max": int(out["n_points"].max()),
        "n_evals": n_evals,
        "tol": float(tol),
        "floor_rel": floor_rel,
        "path": path,
    }
    if path == "projection":
        meta["n_vertices"] = n_vertices
        meta["shell_radius"] = shell_radius(dim, time.sigma, seed)
    if path == "brownian":
        meta["bridge_U"] = float(bridge_U)
    return DiagnosticResult("loop", path, time, out, meta)


def _record(
    out: dict[str, Tensor], rows: Tensor, sums: dict[str, Tensor], err: Tensor, ok: Tensor, n: int, done: Tensor
) -> None:
    """Write the finished loops' values into the [B] output columns."""
    s = {k: v[done].cpu() for k, v in sums.items()}
    circ = s["circulation"]
    out["circulation"][rows] = circ
    out["abs_circulation"][rows] = circ.abs()
    out["length"][rows] = s["length"]
    out["circulation_per_length"][rows] = circ / s["length"]
    out["eq7"][rows] = 2 * circ / s["abs_y_length"]
    out["circulation_ratio"][rows] = circ / s["abs_score_length"]
    out["quad_error"][rows] = err[done].cpu()
    out["abs_score_length"][rows] = s["abs_score_length"]
    out["abs_y_length"][rows] = s["abs_y_length"]
    out["n_points"][rows] = float(n)
    out["converged"][rows] = ok[done].cpu().to(torch.float64)


__all__ = ["AUTO_CAP", "AUTO_START", "BROWNIAN_AUTO_POINTS", "COLUMNS", "FLOOR_REL", "loop_diagnostic"]
