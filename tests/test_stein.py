"""The Stein diagnostic on error fields with known answers (paper Eq. 20–21).

For a reference density p and an error e, 𝒮e = ∇·e + ∇log pᵀe = (1/p) ∇·(p e). Known answers:
e ≡ 0 gives 0; e = ∇g gives Δg + s_refᵀ∇g; e = K s_ref with constant antisymmetric K gives
p e = K∇p, whose divergence Σ K_ij ∂_i∂_j p vanishes, so 𝒮e = 0 pointwise however large e is; and for
any e, E_p[𝒮e] = ∫ ∇·(p e) = 0 (Stein's identity) when x_t ~ p_t.
"""

import math

import pytest
import torch
from conftest import assert_reproducible

from conservcheck import OUProcess, VEProcess
from conservcheck.analytic.fields import GaussianMixture, as_probe
from conservcheck.analytic.funnel import Funnel
from conservcheck.analytic.reference_scores import EmpiricalScore, FieldReference, resolve_reference
from conservcheck.batching import Batcher
from conservcheck.diagnostics.stein import COLUMNS, stein_diagnostic, stein_summary
from conservcheck.errors import UsageError
from conservcheck.timepoints import TimePoint, forward_samples

pytestmark = pytest.mark.usefixtures("single_thread")

MEANS = torch.tensor([[2.0, 0.0, 1.0], [-1.0, 1.5, 0.0], [0.0, -2.0, -1.0]], dtype=torch.float64)
K3 = torch.tensor([[0.0, 1.0, -0.5], [-1.0, 0.0, 2.0], [0.5, -2.0, 0.0]], dtype=torch.float64)
S3 = torch.tensor([[1.0, 0.5, 0.0], [0.5, -1.0, 0.3], [0.0, 0.3, 0.2]], dtype=torch.float64)


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture(MEANS, torch.tensor([0.5, 0.8, 0.3]), weights=torch.tensor([1.0, 2.0, 1.5]))


def _with_error(ref_score, error):
    """A probe s_θ = s_ref − e(x, s_ref), so that the diagnostic's e = s_ref − s_θ is ``error``."""
    return as_probe(lambda x, t: ref_score(x, t) - error(x, ref_score(x, t)), (MEANS.shape[1],), OUProcess())


def _run(probe, x0, reference, t=0.3, batch=64, **kw):
    return stein_diagnostic(
        probe, x0, TimePoint.from_t(probe.process, t), seed=0, batcher=Batcher(batch), reference=reference, **kw
    )


def test_zero_error_gives_zeros(mixture):
    x0 = mixture.sample(64, torch.Generator().manual_seed(0))
    probe = as_probe(mixture.score, (3,), OUProcess())
    exact = _run(probe, x0, mixture)
    assert exact.diagnostic == "stein" and exact.variant == "mixture" and set(exact.values) == set(COLUMNS)
    for col in ("err_norm", "rel_err_norm", "sref_dot_e", "div_e_se"):
        assert torch.count_nonzero(exact.values[col]) == 0
    # ∇·s_ref in closed form minus the exact Jacobian trace of the same field: float64 rounding of
    # divergences of size ~10 (observed ≤ 4e-15).
    assert float(exact.values["stein"].abs().max()) < 1e-12
    # Hutchinson on e itself: e ≡ 0 has a zero Jacobian, so every probe gives exactly 0.
    hutch = _run(probe, x0, mixture, divergence="hutchinson")
    assert all(torch.count_nonzero(hutch.values[c]) == 0 for c in COLUMNS)
    summary = stein_summary(hutch)
    assert summary["stein_rms"] == 0.0 and summary["err_norm_mean"] == 0.0


def test_gradient_error_matches_its_closed_form():
    # Gaussian data N(0, c² I) → p_t = N(0, v I), v = α²c² + σ², s_ref = −x/v. With
    # g(x) = Σ sin(ω_i x_i) + ½ xᵀAx + bᵀx the error e = ∇g = ω ⊙ cos(ω ⊙ x) + Ax + b has
    # ∇·e = Δg = −Σ ω_i² sin(ω_i x_i) + tr A and s_refᵀe = −xᵀ∇g / v.
    c, dim, tp = 0.7, 4, 0.4
    ref = resolve_reference(f"gaussian:std={c}", as_probe(lambda x, t: x, (dim,), OUProcess()))
    omega = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    a = torch.tensor(
        [[1.0, 0.2, 0.0, 0.0], [0.2, -0.5, 0.1, 0.0], [0.0, 0.1, 2.0, 0.3], [0.0, 0.0, 0.3, 0.4]], dtype=torch.float64
    )
    b = torch.tensor([0.5, -1.0, 0.0, 0.25], dtype=torch.float64)

    def grad_g(x):
        return omega * torch.cos(omega * x) + x @ a.T + b

    probe = as_probe(lambda x, t: ref.score(x, t) - grad_g(x), (dim,), OUProcess())
    x0 = ref.sample(400, torch.Generator().manual_seed(1))
    res = _run(probe, x0, ref, t=tp)
    time = TimePoint.from_t(OUProcess(), tp)
    x, _ = forward_samples(x0, time, seed=0)
    v = time.alpha**2 * c**2 + time.sigma**2
    e = grad_g(x)
    div = -(omega**2 * torch.sin(omega * x)).sum(1) + torch.trace(a)
    dot = -(x * e).sum(1) / v
    expected = {
        "err_norm": e.norm(dim=1),
        "rel_err_norm": e.norm(dim=1) / (x.norm(dim=1) / v),
        "div_e": div,
        "sref_dot_e": dot,
        "stein": div + dot,
    }
    for col, want in expected.items():
        # Exact divergences by forward-mode AD in float64: agreement at rounding level.
        assert torch.allclose(res.values[col], want, rtol=1e-10, atol=1e-10), col
    summary = stein_summary(res)
    # Stein's identity: E[Δg + s_refᵀ∇g] = 0 exactly; the sample mean's z-score is ~N(0, 1) (here 400
    # samples), and the pointwise values are clearly not zero.
    assert abs(summary["stein_identity_z"]) < 3
    assert summary["stein_mean_ci_lo"] < 0 < summary["stein_mean_ci_hi"]
    assert summary["stein_rms"] > 1.0


def test_antisymmetric_error_is_in_the_kernel(mixture):
    x0 = mixture.sample(300, torch.Generator().manual_seed(2))
    rotated = _run(_with_error(mixture.score, lambda x, s: s @ K3.T), x0, mixture)
    generic = _run(_with_error(mixture.score, lambda x, s: s @ S3.T + 0.5), x0, mixture)
    size = float(generic.values["stein"].pow(2).mean().sqrt())
    # 𝒮(K s_ref) = Σ K_ij H_ij + s_refᵀ K s_ref = 0 exactly; computed: rounding of terms of size ~10.
    assert float(rotated.values["stein"].abs().max()) < 1e-12 * max(1.0, size)
    assert float(rotated.values["err_norm"].mean()) > 2.0 and float(rotated.values["rel_err_norm"].mean()) > 1.0
    # A generic error of comparable size has a density source of order 1 at every point …
    assert size > 1.0 and float(generic.values["err_norm"].mean()) > 1.0
    # … whose mean still vanishes (Stein's identity), within its 95% interval (|z| < 3 leaves a margin
    # for the fixed seed; z ~ N(0, 1) under the identity).
    summary = stein_summary(generic)
    assert abs(summary["stein_identity_z"]) < 3 and summary["stein_rms"] > 10 * summary["stein_mean_se"]


def test_kernel_and_identity_with_empirical_and_funnel_references():
    g = torch.Generator().manual_seed(3)
    data = torch.randn(150, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.5, 2.0]) + 0.3
    emp = EmpiricalScore(data, OUProcess(), chunk_size=40)
    # x0 = the data rows themselves: x_t is then an exact draw from the noised empirical distribution.
    x0 = data[torch.randint(0, 150, (300,), generator=g)]
    rotated = _run(_with_error(emp.score, lambda x, s: s @ K3.T), x0, emp, t=0.2)
    assert float(rotated.values["stein"].abs().max()) < 1e-9 * float(rotated.values["err_norm"].pow(2).mean())
    generic = stein_summary(_run(_with_error(emp.score, lambda x, s: s @ S3.T + 0.5), x0, emp, t=0.2))
    assert abs(generic["stein_identity_z"]) < 3 and generic["stein_rms"] > 1.0
    # Funnel (D = 3, v first): the closed-form divergence comes from the same quadrature as the score,
    # so the kernel holds to the quadrature's accuracy (~1e-12 relative).
    funnel = FieldReference(Funnel(2))
    xf = funnel.sample(100, g)
    rotated = _run(_with_error(funnel.score, lambda x, s: s @ K3.T), xf, funnel, t=0.5)
    assert float(rotated.values["stein"].abs().max()) < 1e-8 * float(rotated.values["err_norm"].pow(2).mean())


def test_the_identity_check_fires_when_samples_are_not_from_the_reference(mixture):
    # x0 from a different (shifted) law: E[𝒮e] ≠ 0 for a generic e, and the z-score says so.
    x0 = mixture.sample(300, torch.Generator().manual_seed(4)) + torch.tensor([3.0, -2.0, 1.0])
    summary = stein_summary(_run(_with_error(mixture.score, lambda x, s: s @ S3.T + 0.5), x0, mixture))
    assert abs(summary["stein_identity_z"]) > 5


def test_hutchinson_agrees_with_exact_within_its_error(mixture):
    x0 = mixture.sample(200, torch.Generator().manual_seed(5))
    probe = _with_error(mixture.score, lambda x, s: s @ S3.T + torch.sin(x))
    exact = _run(probe, x0, mixture)
    hutch = _run(probe, x0, mixture, divergence="hutchinson", n_probes=16)
    assert exact.meta["divergence"] == "exact" and hutch.meta["divergence"] == "hutchinson"
    se = hutch.values["div_e_se"]
    assert bool((se > 0).all())
    z = (hutch.values["div_e"] - exact.values["div_e"]) / se
    # With 16 probes z follows Student's t with 15 degrees of freedom: E[z²] = 15/13 ≈ 1.15 and the
    # mean of 200 values of z² has a standard deviation ≈ 0.13; P(|t₁₅| > 5) ≈ 2e-4 per sample.
    assert 0.6 < float((z**2).mean()) < 1.9
    assert float(z.abs().max()) < 5
    # The non-divergence columns do not depend on the mode: the same field evaluated on the same batches.
    for col in ("err_norm", "rel_err_norm", "sref_dot_e"):
        assert torch.equal(hutch.values[col], exact.values[col])


def test_results_do_not_depend_on_batching_or_offset(mixture, torch_threads):
    x0 = mixture.sample(12, torch.Generator().manual_seed(6))
    probe = _with_error(mixture.score, lambda x, s: s @ S3.T)
    kw = {"divergence": "hutchinson", "n_probes": 4}
    whole = _run(probe, x0, mixture, batch=64, **kw)
    small = _run(probe, x0, mixture, batch=5, **kw)
    tail = _run(probe, x0[7:], mixture, batch=64, start=7, **kw)
    # Probes are keyed per sample, but ``s @ S3ᵀ`` may run another kernel for 5 rows than for 12
    # (docs/report.md#reproducibility): the float64 tolerance, with each sample's rounding relative to
    # the terms 𝒮e = ∇·e + s_refᵀe is made of (a cancelling sum is noise of their size, not of its own).
    v = whole.values
    scale = 1 + v["div_e"].abs() + v["sref_dot_e"].abs() + v["err_norm"] + v["div_e_se"]
    for col in COLUMNS:
        assert_reproducible(v[col], small.values[col], "fp64", scale=scale)
        assert_reproducible(v[col][7:], tail.values[col], "fp64", scale=scale[7:])


def test_modes_meta_and_errors(mixture):
    x0 = mixture.sample(8, torch.Generator().manual_seed(7))
    probe = as_probe(mixture.score, (3,), OUProcess())
    res = _run(probe, x0, mixture, exact_max_dim=2)
    assert res.meta["divergence"] == "hutchinson" and res.meta["n_probes"] == 16
    assert res.meta["strategy"] == "jvp" and res.meta["reference_divergence"] == "joint"
    # 8 forward passes for s_θ, 8 × 16 jvps at 3 forward-pass equivalents, plus the strategy check.
    assert res.meta["n_evals"] > 8 * (1 + 3 * 16)
    exact = _run(probe, x0, mixture, strategy="fd")
    assert exact.meta["strategy"] == "fd" and exact.meta["n_evals"] == 8 * (1 + 2 * 3)
    assert exact.meta["reference_divergence"] == "closed-form"
    for kw in ({"divergence": "bogus"}, {"strategy": "bogus"}, {"n_probes": 1}):
        with pytest.raises(UsageError):
            _run(probe, x0, mixture, **kw)
    with pytest.raises(UsageError):
        _run(probe, x0, GaussianMixture(MEANS, 0.5, process=VEProcess()))
    assert _run(probe, x0, "gaussian:std=2").variant == "gaussian"


def test_callable_reference_divergence_by_differentiation(mixture):
    # A reference without a closed-form divergence: its trace comes from Jacobian products instead.
    x0 = mixture.sample(50, torch.Generator().manual_seed(8))
    probe = _with_error(mixture.score, lambda x, s: s @ K3.T)
    res = _run(probe, x0, lambda x, t: mixture.score(x, t))
    assert res.meta["reference_divergence"] == "exact" and res.variant == "lambda"
    assert float(res.values["stein"].abs().max()) < 1e-12 * float(res.values["err_norm"].pow(2).mean())
    assert math.isfinite(stein_summary(res)["stein_mean"])
