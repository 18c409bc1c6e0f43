"""Loop-integral diagnostic (Eq. 4, Eq. 7): known answers on conservative and linear fields."""

import math

import pytest
import torch
from conftest import assert_reproducible

from conservcheck import OUProcess, VEProcess
from conservcheck.analytic.fields import GaussianMixture, LinearField, as_probe, gradient_field
from conservcheck.batching import Batcher
from conservcheck.diagnostics.loop_integral import COLUMNS, loop_diagnostic
from conservcheck.errors import UsageError
from conservcheck.geometry.loops import make_loops
from conservcheck.geometry.loops.projection import ProjectionLoop
from conservcheck.geometry.loops.rotation import RotationLoop
from conservcheck.timepoints import TimePoint

F64, F32 = torch.float64, torch.float32
D = 6
SMOOTH = [("rotation", "periodic"), ("rotation", "polygon"), ("projection", "clenshaw_curtis")]
ALL_RULES = SMOOTH + [("projection", "polygon"), ("brownian", "polygon")]
# Floor of |∮ s·dy| / ∮|s||dy| for an exactly conservative field. float64: the circulation sums
# N·D ≈ 6000 products whose rounding (2^-53 relative, a few ulps through exp/softmax) accumulates like a
# random walk, ≈ √6000 · 1e-16 ≈ 1e-14; 1e-13 allows a tenfold margin. float32: each score carries a
# relative rounding of a few × 2^-24 ≈ 6e-8; even if fully correlated along the loop that stays below
# 1e-6 (~16 ulps).
FLOOR = {F64: 1e-13, F32: 1e-6}


def _potential(y, t):
    """A nonquadratic potential coupling all components."""
    y = y.flatten(1)
    w = torch.linspace(-1, 1, y.shape[1], dtype=y.dtype, device=y.device)
    return torch.log(torch.cosh(y)).sum(1) + 0.3 * torch.sin(y @ w) + 0.05 * (y**2).sum(1) ** 2


def _mixture(process, seed=0):
    # Overlapping components, so the score is far from linear along the loops.
    g = torch.Generator().manual_seed(seed)
    means, stds = torch.randn(3, D, generator=g) * 0.7, torch.rand(3, generator=g) * 0.3 + 0.2
    return GaussianMixture(means, stds, process=process)


def _x0(b=6, d=D, seed=1):
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=F64) * 0.8


def _conservative_cases():
    ou, ve = OUProcess(), VEProcess()
    return [
        ("gmm-ou", _mixture(ou), ou, TimePoint.from_t(ou, 0.3)),
        ("gmm-ve", _mixture(ve), ve, TimePoint.from_t(ve, 0.8)),
        ("potential", gradient_field(_potential), ou, TimePoint.from_t(ou, 0.3)),
    ]


def _run(field, process, time, dtype=F64, x0=None, **kw):
    probe = as_probe(field, (x0.shape[1] if x0 is not None else D,), process, dtype=dtype)
    return loop_diagnostic(probe, _x0() if x0 is None else x0, time, seed=7, batcher=Batcher(8192), **kw)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("path,rule", SMOOTH)
def test_conservative_fields_vanish_at_the_floor_with_smooth_rules(path, rule, dtype):
    # On a rotation loop the polygon rule is the periodic rule times sinc(2π/N) (g_k = ½(y_{k+1} − y_{k−1})
    # is parallel to y′(u_k) on an ellipse), so it too is at the floor for a conservative field.
    for name, field, process, time in _conservative_cases():
        v = _run(field, process, time, dtype, path=path, rule=rule).values
        worst = float(v["circulation_ratio"].abs().max())
        assert worst < FLOOR[dtype], (name, worst)
        assert torch.all(v["abs_score_length"] > 0)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("path,rule", ALL_RULES)
def test_quadratic_potential_vanishes_for_every_loop_and_rule(path, rule, dtype):
    # s = S y is affine along every chord, so even the polygon rules integrate it exactly: the closed
    # polygon's sum telescopes to ½ y_Nᵀ S y_N − ½ y_0ᵀ S y_0 = 0.
    g = torch.Generator().manual_seed(3)
    m = torch.randn(D, D, generator=g, dtype=F64)
    field = LinearField(m + m.T, torch.zeros(D, D, dtype=F64))
    v = _run(field, OUProcess(), TimePoint.from_t(OUProcess(), 0.5), dtype, path=path, rule=rule).values
    assert float(v["circulation_ratio"].abs().max()) < FLOOR[dtype]


@pytest.mark.parametrize("path", ["projection", "brownian"])
def test_polygon_rule_on_nonlinear_conservative_fields_is_the_papers_trapezoid_sum(path):
    # A conservative field's polygon sum is not zero but the trapezoid error along the chords; check it
    # is exactly the paper's Σ ½(s_k + s_{k+1})·(y_{k+1} − y_k) and that it falls as predicted.
    for name, field, process, time in _conservative_cases():
        x0 = _x0()
        v = _run(field, process, time, path=path, rule="polygon", n_points=1000).values
        loops = make_loops(path, x0, time, 7, n_points=1000, rule="polygon")
        y = loops.points
        s = field(y.reshape(-1, D), torch.tensor(time.t, dtype=F64)).reshape(y.shape)
        trapezoid = (0.5 * (s + torch.roll(s, -1, 1)) * (torch.roll(y, -1, 1) - y)).sum((1, 2))
        # Two orderings of the same float64 sum: agreement to rounding of ∮|s||dy|.
        assert torch.all((v["circulation"] - trapezoid).abs() < 1e-13 * v["abs_score_length"]), name
        if path == "projection":
            # Smooth edges: I_N = C/N² + O(N⁻⁴), so |I_N| / |I_N − I_{N/2}| = 1/3 + O(N⁻²) (Richardson);
            # with 126 nodes per edge the O(N⁻²) part is below 1e-3, observed spread < 2e-3.
            assert torch.all((v["abs_circulation"] / v["quad_error"] - 1 / 3).abs() < 0.01), name
        else:
            # A Brownian chord Δ ~ N(0, hI) leaves a trapezoid error ∇³φ[Δ,Δ,Δ]/12 + O(h²): random sign and
            # size h^{3/2}, plus a mean O(h²). Over N chords both sum to O(1/N), so refining the same
            # bridge 16× should divide the mean |I| over the loops by ~16 (observed 12–30 here, the mean
            # of six heavy-tailed values being noisy); require at least 4.
            fine = _run(field, process, time, path=path, n_points=16000).values
            assert fine["abs_circulation"].mean() < v["abs_circulation"].mean() / 4, name


def _linear(seed=2, d=D):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=F64)
    return LinearField(m + m.T, m - m.T), LinearField(torch.zeros(d, d, dtype=F64), m - m.T)


def _pair_rotate(eps, pairs):
    """(Pε)_i = ε_j, (Pε)_j = −ε_i for each pair, and ε restricted to the paired components."""
    p_eps, eps_p = torch.zeros_like(eps), torch.zeros_like(eps)
    for i, j in pairs.tolist():
        p_eps[i], p_eps[j] = eps[j], -eps[i]
        eps_p[i], eps_p[j] = eps[i], eps[j]
    return p_eps, eps_p


@pytest.mark.parametrize("d", [D, 5])
def test_linear_field_rotation_loop_closed_form(d):
    # On the ellipse y = c + a cos θ + b sin θ, y′ = −a sin θ + b cos θ and for s = (S + K) y:
    # s·dy/dθ = y′ᵀ S y + y′ᵀ K c + y′ᵀ K (a cos θ + b sin θ). The first is d/dθ(½ yᵀ S y), the second
    # averages to zero, and with aᵀKa = bᵀKb = 0, aᵀKb = −bᵀKa the third is (sin²θ + cos²θ) bᵀ K a.
    # So ∮ s·dy = 2π bᵀ K a, with a = σ ε_p, b = σ Pε: 2π σ² (Pε)ᵀ K ε_p (ε_p = ε for even D; for odd D
    # the unpaired component sits in c).
    full, anti = _linear(d=d)
    ou = OUProcess()
    time = TimePoint.from_t(ou, 0.7)
    x0 = _x0(d=d)
    loop = RotationLoop.from_samples(x0, time, 7)
    eps = (loop.center + loop.a - time.alpha * x0) / time.sigma  # the forward noise, whole
    exact = []
    for b in range(x0.shape[0]):
        p_eps, eps_p = _pair_rotate(eps[b], loop.pairs[b])
        exact.append(2 * math.pi * time.sigma**2 * float(p_eps @ anti.K @ eps_p))
    exact = torch.tensor(exact, dtype=F64)
    for n in (1000, 12):
        v = _run(full, ou, time, x0=x0, path="rotation", rule="periodic", n_points=n).values
        # The integrand is a trigonometric polynomial of degree 2: exact for N ≥ 3 up to rounding.
        assert torch.allclose(v["circulation"], exact, rtol=1e-12, atol=0)
        # The symmetric part contributes nothing.
        v_anti = _run(anti, ou, time, x0=x0, path="rotation", rule="periodic", n_points=n).values
        assert torch.allclose(v["circulation"], v_anti["circulation"], rtol=1e-12, atol=0)
    # Polygon on the ellipse: g_k = ½(y_{k+1} − y_{k−1}) = sin(2π/N)/(2π/N) · y′(u_k)/N exactly.
    n = 1000
    v = _run(full, ou, time, x0=x0, path="rotation", rule="polygon", n_points=n).values
    assert torch.allclose(v["circulation"], exact * math.sin(2 * math.pi / n) / (2 * math.pi / n), rtol=1e-12, atol=0)


@pytest.mark.parametrize("path", ["rotation", "projection", "brownian"])
def test_linear_field_polygon_rule_equals_the_discrete_area_form(path):
    # On the chord y_k → y_{k+1} the field s = (S + K) y is affine, so the trapezoid rule is exact there:
    # ½(s_k + s_{k+1})·(y_{k+1} − y_k). The K part gives ½(y_{k+1}ᵀ K y_k − y_kᵀ K y_{k+1}) = y_{k+1}ᵀ K y_k
    # (xᵀ K x = 0), the S part ½(y_{k+1}ᵀ S y_{k+1} − y_kᵀ S y_k), which telescopes to 0 around the loop.
    # So the polygon sum is exactly Σ_k y_{k+1}ᵀ K y_k.
    full, _ = _linear()
    time = TimePoint.from_t(OUProcess(), 0.7)
    x0 = _x0()
    v = _run(full, OUProcess(), time, x0=x0, path=path, rule="polygon", n_points=1000, n_vertices=5).values
    y = make_loops(path, x0, time, 7, n_points=1000, rule="polygon", n_vertices=5).points
    exact = torch.einsum("bki,ij,bkj->b", torch.roll(y, -1, 1), full.K, y)
    # The area form sums N terms y_{k+1}ᵀ K y_k of size |K||y|², ~N/2π times the chord terms |s||Δy| of
    # the circulation, so its own float64 rounding reaches ~1e-16 · (N/2π) · √N ≈ 5e-13 of ∮|s||dy|
    # (observed ≤ 8e-14); 1e-12 is twice that bound.
    assert torch.all((v["circulation"] - exact).abs() < 1e-12 * v["abs_score_length"])
    assert torch.all(exact.abs() > 1e-3 * v["abs_score_length"])  # a real, non-vanishing circulation


def test_linear_field_projection_loop_closed_form():
    # Edge j is the great-circle arc y = c + R(cos φ e₁ + sin φ e₂), φ ∈ [0, θ_j], with e₁ = d̂_j and e₂
    # the unit component of d̂_{j+1} orthogonal to it. For s = K y: ∫ s·dy = R (v(θ_j) − v(0))ᵀ K c
    # + R² ∫ (−sin φ e₁ + cos φ e₂)ᵀ K (cos φ e₁ + sin φ e₂) dφ = R Δvᵀ K c + R² θ_j e₂ᵀ K e₁; the Δv
    # terms telescope around the loop, leaving Σ_j R² θ_j e₂ᵀ K e₁. The radial speed along the arc does
    # not matter: the line integral is parameterisation invariant.
    full, _ = _linear()
    time = TimePoint.from_t(OUProcess(), 0.7)
    x0 = _x0()
    loop = ProjectionLoop.from_samples(x0, time, 7, n_vertices=5)
    dh = loop.offsets / loop.offsets.norm(dim=2, keepdim=True)
    nxt = torch.roll(dh, -1, 1)
    cos = (dh * nxt).sum(2, keepdim=True)
    e2 = nxt - cos * dh
    e2 = e2 / e2.norm(dim=2, keepdim=True)
    theta = torch.acos(cos.squeeze(2).clamp(-1, 1))
    exact = loop.radius**2 * (theta * torch.einsum("bki,ij,bkj->bk", e2, full.K, dh)).sum(1)
    v = _run(
        full, OUProcess(), time, x0=x0, path="projection", rule="clenshaw_curtis", n_points=1000, n_vertices=5
    ).values
    # 200 Clenshaw–Curtis nodes per analytic arc: spectral accuracy, rounding-level agreement.
    assert torch.allclose(v["circulation"], exact, rtol=1e-12, atol=0)
    auto = _run(full, OUProcess(), time, x0=x0, path="projection", n_points="auto", n_vertices=5, tol=1e-6).values
    # The nested error estimate over-estimates the spectral rule's error, so the tolerance holds.
    assert torch.all(auto["converged"] == 1) and torch.all((auto["circulation"] - exact).abs() <= 1e-6 * exact.abs())


def test_auto_reaches_tolerance_with_few_nodes_and_reuses_them():
    ou = OUProcess()
    time = TimePoint.from_t(ou, 0.3)
    mix = _mixture(ou)
    res = _run(mix, ou, time, path="rotation", n_points="auto", tol=1e-6)
    v = res.values
    # Spectral convergence on a smooth loop: the float64 floor (1e-12 of ∮|s||dy|) by ≤ 256 nodes here.
    assert torch.all(v["converged"] == 1) and float(v["n_points"].max()) <= 256
    assert torch.all(v["quad_error"] <= 1e-12 * v["abs_score_length"])
    # Nested doubling evaluates each node once: the model is called N_final times per loop.
    assert res.meta["n_evals"] == int(v["n_points"].sum()) and res.meta["n_points"] == "auto"
    assert res.meta["n_points_max"] == int(v["n_points"].max()) and res.meta["rule"] == "periodic"
    # A linear field's rotation integrand is a degree-2 trigonometric polynomial: done at the first level.
    full, _ = _linear()
    lin = _run(full, ou, time, path="rotation", n_points="auto").values
    assert torch.all(lin["n_points"] == 16) and torch.all(lin["converged"] == 1)
    fixed = _run(full, ou, time, path="rotation", n_points=1000).values
    assert torch.allclose(lin["circulation"], fixed["circulation"], rtol=1e-12, atol=0)
    # A Brownian bridge has no smooth limit to refine towards: "auto" means the paper's fixed 1000 nodes.
    brown = _run(full, ou, time, path="brownian", n_points="auto")
    paper = _run(full, ou, time, path="brownian", n_points=1000)
    assert torch.all(brown.values["n_points"] == 1000) and brown.meta["n_evals"] == 6 * 1000
    # The same 1000 nodes through the same batches: the same bits.
    assert torch.equal(brown.values["circulation"], paper.values["circulation"])


def test_same_seed_same_numbers_for_any_batching_and_chunking(torch_threads):
    ou = OUProcess()
    time = TimePoint.from_t(ou, 0.3)
    mix = _mixture(ou)
    seen: list[torch.Tensor] = []

    def recorded(x, t):
        seen.append(x.clone())
        return mix.score(x, t)

    probe = as_probe(recorded, (D,), ou)
    x0 = _x0(7)
    for kw in (
        {"path": "rotation", "n_points": "auto"},
        {"path": "projection", "n_points": 200},
        {"path": "brownian", "n_points": 200},
    ):
        seen.clear()
        ref = loop_diagnostic(probe, x0, time, seed=7, batcher=Batcher(4096), **kw).values
        ref_inputs = _rows(seen)
        runs = []
        for batcher, extra in ((Batcher(5), {}), (Batcher(13), {"max_chunk_elements": 1})):
            seen.clear()
            runs.append(loop_diagnostic(probe, x0, time, seed=7, batcher=batcher, **extra, **kw).values)
            # The model's inputs (the loop nodes) are the same bits, whatever the batches and chunks.
            assert _rows(seen) == ref_inputs, kw
        parts = [
            loop_diagnostic(probe, x0[:3], time, seed=7, batcher=Batcher(64), **kw).values,
            loop_diagnostic(probe, x0[3:], time, seed=7, batcher=Batcher(64), start=3, **kw).values,
        ]
        runs.append({c: torch.cat([p[c] for p in parts]) for c in COLUMNS})
        for other in runs:
            for c in COLUMNS:
                # Kernels may sum in another order for other batch shapes or thread counts (docs/report.md#
                # reproducibility): equal within the float64 tolerance, the circulation's rounding taken
                # relative to ∮|s||dy|, the scale it is rounding noise of.
                assert_reproducible(ref[c], other[c], "fp64", scale=ref["abs_score_length"])
        different = loop_diagnostic(probe, x0, time, seed=8, batcher=Batcher(64), **kw).values
        assert not torch.equal(different["length"], ref["length"])


def _rows(calls: list[torch.Tensor]) -> list[tuple[float, ...]]:
    """Every input row the model saw, as exact floats, in a canonical order (chunks reorder the calls)."""
    return sorted(tuple(r) for c in calls for r in c.flatten(1).tolist())


def test_result_columns_units_and_meta():
    full, _ = _linear()
    ou = OUProcess()
    time = TimePoint.from_t(ou, 0.7, index=42)
    res = _run(full, ou, time, F32, path="projection", n_points=64, n_vertices=4)
    assert res.diagnostic == "loop" and res.variant == "projection" and res.time == time
    v = res.values
    assert set(v) == set(COLUMNS)
    for c in COLUMNS:
        assert v[c].dtype == F64 and v[c].device.type == "cpu" and v[c].shape == (6,)
    assert torch.allclose(v["abs_circulation"], v["circulation"].abs())
    assert torch.allclose(v["circulation_per_length"], v["circulation"] / v["length"])
    assert torch.allclose(v["eq7"], 2 * v["circulation"] / v["abs_y_length"])
    assert torch.allclose(v["circulation_ratio"], v["circulation"] / v["abs_score_length"])
    assert torch.all(v["circulation_ratio"].abs() <= 1) and torch.all(v["n_points"] == 64)
    meta = res.meta
    assert meta["rule"] == "clenshaw_curtis" and meta["n_points"] == 64 and meta["n_evals"] == 6 * 64
    assert meta["n_vertices"] == 4 and meta["shell_radius"] > 0 and meta["tol"] == 1e-6 and meta["floor_rel"] == 1e-6


def test_usage_errors():
    full, _ = _linear()
    ou = OUProcess()
    time = TimePoint.from_t(ou, 0.7)
    for kw in (
        {"path": "spiral"},
        {"path": "brownian", "rule": "periodic"},
        {"n_points": 3},
        {"n_points": "many"},
        {"tol": 0},
        {"path": "projection", "n_vertices": 2},
    ):
        with pytest.raises(UsageError):
            _run(full, ou, time, **kw)
    probe = as_probe(full, (D,), ou)
    with pytest.raises(UsageError):
        loop_diagnostic(probe, _x0(d=D + 1), time, seed=0, batcher=Batcher(8))
    with pytest.raises(UsageError):
        loop_diagnostic(probe, _x0(0), time, seed=0, batcher=Batcher(8))
    with pytest.raises(UsageError):
        loop_diagnostic(probe, _x0(), time, seed=0, batcher=Batcher(8), start=-1)


def test_smoke_on_a_tiny_diffusers_unet():
    diffusers = pytest.importorskip("diffusers")
    from conservcheck import DiscreteSchedule, VectorFieldProbe

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()
    probe = VectorFieldProbe(
        lambda x, k: unet(x, k).sample,
        process=OUProcess(),
        sample_shape=(1, 8, 8),
        parameterization="epsilon",
        time_convention=DiscreteSchedule.linear(),
    )
    time = TimePoint.from_t(OUProcess(), float(DiscreteSchedule.linear().t_grid[300]), index=300)
    x0 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    res = loop_diagnostic(probe, x0, time, seed=0, batcher=Batcher(64), n_points=64)
    v = res.values
    # An untrained network is not a gradient: a circulation far above the fp32 floor, bounded by ∮|s||dy|.
    assert torch.all(v["circulation_ratio"].abs() > 1e-4) and torch.all(v["circulation_ratio"].abs() <= 1)
    assert res.meta["n_evals"] == 128
