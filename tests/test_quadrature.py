"""Quadrature rules: convergence orders on known integrands, exactness, nesting, and the loop sums."""

import math

import pytest
import torch

from conservcheck.errors import UsageError
from conservcheck.geometry.loops import loop_sums
from conservcheck.geometry.loops.rotation import RotationLoop
from conservcheck.geometry.quadrature import (
    clenshaw_curtis_rule,
    periodic_rule,
    polygon_weights,
    tangent_weights,
)

F64 = torch.float64


def _unit_circle(u):
    """Points and tangents dy/du of the unit circle y(u) = (cos 2πu, sin 2πu), as [1, N, 2]."""
    th = 2 * math.pi * u
    y = torch.stack([torch.cos(th), torch.sin(th)], -1)[None]
    t = 2 * math.pi * torch.stack([-torch.sin(th), torch.cos(th)], -1)[None]
    return y, t


def _cubic(y):
    # s = (−y₂³, y₁³): on the unit circle ∮ s·dy = ∫ (sin⁴θ + cos⁴θ) dθ = 3π/2.
    return torch.stack([-(y[..., 1] ** 3), y[..., 0] ** 3], -1)


def _exp_field(y):
    # s = (−y₂ e^{y₁}, 0): ∮ s·dy = ∫ sin²θ e^{cos θ} dθ = 2π I₁(1) (modified Bessel function).
    return torch.stack([-y[..., 1] * torch.exp(y[..., 0]), torch.zeros_like(y[..., 0])], -1)


I_CUBIC = 3 * math.pi / 2
I_EXP = 2 * math.pi * float(torch.special.i1(torch.tensor(1.0, dtype=F64)))


def _polygon_error(field, exact, n):
    y, _ = _unit_circle(periodic_rule(n)[0])
    g, _ = polygon_weights(y)
    return abs(float((field(y) * g).sum()) - exact)


def test_polygon_rule_is_second_order():
    errs = [_polygon_error(_cubic, I_CUBIC, n) for n in (32, 64, 128, 256)]
    orders = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    # Chord + trapezoid error has an expansion C/N² + O(N⁻⁴): at N ≥ 32 the observed order is 2 to
    # within (32)⁻² relative, so ±0.01 is a tight but safe window.
    assert all(abs(p - 2) < 0.01 for p in orders), orders


def test_polygon_sum_is_the_papers_trapezoid_sum():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 11, 4, generator=g, dtype=F64)
    s = torch.randn(3, 11, 4, generator=g, dtype=F64)
    gk, ell = polygon_weights(y)
    nxt_y, nxt_s = torch.roll(y, -1, 1), torch.roll(s, -1, 1)
    trapezoid = (0.5 * (s + nxt_s) * (nxt_y - y)).sum((1, 2))
    # Same sum reordered: equal to rounding (values are O(10), terms O(1)).
    assert torch.allclose((s * gk).sum((1, 2)), trapezoid, rtol=0, atol=1e-13)
    assert torch.allclose(ell.sum(1), (nxt_y - y).norm(dim=2).sum(1), rtol=1e-14)


def test_periodic_rule_is_spectral():
    errs = {}
    for n in (8, 16, 32):
        u, w = periodic_rule(n)
        y, t = _unit_circle(u)
        g, _ = tangent_weights(t, w)
        errs[n] = abs(float((_exp_field(y) * g).sum()) - I_EXP)
    # The integrand's Fourier coefficients fall like I_m(1) ~ 2^-m/m!, so aliasing at N = 8 leaves
    # ~1e-4 and at N = 16 less than 1e-15; a second-order rule would only gain a factor 4 per doubling.
    assert errs[8] < 1e-4
    assert errs[16] < 1e-14 * I_EXP and errs[32] < 1e-14 * I_EXP
    assert _polygon_error(_exp_field, I_EXP, 16) > 1e-2  # the polygon rule is nowhere near at N = 16


def test_clenshaw_curtis_exact_for_polynomials_and_spectral():
    for n in (1, 2, 5, 8):
        x, w = clenshaw_curtis_rule(n)
        deg = n + 1 if n % 2 == 0 else n
        for d in range(deg + 1):
            # Exact rule: only rounding of the O(1) weights remains.
            assert abs(float((w * x**d).sum()) - 1 / (d + 1)) < 1e-15
        assert abs(float((w * x ** (deg + 1)).sum()) - 1 / (deg + 2)) > 1e-10  # and no further
    x, w = clenshaw_curtis_rule(16)
    assert abs(float((w * torch.exp(x)).sum()) - (math.e - 1)) < 2e-15  # e^x is entire: floor by n = 16

    def runge_err(n):
        x, w = clenshaw_curtis_rule(n)
        return abs(float((w / (1 + 25 * (2 * x - 1) ** 2)).sum()) - math.atan(5) / 5)

    # Poles at 2x − 1 = ±i/5 give a Bernstein ellipse ρ = 1/5 + √(1 + 1/25) ≈ 1.22: the error falls
    # geometrically, by between ρ^-n and ρ^-2n per doubling from n (Trefethen 2008); algebraic
    # convergence of order p would give only 2^-p.
    rho = 0.2 + math.sqrt(1.04)
    ratio = runge_err(64) / runge_err(32)
    assert rho**-64 / 10 < ratio < rho**-32
    assert runge_err(64) < 1e-10


def test_rules_are_nested_under_doubling():
    # Element-wise formulas of the same real numbers ((2i)/(2n) = i/n), each correctly rounded: exact.
    for n in (4, 16, 64):
        assert torch.equal(periodic_rule(2 * n)[0][::2], periodic_rule(n)[0])
        assert torch.equal(clenshaw_curtis_rule(2 * n)[0][::2], clenshaw_curtis_rule(n)[0])


def test_loop_sums_on_a_circle():
    r = 1.5
    loop = RotationLoop(
        center=torch.zeros(1, 2, dtype=F64),
        a=torch.tensor([[r, 0.0]], dtype=F64),
        b=torch.tensor([[0.0, r]], dtype=F64),
        pairs=torch.tensor([[[0, 1]]]),
        index=torch.tensor([0]),
    )
    batch = loop.loops(64, "periodic")
    y = batch.points
    s = torch.stack([-y[..., 1], y[..., 0]], -1)  # s = (−y₂, y₁): ∮ s·dy = 2 × area = 2πr², s ∥ dy
    sums = loop_sums(s, batch)
    # The integrands are trigonometric polynomials of degree ≤ 2: the periodic rule is exact to rounding.
    exact = {
        "circulation": 2 * math.pi * r**2,
        "circulation_coarse": 2 * math.pi * r**2,
        "length": 2 * math.pi * r,
        "length_coarse": 2 * math.pi * r,
        "abs_y_length": 2 * math.pi * r**2,
        "abs_score_length": 2 * math.pi * r**2,
    }
    for k, v in exact.items():
        assert sums[k].dtype == F64 and abs(float(sums[k][0]) - v) < 1e-13 * v, k
    # float32 scores are accumulated in float64: only their own rounding (2^-24 relative) remains.
    s32 = loop_sums(s.float(), batch)["circulation"]
    assert s32.dtype == F64 and abs(float(s32[0]) - exact["circulation"]) < 1e-7 * exact["circulation"]


def test_rule_arguments_are_checked():
    with pytest.raises(UsageError):
        clenshaw_curtis_rule(0)
    with pytest.raises(UsageError):
        periodic_rule(0)
