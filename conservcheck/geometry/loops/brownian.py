"""Brownian-bridge loops (paper §3.2): x_t plus a Brownian bridge in a fictitious time u ∈ [0, U].

The bridge wanders out of the typical set on purpose: these loops probe the field out of distribution.
Refining a bridge adds detail to the loop itself (its length grows like √N), so its node count is fixed
rather than refined until converged; quadrature is the paper's polygon rule.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from conservcheck import rng
from conservcheck.errors import UsageError
from conservcheck.geometry.loops import LoopType
from conservcheck.geometry.loops.batch import Index, LoopBatch, even_nodes, forward_noise, polygon_batch, sample_indices
from conservcheck.settings import Option, positive_float
from conservcheck.timepoints import TimePoint


def brownian_bridge(shape: tuple[int, ...], n_points: int, bridge_u: float, seed: int, *keys: object) -> Tensor:
    """A Brownian bridge X_u = W_u − (u/U) W_U at u_k = k U/N, k = 0 … N−1: [N, *shape] float64, CPU.

    Built by midpoint refinement (Lévy's construction): with N = N_b 2^L, N_b odd, the bridge on the
    N_b-point grid comes from N_b independent increments N(0, U/N_b) of the stream (seed, *keys, "base",
    N_b), then each of L levels inserts the midpoint of every interval of length h as the mean of its
    neighbours plus N(0, h/4) from the stream (seed, *keys, "base", N_b, "level", l). This is the exact
    law of the bridge at the finer grid, and the bridge at N is every second node of the bridge at 2N.
    X_0 = X_U = 0, so the loop closes.
    """
    base, levels = n_points, 0
    while base % 2 == 0:
        base, levels = base // 2, levels + 1
    inc = rng.normal((base, *shape), seed, *keys, "base", base, dtype=torch.float64) * math.sqrt(bridge_u / base)
    walk = torch.cumsum(inc, 0)
    frac = (torch.arange(1, base + 1, dtype=torch.float64) / base).reshape(-1, *([1] * len(shape)))
    bridge = walk - frac * walk[-1]
    nodes = torch.cat([torch.zeros(1, *shape, dtype=torch.float64), bridge[:-1]])
    h = bridge_u / base
    for level in range(1, levels + 1):
        noise = rng.normal(tuple(nodes.shape), seed, *keys, "base", base, "level", level, dtype=torch.float64)
        mid = 0.5 * (nodes + torch.roll(nodes, -1, 0)) + math.sqrt(h / 4) * noise
        nodes = torch.stack([nodes, mid], 1).reshape(-1, *shape)
        h /= 2
    return nodes


def brownian_loops(
    x0: Tensor,
    time: TimePoint,
    seed: int,
    *,
    n_points: int = 1000,
    rule: str = "polygon",
    bridge_u: float = 9.0,
    index: Index = 0,
) -> LoopBatch:
    """The paper's Brownian path y_u = x_t + X_u over u ∈ [0, U] (default U = 9), polygon rule.

    Loop b's bridge is :func:`brownian_bridge` keyed (seed, "brownian", time.key, index_b); N is rounded
    up to even. ``params`` holds u/U. There is no analytic tangent (``tangents`` is None).
    """
    n = even_nodes(n_points, "n_points")
    if not bridge_u > 0:
        raise UsageError(f"bridge_u must be positive, got {bridge_u!r}", "use the paper's U = 9")
    x0 = x0.to(torch.float64)
    idx = sample_indices(index, x0.shape[0])
    eps = forward_noise(x0, time, seed, idx)
    x_t = time.alpha * x0 + time.sigma * eps
    shape = tuple(x0.shape[1:])
    bridges = torch.stack([brownian_bridge(shape, n, float(bridge_u), seed, "brownian", time.key, i) for i in idx])
    pts = x_t[:, None] + bridges.to(x0.device)
    params = torch.arange(n, dtype=torch.float64, device=pts.device) / n
    return polygon_batch(pts, "brownian", params, None, torch.tensor(idx, dtype=torch.int64))


def _describe(params: dict[str, Any], dim: int, time: TimePoint, seed: int) -> dict[str, Any]:
    return {"bridge_U": float(params["bridge_u"])}


LOOP = LoopType(
    name="brownian",
    build=brownian_loops,
    rules=("polygon",),
    summary="x_t plus a Brownian bridge in fictitious time [0, U]: out of distribution on purpose",
    options=(
        Option(
            "bridge_u",
            9.0,
            "--bridge-u",
            "Fictitious time U of the Brownian-bridge loops (paper: 9).",
            positive_float("--bridge-u"),
            "U",
            schema={"type": "number"},
        ),
    ),
    adaptive=False,
    # Resolving a bridge takes 512+ nodes (benchmarks/RESULTS.md), more than a CPU audit can spend: at 128 the
    # quadrature floor marks what is not resolved, and --points 512 resolves five of six digits time points.
    cpu_points=128,
    describe=_describe,
)
