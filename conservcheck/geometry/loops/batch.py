"""What every closed loop becomes: nodes, quadrature weights and a nested coarse rule (:class:`LoopBatch`).

Whatever its shape and quadrature rule, a batch of loops holds nodes y_k, integration vectors g_k with
∮ s·dy ≈ Σ_k s(y_k)·g_k, length weights ℓ_k with ∮ f|dy| ≈ Σ_k f(y_k) ℓ_k, and the same two arrays for
the nested coarse rule on every second node, so one code path (:func:`loop_sums`) evaluates all of them.
This module also holds the helpers the loop types share: global sample indices, the forward-sample noise
every loop starts from, and node-count checks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from conservcheck.errors import UsageError
from conservcheck.geometry.quadrature import clenshaw_curtis_rule, polygon_weights, tangent_weights
from conservcheck.timepoints import TimePoint, forward_samples

Index = int | Sequence[int] | Tensor


@dataclass
class LoopBatch:
    """B closed loops of N nodes each, with the weights of one quadrature rule and its coarse half.

    Attributes:
        points: nodes y_k, [B, N, *shape] (data units, float64).
        weights: integration vectors g_k, [B, N, *shape]: ∮ s·dy ≈ Σ_k s(y_k)·g_k.
        length_weights: ℓ_k, [B, N]: ∮ f|dy| ≈ Σ_k f(y_k) ℓ_k.
        coarse_index: [N/2] node indices of the nested coarse rule (every second node).
        coarse_weights, coarse_length_weights: g and ℓ of the coarse rule, [B, N/2, *shape] and [B, N/2].
        path, rule: names of the loop construction and quadrature rule.
        params: [N] loop parameter u_k ∈ [0, 1) of each node (the same for every loop).
        tangents: dy/du at the nodes, [B, N, *shape], where the loop has an analytic tangent
            (rotation, projection; at a projection vertex the tangent of the edge that starts there);
            None for the Brownian bridge.
        index: [B] global sample index of each loop.
    """

    points: Tensor
    weights: Tensor
    length_weights: Tensor
    coarse_index: Tensor
    coarse_weights: Tensor
    coarse_length_weights: Tensor
    path: str
    rule: str
    params: Tensor
    tangents: Tensor | None
    index: Tensor

    @property
    def n_loops(self) -> int:
        return int(self.points.shape[0])

    @property
    def n_points(self) -> int:
        return int(self.points.shape[1])


def sample_indices(index: Index, b: int) -> list[int]:
    """Global sample index of each of b rows: an int is the first row's index, or one index per row."""
    if isinstance(index, int):
        return list(range(index, index + b))
    idx = [int(i) for i in (index.tolist() if isinstance(index, Tensor) else index)]
    if len(idx) != b:
        raise UsageError(f"got {len(idx)} sample indices for {b} samples", "pass one index per row of x0")
    return idx


def forward_noise(x0: Tensor, time: TimePoint, seed: int, idx: list[int]) -> Tensor:
    """The forward-sample noise ε of every row, from the streams :func:`forward_samples` uses."""
    return torch.cat([forward_samples(x0[b : b + 1], time, seed, start=i)[1] for b, i in enumerate(idx)])


def even_nodes(n: int, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise UsageError(f"{what} must be an integer ≥ 2, got {n!r}", "pass a number of nodes such as 1000")
    return n + (n % 2)


def every_second(n: int, device: torch.device) -> Tensor:
    return torch.arange(0, n, 2, device=device)


def polygon_batch(points: Tensor, path: str, params: Tensor, tangents: Tensor | None, index: Tensor) -> LoopBatch:
    g, ell = polygon_weights(points)
    ci = every_second(points.shape[1], points.device)
    gc, ellc = polygon_weights(points[:, ci])
    return LoopBatch(points, g, ell, ci, gc, ellc, path, "polygon", params, tangents, index)


EdgeMap = Callable[[Tensor], Tensor]


def edge_loops(
    points: EdgeMap, tangents: EdgeMap, k: int, n_points: int, rule: str, path: str, index: Tensor
) -> LoopBatch:
    """A loop of K smooth edges, edge j running from vertex j to vertex j + 1 (cyclic) over λ ∈ [0, 1].

    ``points(λ)`` and ``tangents(λ)`` give y and dy/dλ on every edge at λ [M]: [B, K, M, *shape].
    N = K·m nodes, m = ⌈n_points/K⌉ rounded up to even nodes per edge, edge by edge; the loop parameter
    is u = (j + λ)/K. ``polygon``: λ_i = i/m on each edge, closed polygon through all nodes.
    ``clenshaw_curtis``: the first m of the m + 1 Clenshaw–Curtis nodes of each edge (the last is the
    next edge's first), with the weights of both edges added at the shared vertex. Either way the coarse
    rule uses the even-indexed nodes of each edge.
    """
    per_edge = -(-even_nodes(n_points, "n_points") // k)
    m = per_edge + per_edge % 2
    if rule == "polygon":
        lam = torch.arange(m, dtype=torch.float64) / m
    else:
        lam_full, w_full = clenshaw_curtis_rule(m)
        lam = lam_full[:m]
    edge_pts = points(lam)
    b, shape = edge_pts.shape[0], tuple(edge_pts.shape[3:])
    pts = edge_pts.reshape(b, k * m, *shape)
    params = ((torch.arange(k, dtype=torch.float64)[:, None] + lam[None, :]) / k).flatten().to(pts.device)
    if rule == "polygon":
        tan = k * tangents(lam).reshape(b, k * m, *shape)
        return polygon_batch(pts, path, params, tan, index)
    tan_full = tangents(lam_full)
    _, wc_full = clenshaw_curtis_rule(m // 2)
    g, ell = _shared_vertices(tan_full, w_full)
    gc, ellc = _shared_vertices(tan_full[:, :, ::2], wc_full)
    tan = k * tan_full[:, :, :m].reshape(b, k * m, *shape)
    ci = every_second(k * m, pts.device)
    return LoopBatch(pts, g, ell, ci, gc, ellc, path, "clenshaw_curtis", params, tan, index)


def _shared_vertices(tan: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-edge rule with n + 1 nodes → loop rule on the first n nodes of each edge (vertex shared)."""
    b, k, n1 = tan.shape[:3]
    g, ell = tangent_weights(tan.reshape(b, k * n1, *tan.shape[3:]), w.repeat(k))
    g, ell = g.reshape(tan.shape), ell.reshape(b, k, n1)
    g_start = g[:, :, :-1].clone()
    ell_start = ell[:, :, :-1].clone()
    # λ = 1 of edge j − 1 is λ = 0 of edge j: that node carries both edges' end weights.
    g_start[:, :, 0] += torch.roll(g[:, :, -1], 1, dims=1)
    ell_start[:, :, 0] += torch.roll(ell[:, :, -1], 1, dims=1)
    return g_start.reshape(b, k * (n1 - 1), *tan.shape[3:]), ell_start.reshape(b, k * (n1 - 1))


def loop_sums(scores: Tensor, loops: LoopBatch) -> dict[str, Tensor]:
    """The sums behind every loop value, accumulated in float64 whatever the dtype of ``scores``.

    Args:
        scores: s(y_k) at the loop's nodes, [B, N, *shape] (score units, 1/data units).
        loops: the nodes and weights (:class:`LoopBatch`).
    Returns:
        float64 tensors of shape [B] on the scores' device:
        ``circulation`` ∮ s·dy (Eq. 4; dimensionless: score × data units),
        ``circulation_coarse`` the same with the nested coarse rule,
        ``length`` ∮|dy| (data units), ``length_coarse`` its coarse-rule value,
        ``abs_y_length`` ∮|y||dy| (data units², Eq. 7's denominator),
        ``abs_score_length`` ∮|s||dy| (dimensionless; bounds |∮ s·dy|).
    """
    b, n = loops.points.shape[:2]
    if tuple(scores.shape) != tuple(loops.points.shape):
        raise UsageError(
            f"scores have shape {tuple(scores.shape)}, the loops' nodes {tuple(loops.points.shape)}",
            "evaluate the field at loops.points",
        )
    f64 = torch.float64
    s = scores.to(f64).reshape(b, n, -1)
    g = loops.weights.to(device=s.device, dtype=f64).reshape(b, n, -1)
    idx = loops.coarse_index.to(s.device)
    gc = loops.coarse_weights.to(device=s.device, dtype=f64).reshape(b, idx.numel(), -1)
    ell = loops.length_weights.to(device=s.device, dtype=f64)
    ell_c = loops.coarse_length_weights.to(device=s.device, dtype=f64)
    y_norm = loops.points.to(device=s.device, dtype=f64).reshape(b, n, -1).norm(dim=2)
    return {
        "circulation": (s * g).sum((1, 2)),
        "circulation_coarse": (s[:, idx] * gc).sum((1, 2)),
        "length": ell.sum(1),
        "length_coarse": ell_c.sum(1),
        "abs_y_length": (y_norm * ell).sum(1),
        "abs_score_length": (s.norm(dim=2) * ell).sum(1),
    }
