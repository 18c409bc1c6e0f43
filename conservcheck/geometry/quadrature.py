"""Quadrature rules for closed loops.

A loop rule is a set of nodes y_k on the loop with integration vectors g_k and length weights ℓ_k:

    ∮ s·dy ≈ Σ_k s(y_k)·g_k,        ∮ f |dy| ≈ Σ_k f(y_k) ℓ_k.

Rules (N nodes; h the spacing; errors for a smooth field on a smooth loop):

* **periodic** — uniform nodes u_k = k/N on a periodic parameter u ∈ [0, 1), weights y′(u_k)/N (the
  trapezoid rule of a periodic function). Spectrally accurate: the error falls faster than any power
  of N, geometrically for analytic loops and fields.
* **polygon** — the paper's Σ_k ½(s_k + s_{k+1})·(y_{k+1} − y_k) over the closed polygon through the
  nodes, i.e. g_k = ½(y_{k+1} − y_{k−1}) (indices cyclic). Needs no tangent. Error O(N⁻²) against the
  smooth loop (both the chords and the trapezoid rule along them are second order); exact for a field
  that is affine along every chord, e.g. a linear field.
* **Clenshaw–Curtis** — on each smooth piece λ ∈ [0, 1] of a piecewise-smooth loop, nodes
  λ_i = sin²(π i/(2n)) (Chebyshev extrema), i = 0 … n, with weights integrating polynomials of degree
  n + 1 exactly (n even). Spectrally accurate on analytic pieces.

All three rules are nested under doubling: the nodes at N are every second node at 2N. Every rule
therefore comes with a coarse rule on every second node, and |I_N − I_coarse| estimates the error of the
coarse value — a strict over-estimate of the error of I_N for the spectral rules, about three times it
for the O(N⁻²) polygon rule.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from conservcheck.errors import UsageError


def periodic_rule(n: int) -> tuple[Tensor, Tensor]:
    """Nodes u_k = k/n and weights 1/n of the periodic trapezoid rule on [0, 1) (float64, [n] each).

    ∫₀¹ f(u) du ≈ Σ_k f(u_k)/n; spectrally accurate for smooth 1-periodic f, exact for trigonometric
    polynomials of degree < n.
    """
    if n < 1:
        raise UsageError(f"the periodic rule needs at least one node, got {n}", "pass n ≥ 1")
    k = torch.arange(n, dtype=torch.float64)
    return k / n, torch.full((n,), 1.0 / n, dtype=torch.float64)


@lru_cache(maxsize=64)
def _clenshaw_curtis(n: int) -> tuple[Tensor, Tensor]:
    i = torch.arange(n + 1, dtype=torch.float64)
    # sin² form of (1 − cos(π i/n))/2: accurate near λ = 0 and bit-identical under n → 2n, i → 2i.
    nodes = torch.sin(math.pi / 2 * (i / n)) ** 2
    j = torch.arange(1, n // 2 + 1, dtype=torch.float64)
    b = torch.where(2 * j == n, 1.0, 2.0)
    series = (b / (4 * j**2 - 1))[None, :] * torch.cos(2 * math.pi * torch.outer(i / n, j))
    c = torch.full_like(i, 2.0)
    c[0] = c[-1] = 1.0
    # Weights on [−1, 1] are c_i/n (1 − Σ_j b_j cos(2π i j/n)/(4j² − 1)); halved for [0, 1].
    weights = 0.5 * c / n * (1 - series.sum(1))
    return nodes, weights


def clenshaw_curtis_rule(n: int) -> tuple[Tensor, Tensor]:
    """Clenshaw–Curtis nodes and weights on [0, 1] with n ≥ 1 intervals (n + 1 nodes; float64).

    Nodes λ_i = sin²(π i/(2n)) increase from 0 to 1; ∫₀¹ f ≈ Σ_i w_i f(λ_i) is exact for polynomials of
    degree ≤ n (≤ n + 1 for even n) and converges geometrically for f analytic near [0, 1]. The nodes of
    n intervals are the even-indexed nodes of 2n, which gives the nested coarse rule. n = 1 is the
    trapezoid rule, n = 2 Simpson's.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"Clenshaw–Curtis needs at least one interval, got {n!r}", "pass an integer n ≥ 1")
    nodes, weights = _clenshaw_curtis(int(n))
    return nodes.clone(), weights.clone()


def polygon_weights(points: Tensor) -> tuple[Tensor, Tensor]:
    """Integration vectors and length weights of the closed polygon through ``points`` [B, N, *shape].

    g_k = ½(y_{k+1} − y_{k−1}), so Σ_k s_k·g_k = Σ_k ½(s_k + s_{k+1})·(y_{k+1} − y_k) (the paper's
    trapezoid sum), and ℓ_k = ½(|y_{k+1} − y_k| + |y_k − y_{k−1}|), so Σ_k ℓ_k is the polygon's length.
    Indices are cyclic: the polygon closes from the last node back to the first. Returns
    (g [B, N, *shape], ℓ [B, N]) in the dtype of ``points``. Error O(N⁻²) for a smooth loop and field.
    """
    nxt = torch.roll(points, -1, dims=1)
    prv = torch.roll(points, 1, dims=1)
    g = 0.5 * (nxt - prv)
    seg = (nxt - points).flatten(2).norm(dim=2)
    ell = 0.5 * (seg + torch.roll(seg, 1, dims=1))
    return g, ell


def tangent_weights(tangents: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """g_k = w_k y′(u_k) and ℓ_k = w_k |y′(u_k)| for a rule with scalar weights w [N] in the parameter u.

    ``tangents`` [B, N, *shape] are dy/du at the nodes. Returns (g [B, N, *shape], ℓ [B, N]).
    """
    w = weights.to(tangents)
    g = tangents * w.reshape(1, -1, *([1] * (tangents.ndim - 2)))
    ell = tangents.flatten(2).norm(dim=2) * w[None, :]
    return g, ell


__all__ = ["clenshaw_curtis_rule", "periodic_rule", "polygon_weights", "tangent_weights"]
