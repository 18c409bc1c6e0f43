"""Rectangle loops: an axis-aligned rectangle in a random coordinate plane, centred on the forward sample.

Loop b turns counter-clockwise in the plane of two coordinates (i, j), drawn per sample, around
x_t = α x0 + σ ε, with side h = ``rect_side`` · σ along both axes (the field's own length scale at that
noise level):

    corners x_t + (h/2)(∓e_i ∓ e_j), in the order (−,−), (+,−), (+,+), (−,+).

By Stokes' theorem ∮ s·dy = ∬ (∂_i s_j − ∂_j s_i) dA over the rectangle: a local probe of one entry of the
curl, as used by other research code. For a linear field s = A y it is exactly h² (A_ji − A_ij), which
the tests check; for any smooth field ∮ s·dy / h² → ∂_i s_j − ∂_j s_i at x_t as h → 0.

Quadrature: the edges are straight, so Clenshaw–Curtis on each edge is exact for fields polynomial along
them (spectrally accurate for smooth ones), and the polygon rule is exact for fields linear along them.
The plane of loop b is the first two entries of the seeded permutation (seed, "rectangle", time.key,
index_b) of the D components.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from conservcheck import rng
from conservcheck.errors import UsageError
from conservcheck.geometry.loops import LoopType
from conservcheck.geometry.loops.batch import Index, LoopBatch, edge_loops, forward_noise, sample_indices
from conservcheck.settings import Option, positive_float
from conservcheck.timepoints import TimePoint

#: Corner signs (along e_i, along e_j) in counter-clockwise order.
CORNERS = ((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0))


def planes(dim: int, seed: int, time_key: str, index: list[int]) -> Tensor:
    """The coordinate plane (i, j) of each loop, [B, 2]: the loop runs along e_i first, then along e_j."""
    return torch.stack([rng.permutation(dim, seed, "rectangle", time_key, i)[:2] for i in index])


def rectangle_loops(
    x0: Tensor,
    time: TimePoint,
    seed: int,
    *,
    n_points: int = 1000,
    rule: str = "clenshaw_curtis",
    index: Index = 0,
    rect_side: float = 1.0,
) -> LoopBatch:
    """Rectangle loops around the forward samples of x0 [B, *shape] (module doc); ``rect_side`` in units of σ."""
    if not (isinstance(rect_side, (int, float)) and rect_side > 0):
        raise UsageError(f"rect_side must be a positive number, got {rect_side!r}", "use e.g. 1 (one σ)")
    x0 = x0.to(torch.float64)
    idx = sample_indices(index, x0.shape[0])
    shape = tuple(x0.shape[1:])
    dim = x0[0].numel()
    if dim < 2:
        raise UsageError("rectangle loops need at least 2 components", "use a sample shape with D ≥ 2")
    x_t = (time.alpha * x0 + time.sigma * forward_noise(x0, time, seed, idx)).flatten(1)
    ij = planes(dim, seed, time.key, idx).to(x0.device)
    half = 0.5 * float(rect_side) * time.sigma
    offsets = torch.zeros(len(idx), len(CORNERS), dim, dtype=torch.float64, device=x0.device)
    for c, (si, sj) in enumerate(CORNERS):
        offsets[:, c].scatter_(1, ij[:, :1], si * half)
        offsets[:, c].scatter_(1, ij[:, 1:], sj * half)
    corners = x_t[:, None] + offsets
    edges = torch.roll(corners, -1, dims=1) - corners

    def points(lam: Tensor) -> Tensor:
        lam = lam.to(corners).reshape(1, 1, -1, 1)
        return (corners[:, :, None] + lam * edges[:, :, None]).reshape(*corners.shape[:2], -1, *shape)

    def tangents(lam: Tensor) -> Tensor:
        return edges[:, :, None].expand(-1, -1, lam.numel(), -1).reshape(*corners.shape[:2], -1, *shape)

    return edge_loops(points, tangents, len(CORNERS), n_points, rule, "rectangle", torch.tensor(idx, dtype=torch.int64))


def _describe(params: dict[str, Any], dim: int, time: TimePoint, seed: int) -> dict[str, Any]:
    return {"rect_side": float(params["rect_side"]), "side_data_units": float(params["rect_side"]) * time.sigma}


LOOP = LoopType(
    name="rectangle",
    build=rectangle_loops,
    rules=("clenshaw_curtis", "polygon"),
    summary="an axis-aligned square of side rect_side·σ in a random coordinate plane through x_t: a local curl probe",
    options=(
        Option(
            "rect_side",
            1.0,
            "--rect-side",
            "Side of the rectangle loops, in units of the noise level σ.",
            positive_float("--rect-side"),
            "H",
            schema={"type": "number", "exclusiveMinimum": 0},
        ),
    ),
    # Straight edges: Clenshaw–Curtis at 4 nodes per edge already sits at rounding level (benchmarks/RESULTS.md).
    cpu_points=32,
    in_default=False,
    describe=_describe,
)
