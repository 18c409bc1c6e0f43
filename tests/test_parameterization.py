"""Parameterization conversions, checked with oracle networks for Gaussian data.

For data N(0, σ_d² I) the noised marginal is N(0, (α²σ_d² + σ²) I), so the exact score is
−x/(α²σ_d² + σ²) and the ideal ε̂, x̂0, v̂ and velocity predictors are closed-form posterior means.
σ_d ≠ 1 keeps the ideal v-predictor from vanishing identically on the OU process.
"""

import pytest
import torch

from conservcheck import DiscreteSchedule, FlowProcess, OUProcess, VectorFieldProbe, VEProcess
from conservcheck.process import expand_like

SIGMA_D = 0.5


def oracle(kind, proc):
    """The ideal network of a given parameterization for N(0, σ_d² I) data, in canonical time."""

    def fn(x, t):
        t = t.to(torch.float64)
        a, s = expand_like(proc.alpha(t), x), expand_like(proc.sigma(t), x)
        var = a**2 * SIGMA_D**2 + s**2
        eps = s * x / var  # E[ε | x]
        x0 = a * SIGMA_D**2 * x / var  # E[x0 | x]
        if kind == "epsilon":
            return eps
        if kind == "x0":
            return x0
        if kind == "v":
            return a * eps - s * x0
        if kind == "velocity":
            da = expand_like(proc.alpha(t) * proc.dlog_alpha_dt(t), x)
            ds = expand_like(proc.dsigma2_dt(t) / (2 * proc.sigma(t)), x)
            return da * x0 + ds * eps
        return -x / var

    return fn


@pytest.mark.parametrize("proc", [OUProcess(), VEProcess(), FlowProcess()], ids=lambda p: p.name)
@pytest.mark.parametrize("kind", ["score", "epsilon", "x0", "v", "velocity"])
def test_oracle_networks_give_the_exact_score(proc, kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.05, 0.1, 0.3, 0.5, 0.8, 0.95], dtype=torch.float64)
    probe = VectorFieldProbe(
        oracle(kind, proc), process=proc, sample_shape=(2, 3), parameterization=kind, dtype=torch.float64
    )
    exact = oracle("score", proc)(x, t)
    # Exact algebra in float64: agreement to a few ulps of the score's magnitude.
    assert torch.allclose(probe.score(x, t), exact, rtol=1e-12, atol=1e-12)


def test_discrete_time_convention_feeds_the_index():
    sched = DiscreteSchedule.linear()
    seen = {}

    def net(x, k):
        seen["k"] = k
        return torch.zeros_like(x)

    probe = VectorFieldProbe(
        net, process=OUProcess(), time_convention=sched, sample_shape=(3,), parameterization="epsilon"
    )
    probe.score(torch.zeros(2, 3), sched.to_canonical(torch.tensor([10.0, 500.0])))
    assert seen["k"].dtype == torch.float32
    assert torch.allclose(seen["k"], torch.tensor([10.0, 500.0]), atol=1e-4)


def test_epsilon_conversion_uses_sqrt_not_variance():
    # s = −ε̂/√(1 − ᾱ): dividing by (1 − ᾱ) instead inflates magnitudes by 1/√(1 − ᾱ) (≈ 58× at ᾱ = 0.9997).
    sched = DiscreteSchedule.linear()
    k = torch.tensor([2.0])
    probe = VectorFieldProbe(
        lambda x, kk: torch.ones_like(x),
        process=OUProcess(),
        time_convention=sched,
        sample_shape=(1,),
        parameterization="epsilon",
        dtype=torch.float64,
    )
    s = probe.score(torch.zeros(1, 1, dtype=torch.float64), sched.to_canonical(k))
    ab = sched.alphas_cumprod[2]
    assert torch.allclose(s, -torch.ones(1, 1, dtype=torch.float64) / torch.sqrt(1 - ab), rtol=1e-12)
