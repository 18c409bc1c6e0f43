"""Closed loops for the integral constraint (paper §3.2): Brownian bridge, rotation and projection.

Every loop, whatever its shape and quadrature rule, becomes a :class:`LoopBatch`: nodes y_k,
integration vectors g_k with ∮ s·dy ≈ Σ_k s(y_k)·g_k, length weights ℓ_k with ∮ f|dy| ≈ Σ_k f(y_k) ℓ_k,
and the same two arrays for the nested coarse rule on every second node, so one code path
(:func:`conservcheck.quadrature.loop_sums`) evaluates all of them.

* :class:`RotationLoop` — the noise ε of x_t = α x0 + σ ε rotated in randomly paired planes:
  y(u) = α x0 + σ ε′(2πu), an ellipse through x_t whose every point has the law of x_t.
* :class:`ProjectionLoop` — K noisy copies α x0 + σ ε_j of one x0 joined in a closed polygon whose
  edges are pulled radially onto the noise shell |y − α x0| = R.
* :func:`brownian_bridge` — x_t plus a Brownian bridge in a fictitious time u ∈ [0, U] (out of
  distribution on purpose).

Randomness is keyed by (seed, path, time key, global sample index), so a loop never depends on which
other loops are built beside it. Loops start from the forward sample x_t of
:func:`conservcheck.diagnostics.base.forward_samples`, the same x_t the other diagnostics see. All
geometry is computed in float64 on the device of x0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch
from torch import Tensor

from . import rng
from .diagnostics.base import TimePoint, forward_samples
from .errors import UsageError
from .quadrature import clenshaw_curtis_rule, periodic_rule, polygon_weights, tangent_weights

PATH_RULES: dict[str, tuple[str, ...]] = {
    "rotation": ("periodic", "polygon"),
    "projection": ("clenshaw_curtis", "polygon"),
    "brownian": ("polygon",),
}
DEFAULT_RULES: dict[str, str] = {"rotation": "periodic", "projection": "clenshaw_curtis", "brownian": "polygon"}
RADIUS_DRAWS = 256

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


def _indices(index: Index, b: int) -> list[int]:
    """Global sample index of each of b rows: an int is the first row's index, or one index per row."""
    if isinstance(index, int):
        return list(range(index, index + b))
    idx = [int(i) for i in (index.tolist() if isinstance(index, Tensor) else index)]
    if len(idx) != b:
        raise UsageError(f"got {len(idx)} sample indices for {b} samples", "pass one index per row of x0")
    return idx


def _noise(x0: Tensor, time: TimePoint, seed: int, idx: list[int]) -> Tensor:
    """The forward-sample noise ε of every row, from the streams :func:`forward_samples` uses."""
    # forward_samples reads α and σ from the TimePoint; it needs no process.
    return torch.cat([forward_samples(None, x0[b : b + 1], time, seed, start=i)[1] for b, i in enumerate(idx)])


def _even(n: int, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise UsageError(f"{what} must be an integer ≥ 2, got {n!r}", "pass a number of nodes such as 1000")
    return n + (n % 2)


def _check_rule(path: str, rule: str) -> str:
    if rule not in PATH_RULES[path]:
        raise UsageError(
            f"rule {rule!r} is not available for {path} loops", f"use one of {', '.join(PATH_RULES[path])}"
        )
    return rule


def _every_second(n: int, device: torch.device) -> Tensor:
    return torch.arange(0, n, 2, device=device)


def _polygon_batch(points: Tensor, path: str, params: Tensor, tangents: Tensor | None, index: Tensor) -> LoopBatch:
    g, ell = polygon_weights(points)
    ci = _every_second(points.shape[1], points.device)
    gc, ellc = polygon_weights(points[:, ci])
    return LoopBatch(points, g, ell, ci, gc, ellc, path, "polygon", params, tangents, index)


# ----------------------------------------------------------------------------------------------- rotation


@dataclass
class RotationLoop:
    """y(u) = c + a cos 2πu + b sin 2πu: the paper's rotation path, one ellipse per sample.

    With x_t = α x0 + σ ε and the components of ε randomly paired (i, j), c = α x0 + σ ε_f, a = σ ε_p and
    b = σ Pε, where ε_p holds the paired components, ε_f the unpaired one (odd D only; it stays fixed)
    and (Pε)_i = ε_j, (Pε)_j = −ε_i for each pair. So ε′(θ) = ε_f + cos θ ε_p + sin θ Pε rotates every
    pair by the same angle θ = 2πu: ε′_i = cos θ ε_i + sin θ ε_j, ε′_j = −sin θ ε_i + cos θ ε_j, and
    |ε′(θ)| = |ε|. y(0) = x_t.

    Attributes: center, a, b [B, *shape]; pairs [B, ⌊D/2⌋, 2] (flat component indices); index [B].
    """

    center: Tensor
    a: Tensor
    b: Tensor
    pairs: Tensor
    index: Tensor

    @classmethod
    def from_samples(cls, x0: Tensor, time: TimePoint, seed: int, index: Index = 0) -> "RotationLoop":
        """Rotation loops around the forward samples of x0 [B, *shape] at ``time``.

        The pairing of loop b is the seeded permutation (seed, "rotation", time.key, index_b) of the D
        components, cut into consecutive pairs; with odd D its last entry is left unpaired.
        """
        x0 = x0.to(torch.float64)
        idx = _indices(index, x0.shape[0])
        eps = _noise(x0, time, seed, idx).flatten(1)
        bsz, dim = eps.shape
        if dim < 2:
            raise UsageError("rotation loops need at least 2 components", "use a sample shape with D ≥ 2")
        pairs = torch.stack([rng.permutation(dim, seed, "rotation", time.key, i)[: 2 * (dim // 2)] for i in idx])
        pairs = pairs.reshape(bsz, dim // 2, 2).to(eps.device)
        i, j = pairs[..., 0], pairs[..., 1]
        eps_p = eps * torch.zeros_like(eps).scatter(1, pairs.flatten(1), 1.0)
        p_eps = torch.zeros_like(eps).scatter(1, i, eps.gather(1, j)).scatter(1, j, -eps.gather(1, i))
        shape = x0.shape
        center = time.alpha * x0 + time.sigma * (eps - eps_p).reshape(shape)
        return cls(
            center, time.sigma * eps_p.reshape(shape), time.sigma * p_eps.reshape(shape), pairs,
            torch.tensor(idx, dtype=torch.int64),
        )

    def _angle(self, u: Tensor) -> Tensor:
        """θ = 2πu for u [M], shaped [1, M, 1, …] to broadcast against [B, M, *shape]."""
        u = torch.as_tensor(u, dtype=torch.float64).to(self.a.device)
        return 2 * math.pi * u.reshape(1, -1, *([1] * (self.a.ndim - 1)))

    def point(self, u: Tensor) -> Tensor:
        """y(u) for u [M] ∈ [0, 1): [B, M, *shape]."""
        theta = self._angle(u)
        return self.center[:, None] + self.a[:, None] * torch.cos(theta) + self.b[:, None] * torch.sin(theta)

    def tangent(self, u: Tensor) -> Tensor:
        """dy/du = 2π(−a sin 2πu + b cos 2πu) for u [M]: [B, M, *shape]."""
        theta = self._angle(u)
        return 2 * math.pi * (-self.a[:, None] * torch.sin(theta) + self.b[:, None] * torch.cos(theta))

    def loops(self, n_points: int = 1000, rule: str = "periodic") -> LoopBatch:
        """Nodes u_k = k/N (N rounded up to even) with the ``periodic`` or ``polygon`` rule."""
        n = _even(n_points, "n_points")
        rule = _check_rule("rotation", rule)
        u, w = periodic_rule(n)
        pts, tan = self.point(u), self.tangent(u)
        u = u.to(pts.device)
        if rule == "polygon":
            return _polygon_batch(pts, "rotation", u, tan, self.index)
        g, ell = tangent_weights(tan, w)
        ci = _every_second(n, pts.device)
        gc, ellc = tangent_weights(tan[:, ci], 2 * w[::2])
        return LoopBatch(pts, g, ell, ci, gc, ellc, "rotation", "periodic", u, tan, self.index)


def rotation_loops(
    x0: Tensor, time: TimePoint, seed: int, *, n_points: int = 1000, rule: str = "periodic", index: Index = 0
) -> LoopBatch:
    """Rotation loops (paper §3.2) around the forward samples of x0 [B, *shape]; see :class:`RotationLoop`."""
    return RotationLoop.from_samples(x0, time, seed, index).loops(n_points, rule)


# --------------------------------------------------------------------------------------------- projection


@lru_cache(maxsize=32)
def _mean_noise_norm(dim: int, seed: int, n_draws: int) -> float:
    return sum(float(rng.normal((dim,), seed, "projection", "radius", j).norm()) for j in range(n_draws)) / n_draws


def shell_radius(dim: int, sigma: float, seed: int, n_draws: int = RADIUS_DRAWS) -> float:
    """Monte Carlo radius R = σ · mean_j |ε_j| of the noise shell around α x0 (data units).

    The draws ε_j ~ N(0, I_D) come from the streams (seed, "projection", "radius", j). E|ε| =
    √2 Γ((D+1)/2)/Γ(D/2) ≈ √(D − ½) ≈ √D, and |ε| has standard deviation ≈ 1/√2, so the estimate is
    within ≈ 0.7/√n_draws of σ E|ε| (relative error ≈ 0.04/√D at 256 draws).
    """
    return float(sigma) * _mean_noise_norm(int(dim), int(seed), int(n_draws))


@dataclass
class ProjectionLoop:
    """The paper's projection path: K noisy copies of one x0, joined edge by edge on the noise shell.

    Vertex j is x_t^(j) = c + d_j with c = α x0 and offsets d_j = σ ε_j (d_0 = σ ε is the forward
    sample's noise, so the loop starts at the projection of x_t). Edge j runs from vertex j to vertex
    j + 1 (cyclic) over λ ∈ [0, 1]: the straight segment w(λ) = (1 − λ) d_j + λ d_{j+1} is pulled
    radially onto the shell, y(λ) = c + R w/|w|. The vertices are projected too (λ = 0, 1), so every edge
    is smooth, consecutive edges meet and the loop closes; vertex j lies on the shell, at distance
    |R − |d_j|| ≈ σ/√2 (a small fraction of the radius) from x_t^(j).

    The global parameter u = (j + λ)/K ∈ [0, 1) runs over the edges in order.

    Attributes: center [B, *shape]; offsets [B, K, *shape]; radius (data units); index [B].
    """

    center: Tensor
    offsets: Tensor
    radius: float
    index: Tensor

    @classmethod
    def from_samples(
        cls,
        x0: Tensor,
        time: TimePoint,
        seed: int,
        index: Index = 0,
        n_vertices: int = 8,
        radius: float | None = None,
    ) -> "ProjectionLoop":
        """Projection loops around α x0 for x0 [B, *shape] at ``time``.

        Noise of vertices 1 … K−1 of loop b comes from the stream (seed, "projection", time.key,
        index_b); vertex 0 uses the forward sample's noise. ``radius`` defaults to :func:`shell_radius`.
        """
        if isinstance(n_vertices, bool) or not isinstance(n_vertices, int) or n_vertices < 3:
            raise UsageError(f"projection loops need at least 3 vertices, got {n_vertices!r}", "pass n_vertices ≥ 3")
        x0 = x0.to(torch.float64)
        idx = _indices(index, x0.shape[0])
        shape = tuple(x0.shape[1:])
        eps0 = _noise(x0, time, seed, idx)
        rest = torch.stack(
            [rng.normal((n_vertices - 1, *shape), seed, "projection", time.key, i, dtype=torch.float64) for i in idx]
        ).to(x0.device)
        offsets = time.sigma * torch.cat([eps0[:, None], rest], 1)
        r = shell_radius(math.prod(shape), time.sigma, seed) if radius is None else float(radius)
        return cls(time.alpha * x0, offsets, r, torch.tensor(idx, dtype=torch.int64))

    @property
    def n_vertices(self) -> int:
        return int(self.offsets.shape[1])

    def _segment(self, lam: Tensor) -> tuple[Tensor, Tensor]:
        """w(λ) for every edge and λ [M], flattened: [B, K, M, D]; and the edge vectors d_{j+1} − d_j."""
        d = self.offsets.flatten(2)
        e = torch.roll(d, -1, dims=1) - d
        lam = torch.as_tensor(lam, dtype=torch.float64).to(d.device).reshape(1, 1, -1, 1)
        return d[:, :, None] + lam * e[:, :, None], e[:, :, None]

    def edge_points(self, lam: Tensor) -> Tensor:
        """y on every edge at λ [M] ∈ [0, 1]: [B, K, M, *shape]."""
        w, _ = self._segment(lam)
        y = self.center.flatten(1)[:, None, None] + self.radius * w / w.norm(dim=-1, keepdim=True)
        return y.reshape(*w.shape[:3], *self.center.shape[1:])

    def edge_tangents(self, lam: Tensor) -> Tensor:
        """dy/dλ = R (I − ŵŵᵀ)(d_{j+1} − d_j)/|w| on every edge at λ [M]: [B, K, M, *shape]."""
        w, e = self._segment(lam)
        norm = w.norm(dim=-1, keepdim=True)
        w_hat = w / norm
        t = self.radius * (e - w_hat * (w_hat * e).sum(-1, keepdim=True)) / norm
        return t.reshape(*w.shape[:3], *self.center.shape[1:])

    def _edge_of(self, u: Tensor) -> tuple[Tensor, Tensor]:
        k = self.n_vertices
        u = torch.as_tensor(u, dtype=torch.float64)
        j = torch.clamp(torch.floor(u * k), 0, k - 1).long()
        return j, u * k - j

    def point(self, u: Tensor) -> Tensor:
        """y(u) for a global parameter u [M] ∈ [0, 1): [B, M, *shape]."""
        j, lam = self._edge_of(u)
        pts = self.edge_points(lam)
        return pts[:, j.to(pts.device), torch.arange(lam.numel(), device=pts.device)]

    def tangent(self, u: Tensor) -> Tensor:
        """dy/du = K dy/dλ for u [M] (at a vertex: the edge starting there): [B, M, *shape]."""
        j, lam = self._edge_of(u)
        tan = self.edge_tangents(lam)
        return self.n_vertices * tan[:, j.to(tan.device), torch.arange(lam.numel(), device=tan.device)]

    def loops(self, n_points: int = 1000, rule: str = "clenshaw_curtis") -> LoopBatch:
        """N = K·m nodes, m = ⌈n_points/K⌉ rounded up to even nodes per edge, edge by edge.

        ``polygon``: λ_i = i/m on each edge, closed polygon through all nodes. ``clenshaw_curtis``: the
        first m of the m + 1 Clenshaw–Curtis nodes of each edge (the last is the next edge's first), with
        the weights of both edges added at the shared vertex. Either way the coarse rule uses the
        even-indexed nodes of each edge.
        """
        rule = _check_rule("projection", rule)
        k = self.n_vertices
        per_edge = -(-_even(n_points, "n_points") // k)
        m = per_edge + per_edge % 2
        b, shape = self.center.shape[0], tuple(self.center.shape[1:])
        if rule == "polygon":
            lam = torch.arange(m, dtype=torch.float64) / m
        else:
            lam_full, w_full = clenshaw_curtis_rule(m)
            lam = lam_full[:m]
        pts = self.edge_points(lam).reshape(b, k * m, *shape)
        params = ((torch.arange(k, dtype=torch.float64)[:, None] + lam[None, :]) / k).flatten().to(pts.device)
        if rule == "polygon":
            tan = k * self.edge_tangents(lam).reshape(b, k * m, *shape)
            return _polygon_batch(pts, "projection", params, tan, self.index)
        tan_full = self.edge_tangents(lam_full)
        _, wc_full = clenshaw_curtis_rule(m // 2)
        g, ell = self._merged(tan_full, w_full)
        gc, ellc = self._merged(tan_full[:, :, ::2], wc_full)
        tan = k * tan_full[:, :, :m].reshape(b, k * m, *shape)
        ci = _every_second(k * m, pts.device)
        return LoopBatch(pts, g, ell, ci, gc, ellc, "projection", "clenshaw_curtis", params, tan, self.index)

    def _merged(self, tan: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
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


def projection_loops(
    x0: Tensor,
    time: TimePoint,
    seed: int,
    *,
    n_points: int = 1000,
    rule: str = "clenshaw_curtis",
    n_vertices: int = 8,
    index: Index = 0,
    radius: float | None = None,
) -> LoopBatch:
    """Projection loops (paper §3.2) around α x0 for x0 [B, *shape]; see :class:`ProjectionLoop`."""
    return ProjectionLoop.from_samples(x0, time, seed, index, n_vertices, radius).loops(n_points, rule)


# ---------------------------------------------------------------------------------------------- brownian


def brownian_bridge(
    shape: tuple[int, ...], n_points: int, bridge_U: float, seed: int, *keys: object
) -> Tensor:
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
    inc = rng.normal((base, *shape), seed, *keys, "base", base, dtype=torch.float64) * math.sqrt(bridge_U / base)
    walk = torch.cumsum(inc, 0)
    frac = (torch.arange(1, base + 1, dtype=torch.float64) / base).reshape(-1, *([1] * len(shape)))
    bridge = walk - frac * walk[-1]
    nodes = torch.cat([torch.zeros(1, *shape, dtype=torch.float64), bridge[:-1]])
    h = bridge_U / base
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
    bridge_U: float = 9.0,
    index: Index = 0,
) -> LoopBatch:
    """The paper's Brownian path y_u = x_t + X_u over u ∈ [0, U] (default U = 9), polygon rule.

    Loop b's bridge is :func:`brownian_bridge` keyed (seed, "brownian", time.key, index_b); N is rounded
    up to even. ``params`` holds u/U. There is no analytic tangent (``tangents`` is None).
    """
    _check_rule("brownian", rule)
    n = _even(n_points, "n_points")
    if not bridge_U > 0:
        raise UsageError(f"bridge_U must be positive, got {bridge_U!r}", "use the paper's U = 9")
    x0 = x0.to(torch.float64)
    idx = _indices(index, x0.shape[0])
    eps = _noise(x0, time, seed, idx)
    x_t = time.alpha * x0 + time.sigma * eps
    shape = tuple(x0.shape[1:])
    bridges = torch.stack([brownian_bridge(shape, n, float(bridge_U), seed, "brownian", time.key, i) for i in idx])
    pts = x_t[:, None] + bridges.to(x0.device)
    params = torch.arange(n, dtype=torch.float64, device=pts.device) / n
    return _polygon_batch(pts, "brownian", params, None, torch.tensor(idx, dtype=torch.int64))


def make_loops(
    path: str,
    x0: Tensor,
    time: TimePoint,
    seed: int,
    *,
    n_points: int = 1000,
    rule: str | None = None,
    index: Index = 0,
    n_vertices: int = 8,
    bridge_U: float = 9.0,
) -> LoopBatch:
    """Loops of the named ``path`` (rotation, projection, brownian) with ``rule`` (its default if None)."""
    if path not in PATH_RULES:
        raise UsageError(f"unknown loop path {path!r}", f"use one of {', '.join(PATH_RULES)}")
    rule = DEFAULT_RULES[path] if rule is None else rule
    if path == "rotation":
        return rotation_loops(x0, time, seed, n_points=n_points, rule=rule, index=index)
    if path == "projection":
        return projection_loops(x0, time, seed, n_points=n_points, rule=rule, n_vertices=n_vertices, index=index)
    return brownian_loops(x0, time, seed, n_points=n_points, rule=rule, bridge_U=bridge_U, index=index)


__all__ = [
    "DEFAULT_RULES",
    "LoopBatch",
    "PATH_RULES",
    "ProjectionLoop",
    "RotationLoop",
    "brownian_bridge",
    "brownian_loops",
    "make_loops",
    "projection_loops",
    "rotation_loops",
    "shell_radius",
]
