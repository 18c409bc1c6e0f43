"""The transport check: probability-flow integration with a model and with the reference.

Known answers: the same field transports identically (zero distances); an error e = K s_ref with
constant antisymmetric K has ∇·(p e) = 0, so it moves every sample yet keeps every marginal; an error
of the same pointwise size ‖e‖ = k‖s_ref‖ that is not in that kernel (e = S s_ref, S symmetric) does not.
"""

import math

import pytest
import torch

from conservcheck import DiscreteSchedule, FlowProcess, OUProcess, VectorFieldProbe, VEProcess
from conservcheck.analytic.fields import GaussianMixture, as_probe
from conservcheck.analytic.reference_scores import EmpiricalScore, FieldReference
from conservcheck.batching import Batcher
from conservcheck.diagnostics.transport import integrate, sliced_wasserstein, transport_check
from conservcheck.errors import ProbeContractError, UsageError
from conservcheck.process import log_snr_grid
from conservcheck.timepoints import noise_span

pytestmark = pytest.mark.usefixtures("single_thread")

ROT = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
REFLECT = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
SETTINGS = {"n_samples": 400, "seed": 0, "t_start": 4.0, "t_end": 0.05, "n_steps": 30}


@pytest.fixture(scope="module")
def mixture():
    means = torch.tensor([[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]], dtype=torch.float64)
    return GaussianMixture(means, torch.tensor([0.5, 0.8, 0.3]), weights=torch.tensor([1.0, 2.0, 1.5]))


def _probe(mixture, matrix=None):
    if matrix is None:
        return as_probe(mixture.score, (2,), OUProcess())
    return as_probe(lambda x, t: mixture.score(x, t) + mixture.score(x, t) @ matrix.T, (2,), OUProcess())


@pytest.mark.parametrize(
    "process,t_start,t_end", [(OUProcess(), 5.0, 1e-3), (VEProcess(), 80.0, 0.002), (FlowProcess(), 0.99, 0.01)]
)
def test_steps_are_uniform_in_log_noise_to_signal(process, t_start, t_end):
    ts = log_snr_grid(process, t_start, t_end, 25 + 1)
    lam = torch.log(process.sigma(ts) / process.alpha(ts))
    steps = lam[1:] - lam[:-1]
    assert ts[0] == t_start and ts[-1] == t_end
    # Bisection to 200 halvings: λ hits its targets to rounding.
    assert torch.allclose(steps, steps.mean().expand(25), rtol=1e-10, atol=1e-12)


def test_noise_span():
    sched = DiscreteSchedule.linear()
    probe = VectorFieldProbe(lambda x, k: x, process=OUProcess(), sample_shape=(2,), time_convention=sched)
    start, end = noise_span(probe)
    assert start == pytest.approx(float(sched.t_grid[-1]), rel=1e-12)
    assert end == pytest.approx(float(sched.t_grid[0]), rel=1e-12)
    ou = noise_span(as_probe(lambda x, t: x, (2,), OUProcess()))
    assert ou[0] == 5.0 and ou[1] == pytest.approx(-0.5 * math.log1p(-1e-6), rel=1e-12)
    ve = noise_span(as_probe(lambda x, t: x, (2,), VEProcess()))  # data range (−1, 1): width 2
    assert ve == pytest.approx((100.0, 0.002), rel=1e-12)


def test_heun_converges_at_second_order(mixture):
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    proc = OUProcess()
    fine = integrate(mixture.score, proc, x, log_snr_grid(proc, 4.0, 0.05, 320 + 1))
    errors = [
        float((integrate(mixture.score, proc, x, log_snr_grid(proc, 4.0, 0.05, n + 1)) - fine).norm(dim=1).max())
        for n in (20, 40, 80)
    ]
    # Halving the step divides a second-order method's error by ~4 (observed 4.9, 4.3); Euler would give 2.
    assert all(3.0 < errors[i] / errors[i + 1] < 6.5 for i in range(2))
    euler = [
        float(
            (integrate(mixture.score, proc, x, log_snr_grid(proc, 4.0, 0.05, n + 1), "euler") - fine).norm(dim=1).max()
        )
        for n in (40, 80)
    ]
    assert 1.5 < euler[0] / euler[1] < 2.5


def test_the_same_field_transports_identically(mixture):
    res = transport_check(_probe(mixture), FieldReference(mixture), **SETTINGS)
    assert res.sliced_wasserstein == 0.0 and res.paired_distance == 0.0 and res.loglik_gap == 0.0
    assert res.n_evals == 400 * 30 * 2 and res.solver == "heun" and res.step_variable == "log(sigma/alpha)"
    # The reference flow from exact draws of p_{t_start} ends at draws of p_{t_end}: its mean log-density
    # matches E log p_{t_end} = −2.878 (20,000 exact draws, SE 0.007) within 3 SE of the 400-sample mean.
    assert abs(res.loglik_reference - (-2.878)) < 3 * res.loglik_reference_se
    data = res.to_dict()
    assert "x_model" not in data and data["loglik_gap"] == 0.0 and data["sliced_wasserstein_floor"] > 0


def test_divergence_free_error_keeps_the_marginals_and_a_generic_one_does_not(mixture):
    ref = FieldReference(mixture)
    floor_res = transport_check(_probe(mixture), ref, **SETTINGS)
    floor = floor_res.sliced_wasserstein_floor
    rotated = transport_check(_probe(mixture, 0.5 * ROT), ref, **SETTINGS)
    reflected = transport_check(_probe(mixture, 0.5 * REFLECT), ref, **SETTINGS)
    # Both errors have ‖e‖ = 0.5‖s_ref‖ at every point. The rotation moves samples by ~1.5 data-range
    # units (observed mean 3.0) …
    assert rotated.paired_distance > 1.0
    # … yet its end set is another draw from p_{t_end}: the sliced W₂ to the reference set stays at the
    # finite-sample level of two independent 400-sample sets (observed 0.163 vs floor 0.140), and the
    # mean log-likelihoods agree within 3 standard errors of their difference.
    assert rotated.sliced_wasserstein < 2 * floor
    gap_se = math.hypot(rotated.loglik_model_se, rotated.loglik_reference_se)
    assert abs(rotated.loglik_gap) < 3 * gap_se
    # The symmetric error of the same size changes the law: W₂ 25× the floor, log-likelihood 30 nats lower.
    assert reflected.sliced_wasserstein > 10 * floor
    assert reflected.loglik_gap > 10 * math.hypot(reflected.loglik_model_se, reflected.loglik_reference_se)


def test_empirical_reference_and_batch_independence(torch_threads):
    data = torch.randn(60, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = EmpiricalScore(data, OUProcess(), chunk_size=16)
    probe = as_probe(lambda x, t: ref.score(x, t) * 1.1, (2,), OUProcess())
    kw = {"n_samples": 40, "seed": 3, "t_start": 3.0, "t_end": 0.1, "n_steps": 10}
    one = transport_check(probe, ref, batcher=Batcher(64), **kw)
    many = transport_check(probe, ref, batcher=Batcher(7), **kw)
    # Start points come from per-sample streams and trajectories are independent: the same results up
    # to the rounding of matrix products, whose blocking depends on the batch (float64: ~1e-16).
    assert torch.allclose(one.x_model, many.x_model, rtol=1e-12, atol=1e-14)
    assert torch.allclose(one.x_reference, many.x_reference, rtol=1e-12, atol=1e-14)
    assert one.sliced_wasserstein == pytest.approx(many.sliced_wasserstein, rel=1e-10)
    assert one.paired_distance > 0 and one.loglik_model is not None


def test_sliced_wasserstein_of_a_shift():
    x = torch.randn(500, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    # Shifting a set by c moves every sorted projection by θᵀc: SW₂² = mean_θ (θᵀc)² → ‖c‖²/3 for
    # directions uniform on the sphere in 3-D; 2000 directions estimate it to ~3%.
    sw = sliced_wasserstein(x + shift, x, 2000, seed=0)
    assert sw == pytest.approx(float(shift.norm()) / math.sqrt(3), rel=0.06)
    assert sliced_wasserstein(x, x, 10, seed=0) == 0.0


def test_a_model_whose_flow_breaks_down_raises(mixture):
    broken = as_probe(lambda x, t: mixture.score(x, t) * torch.where(x[:, :1] > 0, math.nan, 1.0), (2,), OUProcess())
    with pytest.raises(ProbeContractError, match="NaN"):
        transport_check(broken, FieldReference(mixture), **SETTINGS)


def test_invalid_arguments_raise(mixture):
    for kw in ({"t_start": 0.05, "t_end": 4.0}, {"solver": "rk4"}, {"n_samples": 1}, {"t_start": -1.0, "t_end": -2.0}):
        with pytest.raises(UsageError):
            transport_check(_probe(mixture), FieldReference(mixture), **{**SETTINGS, **kw})
