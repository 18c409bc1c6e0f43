"""Neal's funnel under noise: quadrature accuracy against a finer rule and a brute-force integral,
score and divergence against autograd, sampling moments."""

import math

import pytest
import torch

from conservcheck import FlowProcess, OUProcess, VEProcess
from conservcheck.analytic.funnel import Funnel
from conservcheck.errors import UsageError

pytestmark = pytest.mark.usefixtures("single_thread")

CASES = [(OUProcess(), (1e-4, 0.5, 3.0)), (VEProcess(), (1e-3, 3.0, 30.0)), (FlowProcess(), (1e-3, 0.95))]


def _noised(funnel, t, n, seed, spread=1.0):
    """Forward samples x_t = α x0 + σ ε of the funnel, times ``spread`` (> 1 pushes them off the data)."""
    g = torch.Generator().manual_seed(seed)
    x0 = funnel.sample(n, g)
    tt = torch.tensor(t, dtype=torch.float64)
    a, s = funnel.process.alpha(tt), funnel.process.sigma(tt)
    return (a * x0 + s * torch.randn(x0.shape, generator=g, dtype=torch.float64)) * spread, tt


def _rel(a, b):
    return float(((a - b).reshape(a.shape[0], -1).norm(dim=1) / b.reshape(b.shape[0], -1).norm(dim=1)).max())


@pytest.mark.parametrize("n", [2, 9])
def test_quadrature_matches_a_finer_rule(n):
    worst = 0.0
    for proc, times in CASES:
        rule = Funnel(n, process=proc)
        # Twice as wide, four times as fine, four times the fallback nodes: its own error is far smaller.
        fine = Funnel(n, process=proc, half_width=24.0, resolution=0.05, fallback_nodes=16385)
        for t in times:
            # On the data and three times farther out (where the posterior of v turns bimodal).
            for spread in (1.0, 3.0):
                y, tt = _noised(rule, t, 32, seed=int(1000 * t) + n, spread=spread)
                lp, lp_fine = rule.log_prob(y, tt), fine.log_prob(y, tt)
                worst = max(
                    worst,
                    float(((lp - lp_fine).abs() / lp_fine.abs().clamp_min(1.0)).max()),
                    _rel(rule.score(y, tt), fine.score(y, tt)),
                    _rel(rule.divergence(y, tt)[:, None], fine.divergence(y, tt)[:, None]),
                )
    # Required 1e-6 relative; the spectrally accurate rule is at rounding level (observed ≤ 1e-13;
    # ≤ 2e-10 over 300 rows per case and n up to 99).
    assert worst <= 1e-6


def test_log_density_matches_a_brute_force_integral():
    # The raw integrand N(y_v; αv, σ²) N(v; 0, 9) Π N(y_i; 0, α² e^v + σ²) on 400,001 nodes over
    # v ∈ [−60, 60] (spacing 3e-4, far finer than any posterior width here): independent of the
    # Gaussian-part algebra and of the adaptive grid.
    proc, n = OUProcess(), 3
    f = Funnel(n, process=proc)
    for t, spread in ((0.05, 1.0), (0.7, 1.0), (0.7, 3.0), (2.5, 1.0)):
        y, tt = _noised(f, t, 4, seed=7, spread=spread)
        a, s = proc.alpha(tt), proc.sigma(tt)
        v = torch.linspace(-60, 60, 400001, dtype=torch.float64)
        c = a**2 * torch.exp(v) + s**2
        log_int = (
            -0.5 * ((y[:, :1] - a * v) ** 2 / s**2 + math.log(2 * math.pi) + 2 * torch.log(s))
            - 0.5 * (v**2 / 9 + math.log(2 * math.pi * 9))
            - 0.5 * ((y[:, 1:] ** 2).sum(1, keepdim=True) / c + n * torch.log(2 * math.pi * c))
        )
        brute = torch.logsumexp(log_int, dim=1) + math.log(float(v[1] - v[0]))
        # Both are spectrally accurate trapezoid rules: agreement at ~1e-13 nats.
        assert torch.allclose(f.log_prob(y, tt), brute, rtol=0, atol=1e-10)


def test_score_and_divergence_equal_autograd():
    for proc, times in CASES:
        f = Funnel(4, process=proc)
        for t in times:
            y, tt = _noised(f, t, 8, seed=3)
            yy = y.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(f.log_prob(yy, tt).sum(), yy)
            # The score is the posterior expectation (Fisher's identity) on the same grid as log p:
            # the two differ by the quadrature error only (observed ≤ 1e-11 relative).
            assert _rel(f.score(y, tt), grad) <= 1e-8
            # The grid is data-dependent (no vmap), so each row's Jacobian is taken on its own.
            trace = torch.stack(
                [torch.autograd.functional.jacobian(lambda z: f.score(z[None], tt)[0], row).trace() for row in y]
            )
            # Louis' identity vs differentiating the score: same grid, rounding-level agreement
            # relative to the largest term (−1/σ² at small t).
            scale = trace.abs() + 1 / proc.sigma(tt) ** 2
            assert float(((f.divergence(y, tt) - trace).abs() / scale).max()) <= 1e-8


def test_pure_noise_limit_is_standard_normal():
    # At OU time 20, α = 2e-9: p_t = N(0, I) up to terms of order α² e^v (≤ 1e-15 for |v| < 12).
    f = Funnel(9)
    y = torch.randn(32, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t = torch.tensor(20.0, dtype=torch.float64)
    expected = -0.5 * (y**2).sum(1) - 5 * math.log(2 * math.pi)
    assert torch.allclose(f.log_prob(y, t), expected, rtol=0, atol=1e-9)
    assert torch.allclose(f.score(y, t), -y, rtol=0, atol=1e-9)
    assert torch.allclose(f.divergence(y, t), torch.full((32,), -10.0, dtype=torch.float64), atol=1e-9)


def test_batch_rows_are_independent():
    f = Funnel(9, process=VEProcess())
    y, tt = _noised(f, 0.3, 24, seed=11, spread=3.0)
    whole = f.score(y, tt)
    rows = torch.cat([f.score(y[i : i + 1], tt) for i in range(24)])
    # Each row gets its own grid; the main grid's spacing follows the batch's widest τ, which is one
    # value here (one time), so rows agree to rounding.
    assert torch.allclose(whole, rows, rtol=1e-12, atol=0)


def test_sampling_moments():
    x = Funnel(3, scale=3.0).sample(40000, torch.Generator().manual_seed(0))
    v, z = x[:, 0], x[:, 1:] * torch.exp(-0.5 * x[:, :1])
    # v ~ N(0, 9): SE of the mean 3/√40000 = 0.015, of the variance 9·√(2/40000) ≈ 0.064; 4-5 SE margins.
    assert abs(float(v.mean())) < 0.07 and abs(float(v.var()) - 9.0) < 0.3
    # x_i e^{−v/2} ~ N(0, 1) independent of v.
    assert abs(float(z.mean())) < 0.02 and abs(float(z.var()) - 1.0) < 0.03


def test_invalid_settings_raise():
    with pytest.raises(UsageError):
        Funnel(0)
    with pytest.raises(UsageError):
        Funnel(3, resolution=2.0)
    with pytest.raises(UsageError):
        Funnel(3).score(torch.zeros(2, 5, dtype=torch.float64), 0.5)
