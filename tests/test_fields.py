"""Analytic fields: exact scores against autograd of their log-densities and potentials."""

import torch

from conservcheck import OUProcess, VEProcess
from conservcheck.analytic.fields import GaussianMixture, LinearField, gradient_field


def _autograd_score(logp, x, t):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(logp(x, t).sum(), x)
    return g


def test_mixture_score_matches_autograd_of_log_density():
    g = torch.Generator().manual_seed(0)
    for proc in (OUProcess(), VEProcess()):
        mix = GaussianMixture(
            torch.randn(4, 6, generator=g) * 3,
            torch.rand(4, 6, generator=g) + 0.1,
            weights=torch.tensor([1.0, 2.0, 3.0, 4.0]),
            process=proc,
            sample_shape=(2, 3),
        )
        x = torch.randn(8, 2, 3, generator=g, dtype=torch.float64) * 3
        t = torch.linspace(0.05, 2.0, 8, dtype=torch.float64)
        # Both sides are exact float64 formulas: agreement at rounding level.
        assert torch.allclose(mix.score(x, t), _autograd_score(mix.log_prob, x, t), rtol=1e-10, atol=1e-12)


def test_mixture_is_stable_far_from_the_data():
    mix = GaussianMixture(torch.zeros(2, 3), torch.tensor([0.1, 0.2]))
    x = torch.full((1, 3), 1e3, dtype=torch.float64)
    s = mix.score(x, torch.tensor([1e-3], dtype=torch.float64))
    assert torch.isfinite(s).all()


def test_mixture_sampling_moments():
    mix = GaussianMixture(torch.tensor([[2.0, -1.0]]), 0.5)
    x = mix.sample(20000, generator=torch.Generator().manual_seed(0))
    # 20,000 draws: standard error of the mean is 0.5/√20000 ≈ 0.0035; 5 SE margin.
    assert torch.allclose(x.mean(0), torch.tensor([2.0, -1.0], dtype=torch.float64), atol=0.018)


def test_linear_field_and_gradient_field():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(5, 5, generator=g, dtype=torch.float64)
    f = LinearField(m + m.T, m - m.T)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(f(x), x @ (2 * m).T, rtol=1e-12)
    pot = gradient_field(lambda y, t: (torch.cos(y) * y**2).sum(-1) * t)
    t = torch.tensor(0.7, dtype=torch.float64)
    expected = (2 * x * torch.cos(x) - x**2 * torch.sin(x)) * 0.7
    assert torch.allclose(pot(x, t), expected, rtol=1e-12)
