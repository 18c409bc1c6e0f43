"""Processes and time conventions: known values, round trips, the conditional score."""

import math

import pytest
import torch

from conservcheck import DiscreteSchedule, FlowProcess, OUProcess, SubVPProcess, UsageError, VEProcess, VPSDETime
from conservcheck.process import SigmaLevels, get_process

PROCESSES = [OUProcess(), VEProcess(), FlowProcess(), SubVPProcess()]


def test_linear_schedule_reference_values():
    # Reference values derived by hand for DDPM's linear 1e-4…0.02, T = 1000 (see model-conventions):
    # ᾱ_k and t_k = −½ log ᾱ_k at k = 0, 99, 499, 999, quoted to 4 significant digits.
    s = DiscreteSchedule.linear()
    k = torch.tensor([0, 99, 499, 999])
    ab = s.alphas_cumprod[k]
    assert torch.allclose(ab, torch.tensor([0.9999, 0.8970, 0.07859, 4.04e-5], dtype=torch.float64), rtol=1e-3)
    t = s.to_canonical(k.double())
    assert torch.allclose(t, torch.tensor([5e-5, 0.0543, 1.272, 5.059], dtype=torch.float64), rtol=2e-3)


def test_cosine_schedule_matches_diffusers():
    from diffusers import DDPMScheduler

    ours = DiscreteSchedule.cosine()
    theirs = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    # diffusers accumulates in float32: agreement is at float32 rounding of a product of 1000 factors.
    assert torch.allclose(ours.alphas_cumprod, theirs, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "sigmoid"])
def test_schedules_match_diffusers(name):
    from diffusers import DDPMScheduler

    ours = getattr(DiscreteSchedule, name)(
        **({"beta_start": 0.00085, "beta_end": 0.012} if name == "scaled_linear" else {})
    )
    kwargs = {"beta_start": 0.00085, "beta_end": 0.012} if name == "scaled_linear" else {}
    theirs = DDPMScheduler(beta_schedule=name, **kwargs).alphas_cumprod.double()
    assert torch.allclose(ours.alphas_cumprod, theirs, rtol=1e-5, atol=1e-9)


def test_index_time_round_trip():
    s = DiscreteSchedule.cosine()
    k = torch.linspace(0, 999, 517, dtype=torch.float64)
    back = s.from_canonical(s.to_canonical(k))
    # Piecewise-linear interpolation inverts exactly up to float64 rounding of the grid.
    assert torch.allclose(back, k, atol=1e-9)
    # On grid points, α(t_k)² is ᾱ_k again through the OU process.
    ou = OUProcess()
    ki = torch.arange(0, 1000, 37)
    assert torch.allclose(ou.alpha(s.t_grid[ki]) ** 2, s.alphas_cumprod[ki], rtol=1e-12)


def test_index_out_of_range_is_a_usage_error():
    with pytest.raises(UsageError, match="out of range"):
        DiscreteSchedule.linear().to_canonical(torch.tensor([1000.0]))


@pytest.mark.parametrize("proc", PROCESSES, ids=lambda p: p.name)
def test_sigma_time_round_trip(proc):
    t = torch.tensor([0.01, 0.2, 0.7, 0.95], dtype=torch.float64)
    assert torch.allclose(proc.t_from_sigma(proc.sigma(t)), t, rtol=1e-12)


def test_ou_values():
    ou = OUProcess()
    t = torch.tensor([0.3], dtype=torch.float64)
    assert math.isclose(float(ou.alpha(t)), math.exp(-0.3), rel_tol=1e-15)
    assert math.isclose(float(ou.sigma(t)) ** 2, 1 - math.exp(-0.6), rel_tol=1e-14)


def test_vpsde_time_round_trip_and_alpha_bar():
    c = VPSDETime(0.1, 20.0)
    s = torch.linspace(1e-3, 1, 11, dtype=torch.float64)
    t = c.to_canonical(s)
    assert torch.allclose(c.from_canonical(t), s, rtol=1e-12)
    # ᾱ(s) = exp(−∫β) from Song et al.'s VPSDE equals α_OU(t)².
    log_ab = -(0.1 * s + 0.5 * 19.9 * s**2)
    assert torch.allclose(OUProcess().alpha(t) ** 2, log_ab.exp(), rtol=1e-12)


@pytest.mark.parametrize("proc", PROCESSES, ids=lambda p: p.name)
def test_conditional_score_is_autograd_of_gaussian(proc):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 5, generator=g, dtype=torch.float64)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    t = torch.tensor([0.1, 0.3, 0.5, 0.9], dtype=torch.float64)
    a, s = proc.alpha(t)[:, None], proc.sigma(t)[:, None]
    logp = torch.distributions.Normal(a * x0, s).log_prob(x).sum()
    (grad,) = torch.autograd.grad(logp, x)
    assert torch.allclose(proc.conditional_score(x.detach(), x0, t), grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("proc", PROCESSES, ids=lambda p: p.name)
def test_pf_ode_velocity_is_conditional_flow(proc):
    # For a point mass x0 the marginal score is the conditional score, and the probability-flow
    # velocity must equal d/dt (α x0 + σ ε) along the conditional path with ε fixed.
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64)
    x = proc.marginal_sample(x0, eps, t)
    v = proc.pf_ode_velocity(x, proc.conditional_score(x, x0, t), t)
    h = 1e-6
    dx = (proc.marginal_sample(x0, eps, t + h) - proc.marginal_sample(x0, eps, t - h)) / (2 * h)
    # Central differences in float64: truncation O(h²) ≈ 1e-12, rounding ≈ 1e-16/h ≈ 1e-10.
    assert torch.allclose(v, dx, atol=1e-8)


def test_times_outside_range_are_rejected():
    with pytest.raises(UsageError, match="outside"):
        FlowProcess().check_times(torch.tensor([0.5, 1.2]))


def test_subvp_marginals_are_score_sdes():
    # score_sde's subVPSDE.marginal_prob at SDE time s, written out: mean e^{lm} x0, std 1 − e^{2 lm}
    c, sub = VPSDETime(0.1, 20.0), get_process("subvp")
    s = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    lm = -0.25 * s**2 * (20.0 - 0.1) - 0.5 * s * 0.1
    t = c.to_canonical(s)
    assert torch.allclose(sub.alpha(t), torch.exp(lm), rtol=1e-14)
    assert torch.allclose(sub.sigma(t), 1 - torch.exp(2 * lm), rtol=1e-12)
    # below the OU process's √(1 − α²) at every t: no OU time has the sub-VP marginal
    assert bool((sub.sigma(t) < OUProcess().sigma(t)).all())
    # its SDE's diffusion, β(s)(1 − e^{−2∫β}) per unit s, is g² = 2(1 − e^{−4t}) per unit t (dt/ds = β/2)
    g2 = sub.dsigma2_dt(t) - 2 * sub.dlog_alpha_dt(t) * sub.sigma(t) ** 2
    beta = 0.1 + s * 19.9
    assert torch.allclose(g2, beta * (1 - torch.exp(4 * lm)) * 2 / beta, rtol=1e-12)


def test_sigma_levels_are_score_sdes_table_reversed():
    levels = SigmaLevels(0.01, 50.0, 1000)
    # score_sde's get_sigmas: exp(linspace(log σ_max, log σ_min, N)); native k counts from the clean end
    table = torch.exp(torch.linspace(math.log(50.0), math.log(0.01), 1000, dtype=torch.float64))
    k = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(levels.to_canonical(k), table.flip(0), rtol=1e-13)
    assert torch.allclose(levels.from_canonical(table.flip(0)), k, rtol=0, atol=1e-9)
    assert levels.discrete and levels.num_steps == 1000 and levels.to_dict()["sigma_max"] == 50.0
    with pytest.raises(UsageError, match="out of range"):
        levels.to_canonical(torch.tensor([1000.0]))
