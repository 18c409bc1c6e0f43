"""The integral-constraint diagnostic: ∮ s·dy around closed loops at one time point (paper §3.2).

A score is a gradient, so its loop integral vanishes around every closed loop (Eq. 4). For each clean
sample x0 this builds one loop through (or around) the forward sample x_t (:mod:`conservcheck.geometry.loops`),
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

``n_points="auto"`` (loop types that can be refined: rotation, projection, rectangle) starts at 16
nodes and doubles until ``converged`` or the next doubling would pass 4096 nodes. Every rule is nested,
so each doubling evaluates only the new half of the nodes. The floor is the relative rounding level the
probe's precision can resolve (:func:`conservcheck.precision.floor_rel`); without it a conservative
field, whose ∮ s·dy is rounding noise, could never
meet a relative tolerance. A loop type that refinement changes (a Brownian bridge gains detail; its
length grows like √N) has no limit to converge to, so for it ``"auto"`` means the paper's fixed
N = 1000 (:data:`FIXED_AUTO_POINTS`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from conservcheck import precision, settings
from conservcheck.batching import Batcher, evaluate
from conservcheck.diagnostics import ANY, Diagnostic, Figure, Variant
from conservcheck.diagnostics.result import DiagnosticResult, ratio
from conservcheck.errors import UsageError
from conservcheck.geometry import loops
from conservcheck.geometry.loops import LoopBatch, loop_sums
from conservcheck.probe import VectorFieldProbe
from conservcheck.settings import Option
from conservcheck.timepoints import SampleIndex, TimePoint, sample_index

AUTO_START = 16
AUTO_CAP = 4096
PAPER_POINTS = 1000
MAX_CHUNK_ELEMENTS = 2**24  # ≈ 0.8 GB at the ~50 bytes per element the geometry and sums take at peak
FIXED_AUTO_POINTS = 1000

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
    probe: VectorFieldProbe, x0: Tensor, path: str, rule: str, n_points: int | str, tol: float, start: SampleIndex
) -> tuple[str, list[int]]:
    if tuple(x0.shape[1:]) != probe.sample_shape or x0.ndim < 2 or x0.shape[0] == 0:
        raise UsageError(
            f"x0 has shape {tuple(x0.shape)}, expected [B, {', '.join(map(str, probe.sample_shape))}] with B ≥ 1",
            "pass a batch of clean samples in the probe's data coordinates",
        )
    index = sample_index(start, x0.shape[0])
    rule = loops.get(path).check_rule(rule)
    fixed_ok = isinstance(n_points, int) and not isinstance(n_points, bool) and 4 <= n_points <= 10**6
    if n_points != "auto" and not fixed_ok:
        raise UsageError(f"n_points must be 'auto' or an integer in [4, 10⁶], got {n_points!r}", "the paper uses 1000")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise UsageError(f"tol must be a positive number, got {tol!r}", "use e.g. 1e-6")
    return rule, index


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
    start: SampleIndex = 0,
    max_chunk_elements: int = MAX_CHUNK_ELEMENTS,
    **loop_options: Any,
) -> DiagnosticResult:
    """Loop integrals ∮ s·dy (Eq. 4) and their normalisations (Eq. 7) for one loop per clean sample.

    Args:
        probe: the field, evaluated at canonical time ``time.t``.
        x0: clean samples [B, *sample_shape]; sample b has global index ``start + b`` in every random
            stream, so splitting x0 into chunks (with matching ``start``) gives identical loops.
        time: the time point (α, σ and the stream key).
        seed: audit seed.
        batcher: runs the probe over flattened [loops × nodes] rows.
        path: a registered loop type (:mod:`conservcheck.geometry.loops`): ``rotation`` (default),
            ``projection``, ``brownian``, ``rectangle``, ...
        n_points: nodes per loop (paper: 1000; rounded up to even, and for loops made of edges to an even
            number per edge), or ``"auto"`` (adaptive doubling from 16 to at most 4096, see module doc;
            for loop types that refinement changes, the paper's fixed 1000).
        rule: ``auto`` (the loop type's default: periodic for rotation, clenshaw_curtis for projection and
            rectangle, polygon for brownian), or another rule the loop type supports.
        tol: relative tolerance on ∮ s·dy for ``converged`` and ``n_points="auto"``.
        start: global sample index of x0[0], or one global index per sample.
        max_chunk_elements: at most this many node components (loops × nodes × D) are held at once.
        **loop_options: the loop types' own options (``n_vertices`` for projection loops, ``bridge_u``
            for Brownian ones, ``rect_side`` for rectangles); each loop type reads its own.
    Returns:
        ``DiagnosticResult(diagnostic="loop", variant=path)`` with the columns listed in the module
        docstring (float64 CPU, [B]) and meta: rule, n_points (requested), n_points_max, n_evals
        (forward passes), tol, floor_rel, path, and what the loop type describes (projection: n_vertices,
        shell_radius; brownian: bridge_U; rectangle: rect_side and its length in data units).
    """
    rule, index = _check(probe, x0, path, rule, n_points, tol, start)
    loop = loops.get(path)
    params = loop.params(loops.check_options(loop_options))
    auto = n_points == "auto" and loop.adaptive
    n0 = AUTO_START if auto else FIXED_AUTO_POINTS if n_points == "auto" else int(n_points)
    floor_rel = precision.floor_rel(probe.precision)
    dim = probe.dim
    bsz = x0.shape[0]
    x0 = x0.to(device=probe.device, dtype=torch.float64)
    out = {c: torch.zeros(bsz, dtype=torch.float64) for c in COLUMNS}
    n_evals = 0

    def build(rows: Tensor, n: int) -> LoopBatch:
        return loop.build(
            x0[rows.to(x0.device)], time, seed, n_points=n, rule=rule, index=[index[r] for r in rows.tolist()], **params
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
        batch = build(rows, n)
        n_actual = batch.n_points
        if prev is None:
            scores = run(batch.points)
        else:
            scores = torch.empty(batch.points.shape, dtype=prev.dtype, device=prev.device)
            scores[:, 0::2] = prev
            scores[:, 1::2] = run(batch.points[:, 1::2])
        sums = loop_sums(scores, batch)
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
    if loop.describe is not None:
        meta.update(loop.describe(params, dim, time, seed))
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
    out["circulation_per_length"][rows] = ratio(circ, s["length"])
    out["eq7"][rows] = ratio(2 * circ, s["abs_y_length"])
    out["circulation_ratio"][rows] = ratio(circ, s["abs_score_length"])
    out["quad_error"][rows] = err[done].cpu()
    out["abs_score_length"][rows] = s["abs_score_length"]
    out["abs_y_length"][rows] = s["abs_y_length"]
    out["n_points"][rows] = float(n)
    out["converged"][rows] = ok[done].cpu().to(torch.float64)


# --------------------------------------------------------------------------------------------- registry

#: Peak bytes per loop-geometry element (loop × node × data component) while a chunk of loops is built,
#: evaluated and summed: about five float64 arrays of nodes, quadrature weights and sums (the geometry is
#: float64 whatever the model's dtype), plus the scores in the probe's dtype and, below float64, their
#: float64 copy. Measured with ru_maxrss (D = 512, 64 loops × 256 nodes): fp32 48–52 bytes, fp64 44–49.
LOOP_GEOMETRY_BYTES = 5 * 8
#: Nodes per loop assumed by the plan's cost estimate for ``n_points="auto"``.
AUTO_COST_POINTS = 64


def loop_bytes_per_element(dtype: torch.dtype) -> int:
    """Peak bytes per loop node component at the probe's ``dtype`` (see :data:`LOOP_GEOMETRY_BYTES`):
    52 for float32, 48 for float64."""
    item = torch.finfo(dtype).bits // 8
    return LOOP_GEOMETRY_BYTES + item + (8 if item < 8 else 0)


def loop_chunk_elements(memory_budget: int, dtype: torch.dtype) -> int:
    """Loop node components (loops × nodes × D) one chunk may hold under ``memory_budget`` bytes."""
    return max(1, memory_budget // loop_bytes_per_element(dtype))


def _parse_paths(value: Any) -> tuple[str, ...]:
    names = loops.registered()
    choices = [str(v).strip().lower() for v in settings.items(value)]
    expected = "a comma-separated subset of " + ", ".join(names) + " (or all, none)"
    if not choices and isinstance(value, str):  # an empty --paths is a mistake, not a silent "none"
        raise settings.fail("--paths", expected, value, "write --paths none to audit no loop")
    if choices in (["none"], []):
        return ()
    if choices == ["all"]:
        return tuple(names)
    bad = [v for v in choices if v not in names]
    if bad:
        raise settings.fail("--paths", expected, bad[0])
    return tuple(dict.fromkeys(choices))


def loop_points(n_points: int | str | None, paths: Iterable[str], device: torch.device) -> dict[str, int | str]:
    """Nodes per loop of each path: ``n_points`` for all of them when given (``--points``); otherwise the
    paper's 1000 on a GPU and, on a CPU, each loop type's own :attr:`~conservcheck.geometry.loops.LoopType.cpu_points`
    (what its default rule needs: benchmarks/RESULTS.md)."""
    if n_points is not None:
        return {path: n_points for path in paths}
    if device.type != "cpu":
        return {path: PAPER_POINTS for path in paths}
    return {path: loops.get(path).cpu_points for path in paths}


def _cost_points(path: str, n_points: int | str) -> int:
    """Nodes per loop the plan's cost assumes: ``auto`` refines adaptive loop types from 16 nodes (about
    :data:`AUTO_COST_POINTS`) and means the fixed 1000 for the others."""
    if n_points != "auto":
        return int(n_points)
    return AUTO_COST_POINTS if loops.get(path).adaptive else FIXED_AUTO_POINTS


def _plan(opts: Mapping[str, Any], probe: VectorFieldProbe) -> list[Variant]:
    budget = opts.get("memory_budget")
    kwargs: dict[str, Any] = {o.name: opts[o.name] for o in loops.loop_options()}
    if budget:
        kwargs["max_chunk_elements"] = loop_chunk_elements(budget, probe.dtype)
    return [
        Variant(
            path, loop_diagnostic, {"path": path, "n_points": n, **kwargs}, opts["n_samples"] * _cost_points(path, n)
        )
        for path, n in loop_points(opts["n_points"], opts["paths"], probe.device).items()
    ]


def _quadrature_floor(values: Mapping[str, list[Any]]) -> float:
    """Median over loops of the nested-rule error estimate relative to ∮|s||dy| (a loop's resolvable level)."""
    if "quad_error" not in values or "abs_score_length" not in values:
        return 0.0
    err = np.asarray(values["quad_error"], dtype=np.float64)
    scale = np.asarray(values["abs_score_length"], dtype=np.float64)
    return float(np.median(np.divide(err, scale, out=np.zeros_like(err), where=scale > 0)))


_DEFAULT_PATHS = tuple(name for name, loop in loops.registered().items() if loop.in_default)

DIAGNOSTIC = Diagnostic(
    name="loop",
    summary="∮ s·dy around closed loops (Eq. 4) and its normalisations (Eq. 7)",
    options=(
        Option(
            "paths",
            _DEFAULT_PATHS,
            "--paths",
            "Loop types for the integral constraint (Eq. 4), comma-separated, all, or none.",
            _parse_paths,
            ",".join(_DEFAULT_PATHS),
            shown=",".join(_DEFAULT_PATHS),
            schema={"type": "array", "items": {"type": "string"}},
        ),
        Option(
            "n_points",
            None,
            "--points",
            "Nodes per loop, or auto (adaptive until the quadrature converges).",
            settings.auto_or(settings.integer("--points", 4, 10**6)),
            "N|auto",
            shown=f"{PAPER_POINTS} on GPU; on CPU per loop type: "
            + ", ".join(f"{name} {loop.cpu_points}" for name, loop in loops.registered().items()),
            schema={"oneOf": [{"type": "integer", "minimum": 4}, {"const": "auto"}, {"type": "null"}]},
        ),
        *loops.loop_options(),
    ),
    plan=_plan,
    selected=lambda opts: bool(opts["paths"]),
    headline={ANY: "abs_circulation_ratio"},
    table={ANY: ("abs_circulation_ratio", "abs_circulation")},
    abs_columns=("circulation_per_length", "eq7", "circulation_ratio"),
    figures=(
        Figure("abs_circulation", "|∮ s·dy|"),
        Figure("abs_circulation_per_length", "|∮ s·dy| / ∮|dy|"),
        Figure("abs_eq7", "2|∮ s·dy| / ∮|y||dy|  (Eq. 7)"),
        Figure("abs_circulation_ratio", "|∮ s·dy| / ∮|s||dy|"),
    ),
    box_metrics=("abs_circulation", "abs_circulation_per_length", "abs_eq7"),
    floor=_quadrature_floor,
)


__all__ = [
    "AUTO_CAP",
    "AUTO_START",
    "COLUMNS",
    "DIAGNOSTIC",
    "FIXED_AUTO_POINTS",
    "loop_bytes_per_element",
    "loop_chunk_elements",
    "loop_diagnostic",
]
