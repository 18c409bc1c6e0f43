"""Reference scores: the empirical score against autograd and brute force, chunking, closed-form
divergences against autograd traces, and the spec strings of resolve_reference."""

import json
import math

import numpy as np
import pytest
import torch

from conservcheck import OUProcess, VEProcess
from conservcheck.analytic.fields import GaussianMixture, as_probe
from conservcheck.analytic.funnel import Funnel
from conservcheck.analytic.reference_scores import (
    CallableReference,
    EmpiricalScore,
    FieldReference,
    mixture_divergence,
    resolve_reference,
)
from conservcheck.errors import UsageError

pytestmark = pytest.mark.usefixtures("single_thread")


def _autograd_score(logp, x, t):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(logp(x, t).sum(), x)
    return g


def _trace_of_jacobian(score, x, t):
    """Δ log p per row from autograd of the score (one row at a time)."""
    return torch.stack(
        [
            torch.autograd.functional.jacobian(lambda z: score(z[None], t[i : i + 1])[0], x[i])
            .reshape(x[i].numel(), x[i].numel())
            .trace()
            for i in range(x.shape[0])
        ]
    )


@pytest.fixture(scope="module")
def latents():
    g = torch.Generator().manual_seed(0)
    return torch.randn(200, 2, 2, 2, generator=g, dtype=torch.float64) * 0.7 + 0.3


@pytest.mark.parametrize("process", [OUProcess(), VEProcess()])
def test_empirical_score_is_the_gradient_of_its_log_density(latents, process):
    ref = EmpiricalScore(latents, process, chunk_size=17)
    g = torch.Generator().manual_seed(1)
    for t in (0.01, 0.3, 2.0):
        x = torch.randn(6, 2, 2, 2, generator=g, dtype=torch.float64)
        tt = torch.full((6,), t, dtype=torch.float64)
        # Both are exact float64 formulas of the same sums: rounding-level agreement.
        assert torch.allclose(ref.score(x, tt), _autograd_score(ref.log_prob, x, tt), rtol=1e-10, atol=1e-10)


def test_empirical_log_density_matches_brute_force(latents):
    proc = OUProcess()
    ref = EmpiricalScore(latents, proc, chunk_size=33)
    x = torch.randn(5, 2, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for t in (0.005, 0.5):
        tt = torch.tensor(t, dtype=torch.float64)
        a, s = proc.alpha(tt), proc.sigma(tt)
        d2 = ((x.reshape(5, 1, -1) - a * latents.reshape(1, 200, -1)) ** 2).sum(-1)
        brute = torch.logsumexp(-d2 / (2 * s**2), 1) - math.log(200) - 4 * torch.log(2 * math.pi * s**2)
        # Expanded (centred) distances vs direct ones: float64 rounding of terms up to ~1e3 nats.
        assert torch.allclose(ref.log_prob(x, tt), brute, rtol=0, atol=1e-9)


def test_chunked_equals_unchunked(latents):
    proc = VEProcess()
    chunked, whole = EmpiricalScore(latents, proc, chunk_size=7), EmpiricalScore(latents, proc, chunk_size=10**6)
    x = torch.randn(9, 2, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for t in (0.01, 0.4, 5.0):
        tt = torch.tensor(t, dtype=torch.float64)
        # Only the order of float64 additions differs: agreement to ~1e-15 relative.
        assert torch.allclose(chunked.score(x, tt), whole.score(x, tt), rtol=1e-12, atol=0)
        assert torch.allclose(chunked.log_prob(x, tt), whole.log_prob(x, tt), rtol=1e-13, atol=0)
        # The divergence α² tr Cov/σ⁴ − D/σ² sums its spread term in expanded form, whose rounding
        # (~ε‖x0‖²α²/σ⁴) is ~1e-12 of D/σ² at σ = 0.01.
        scale = 8 / tt**2
        assert float((chunked.divergence(x, tt) - whole.divergence(x, tt)).abs().max() / scale) < 1e-11


def test_empirical_score_at_small_noise_is_the_nearest_points_conditional_score(latents):
    proc = OUProcess()
    ref = EmpiricalScore(latents, proc, chunk_size=50)
    t = torch.tensor(1e-4, dtype=torch.float64)
    a, s = proc.alpha(t), proc.sigma(t)
    eps = torch.randn(4, 2, 2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = a * latents[:4] + s * eps
    # σ = 0.014: the next data point is ≥ 0.3 away, a weight ratio below e^{-200}; the score is −ε/σ.
    assert torch.allclose(ref.score(x, t), -eps / s, rtol=1e-9, atol=0)
    assert torch.isfinite(ref.log_prob(x * 1e3, t)).all() and torch.isfinite(ref.score(x * 1e3, t)).all()


@pytest.mark.parametrize("t", [0.003, 0.4, 3.0])
def test_closed_form_divergences_equal_autograd_traces(latents, t):
    g = torch.Generator().manual_seed(5)
    tt = torch.full((5,), t, dtype=torch.float64)
    emp = EmpiricalScore(latents, OUProcess(), chunk_size=64)
    x = torch.randn(5, 2, 2, 2, generator=g, dtype=torch.float64)
    # Same sums differentiated two ways; relative to the largest term D/σ² of the divergence.
    scale = 8 / OUProcess().sigma(tt) ** 2
    assert float(((emp.divergence(x, tt) - _trace_of_jacobian(emp.score, x, tt)).abs() / scale).max()) < 1e-10
    mix = GaussianMixture(
        torch.randn(3, 4, generator=g) * 2, torch.rand(3, 4, generator=g) + 0.2, weights=torch.tensor([1.0, 2.0, 3.0])
    )
    y = torch.randn(5, 4, generator=g, dtype=torch.float64) * 2
    assert torch.allclose(mixture_divergence(mix, y, tt), _trace_of_jacobian(mix.score, y, tt), rtol=1e-10, atol=1e-10)
    fun = FieldReference(Funnel(3))
    z = fun.sample(5, g) * OUProcess().alpha(tt)[:, None]
    assert torch.allclose(fun.divergence(z, tt), _trace_of_jacobian(fun.score, z, tt), rtol=1e-8, atol=1e-8)


def test_empirical_sampling_returns_rows(latents):
    ref = EmpiricalScore(latents, OUProcess())
    draw = ref.sample(10, torch.Generator().manual_seed(0))
    assert draw.shape == (10, 2, 2, 2)
    # Every draw is a row of the data (stored centred; rounding of the mean only).
    dist = (draw.reshape(10, 1, -1) - latents.reshape(1, 200, -1)).abs().amax(-1).min(1).values
    assert float(dist.max()) < 1e-14


def _probe(dim, process=None):
    return as_probe(lambda x, t: -x, (dim,), process or OUProcess())


def test_resolve_analytic_specs():
    probe = _probe(10)
    funnel = resolve_reference("funnel", probe)
    assert isinstance(funnel.field, Funnel) and funnel.field.n == 9 and funnel.field.scale == 3.0
    assert funnel.kind == "funnel" and resolve_reference("gaussian", probe).kind == "gaussian"
    assert resolve_reference("funnel:scale=2", probe).field.scale == 2.0
    gauss = resolve_reference("gaussian:std=0.5,mean=1", probe)
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor(0.7, dtype=torch.float64)
    a, s = math.exp(-0.7), math.sqrt(1 - math.exp(-1.4))
    # N(1, 0.25 I) noised: N(α, (0.25 α² + σ²) I); score −(x − α)/(0.25α² + σ²) exactly.
    assert torch.allclose(gauss.score(x, t), -(x - a) / (0.25 * a**2 + s**2), rtol=1e-13)
    assert gauss.has_log_prob and gauss.has_divergence and gauss.has_sampler


def test_resolve_file_specs(tmp_path):
    probe = _probe(4)
    means, stds = [[0.0, 1.0, 2.0, 3.0], [-1.0, 0.0, 1.0, 0.0]], [0.5, 1.0]
    (tmp_path / "mix.json").write_text(json.dumps({"means": means, "stds": stds, "weights": [1, 3]}))
    np.savez(tmp_path / "mix.npz", means=np.array(means), stds=np.array(stds))
    torch.save({"means": torch.tensor(means), "stds": torch.tensor(stds)}, tmp_path / "mix.pt")
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    direct = GaussianMixture(torch.tensor(means), torch.tensor(stds), process=OUProcess())
    for name in ("mix.npz", "mix.pt"):
        ref = resolve_reference(f"mixture:{tmp_path / name}", probe)
        assert torch.allclose(ref.score(x, 0.3), direct.score(x, 0.3), rtol=1e-12)
    weighted = resolve_reference(f"mixture:{tmp_path / 'mix.json'}", probe)
    assert torch.allclose(weighted.field.log_weights.exp(), torch.tensor([0.25, 0.75], dtype=torch.float64))

    data = np.random.default_rng(0).normal(size=(50, 2, 2))
    np.save(tmp_path / "data.npy", data)
    torch.save(torch.from_numpy(data), tmp_path / "data.pt")
    np.savez(tmp_path / "data.npz", data=data, labels=np.arange(50))
    expected = EmpiricalScore(torch.from_numpy(data).reshape(50, 4), OUProcess()).score(x, 0.3)
    for name in ("data.npy", "data.pt", "data.npz"):
        ref = resolve_reference(f"data:{tmp_path / name}", probe)
        assert isinstance(ref, EmpiricalScore) and ref.n_data == 50 and ref.kind == "data"
        assert torch.allclose(ref.score(x, 0.3), expected, rtol=1e-12)


def test_resolve_callables_and_objects():
    probe = _probe(3)
    ref = resolve_reference(lambda x, t: -2 * x, probe)
    assert isinstance(ref, CallableReference) and ref.kind == "lambda"
    x = torch.ones(2, 3, dtype=torch.float64)
    assert torch.equal(ref.score(x, 0.5), -2 * x)
    mix = GaussianMixture(torch.zeros(1, 3), 1.0)
    assert isinstance(resolve_reference(mix, probe), FieldReference)
    bad = resolve_reference(lambda x, t: x[:, :2], probe)
    with pytest.raises(UsageError, match="returned"):
        bad.score(x, 0.5)


@pytest.mark.parametrize("spec", ["nonsense", "mixture:", "funnel:width=2", "gaussian:std=-1", "gaussian:std=abc", 3.5])
def test_unknown_or_malformed_specs_raise(spec):
    with pytest.raises(UsageError):
        resolve_reference(spec, _probe(4))


def test_mismatches_raise(tmp_path):
    np.save(tmp_path / "wrong.npy", np.zeros((10, 5)))
    with pytest.raises(UsageError, match="sample shape"):
        resolve_reference(f"data:{tmp_path / 'wrong.npy'}", _probe(4))
    with pytest.raises(UsageError, match="not found"):
        resolve_reference(f"data:{tmp_path / 'missing.npy'}", _probe(4))
    with pytest.raises(UsageError, match="process"):
        resolve_reference(GaussianMixture(torch.zeros(1, 4), 1.0, process=VEProcess()), _probe(4))
    with pytest.raises(UsageError, match="components"):
        resolve_reference(GaussianMixture(torch.zeros(1, 3), 1.0), _probe(4))
