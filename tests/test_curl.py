"""Curl diagnostic (Eq. 5): known answers on linear and conservative fields, and on a tiny diffusers UNet."""

import math

import pytest
import torch
from conftest import assert_reproducible

from conservcheck import DiscreteSchedule, OUProcess, VectorFieldProbe
from conservcheck.analytic.fields import GaussianMixture, LinearField, as_probe, gradient_field
from conservcheck.batching import Batcher
from conservcheck.diagnostics.curl import (
    HUTCHINSON_COLUMNS,
    SUBJACOBIAN_COLUMNS,
    Z95,
    block_indices,
    curl_hutchinson,
    curl_subjacobian,
    subjacobian,
    t_quantile,
)
from conservcheck.errors import UsageError
from conservcheck.geometry.jacobian import PRODUCT_COST, STRATEGIES
from conservcheck.timepoints import TimePoint, forward_samples

F64, F32 = torch.float64, torch.float32
OU = OUProcess()
TIME = TimePoint.from_t(OU, 0.4)
SHAPE = (2, 3, 2)  # D = 12, image-like, so the flattening order is exercised
D = 12


def _linear(seed=0, scale_k=0.5):
    g = torch.Generator().manual_seed(seed)
    m, n = torch.randn(D, D, generator=g, dtype=F64), torch.randn(D, D, generator=g, dtype=F64)
    return LinearField((m + m.T) / 2, scale_k * (n - n.T) / 2, SHAPE)


def _x0(b, seed=1, shape=SHAPE):
    return torch.randn(b, *shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * 0.8


def _sub(sets, mat):
    return torch.stack([mat[s][:, s] for s in sets])


# ------------------------------------------------------------------------------ sub-Jacobian


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_linear_field_block_is_2k_on_the_sampled_indices(strategy):
    lin = _linear()
    probe = as_probe(lin, SHAPE, OU)
    b, n = 5, 6
    x_t, _ = forward_samples(_x0(b), TIME, seed=3)
    sets = block_indices(D, n, 3, TIME.key, list(range(b)))
    j_ss = subjacobian(probe, x_t, torch.tensor(TIME.t, dtype=F64), sets, strategy, Batcher(7))
    # J_SS[i, j] = ∂s_{S_i}/∂x_{S_j} = A[S_i, S_j], so C = J_SS − J_SSᵀ = 2K_SS. AD: exact products of
    # O(1) matrices, ~1e-16. FD is exact for a linear field up to rounding of s(x ± hv) and x ± hv,
    # u·(|s| + |x|)/h ≈ 1e-16 · 5 / 6e-6 ≈ 1e-10: 1e-9 for fd.
    tol = 1e-12 if strategy != "fd" else 1e-9
    assert (j_ss - _sub(sets, lin.A)).abs().max() < tol
    assert (j_ss - j_ss.transpose(1, 2) - _sub(sets, 2 * lin.K)).abs().max() < tol
    res = curl_subjacobian(probe, _x0(b), TIME, seed=3, batcher=Batcher(7), block=n, strategy=strategy)
    two_k, two_s = _sub(sets, 2 * lin.K), _sub(sets, 2 * lin.S)
    off = ~torch.eye(n, dtype=torch.bool)
    want = {
        "curl_mean_abs": two_k.abs().sum((1, 2)) / (n * (n - 1)),
        "sym_mean_abs": (two_s.abs() * off).sum((1, 2)) / (n * (n - 1)),
        "curl_rel_fro": two_k.flatten(1).norm(dim=1) / two_s.flatten(1).norm(dim=1),
        "curl_fro2": two_k.flatten(1).pow(2).sum(1),
        "sym_fro2": two_s.flatten(1).pow(2).sum(1),
    }
    for col in SUBJACOBIAN_COLUMNS:
        assert res.values[col].dtype == F64 and res.values[col].shape == (b,)
        assert ((res.values[col] - want[col]).abs() / want[col]).max() < tol
    assert res.diagnostic == "curl" and res.variant == "subjacobian"
    assert res.meta["strategy"] == strategy and res.meta["block"] == n
    assert res.meta["products"] == ("columns (jvp)" if strategy == "fd" else "rows (vjp)")


def test_block_is_capped_at_the_dimension_and_costs_are_counted():
    probe = as_probe(_linear(), SHAPE, OU)
    res = curl_subjacobian(probe, _x0(3), TIME, seed=0, batcher=Batcher(64))  # block 64 > D = 12
    assert res.meta["block"] == D and res.meta["strategy"] == "jvp"
    # Check: 6 forward passes of 2 rows for the differences, then a jvp + vjp pair per AD candidate
    # (6 and 5 passes) on those 2 rows; then 3 samples × 12 rows (vjps) × 3 passes.
    assert res.meta["n_evals"] == 6 * 2 + (6 + 5) * 2 + 3 * D * PRODUCT_COST["jvp"]["vjp"]


# Floors of curl_rel_fro = ‖C‖_F/‖J_SS + J_SSᵀ‖_F and of rel_asym for exactly conservative fields.
# AD: J_ij and J_ji are computed along different operation orders, each a few ulps off: measured
# ≤ 5.5e-16 (float64) and ≤ 6.3e-7 (float32, the interval's upper end); the floors leave ≥ 15×.
# FD: truncation plus rounding ≈ ε^(2/3) (3.7e-11 float64, 2.4e-5 float32), measured ≤ 5.3e-11 and
# ≤ 5.4e-5; the floors leave ≥ 18×.
FLOOR = {(F64, "ad"): 1e-14, (F32, "ad"): 1e-5, (F64, "fd"): 1e-9, (F32, "fd"): 1e-3}


def _potential(y, t):
    y = y.flatten(1)
    w = torch.linspace(-1, 1, y.shape[1], dtype=y.dtype, device=y.device)
    return torch.log(torch.cosh(y)).sum(1) + 0.3 * torch.sin(y @ w) + 0.05 * (y**2).sum(1) ** 2


def _conservative(name):
    if name == "potential":
        return gradient_field(_potential)
    g = torch.Generator().manual_seed(0)
    return GaussianMixture(torch.randn(3, 8, generator=g) * 0.7, torch.rand(3, generator=g) * 0.3 + 0.2, process=OU)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("name", ["mixture", "potential"])
def test_conservative_fields_sit_at_the_floating_point_floor(name, dtype):
    probe = as_probe(_conservative(name), (8,), OU, dtype=dtype)
    x0 = _x0(6, shape=(8,))
    for strategy in STRATEGIES:
        floor = FLOOR[(dtype, "fd" if strategy == "fd" else "ad")]
        sub = curl_subjacobian(probe, x0, TIME, seed=0, batcher=Batcher(16), block=8, strategy=strategy)
        assert sub.values["curl_rel_fro"].max() < floor
        # The symmetric part is far from the floor: the field is not trivial.
        assert sub.values["sym_mean_abs"].min() > 1e-3
        hut = curl_hutchinson(probe, x0, TIME, seed=0, batcher=Batcher(16), n_probes=6, strategy=strategy)
        assert hut.values["rel_asym"].max() < floor and hut.values["rel_asym_ci_high"].max() < floor
        assert hut.values["jac_fro2"].min() > 1e-3


# ------------------------------------------------------------------------------ Hutchinson


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_hutchinson_recovers_the_linear_field_within_its_intervals(strategy):
    lin = _linear(seed=2, scale_k=0.3)
    probe = as_probe(lin, SHAPE, OU)
    b, n = 200, 16
    res = curl_hutchinson(probe, _x0(b), TIME, seed=5, batcher=Batcher(512), n_probes=n, strategy=strategy)
    v = res.values
    asym = float((2 * lin.K).pow(2).sum())
    jac = float(lin.A.pow(2).sum())
    rel = math.sqrt(asym) / (2 * math.sqrt(jac))  # = ‖K‖_F / ‖A‖_F
    t95 = t_quantile(Z95, n - 1)
    # Nominal 95% intervals: over 2000 samples of linear fields with rel_asym 0.26–0.69 the
    # jackknife-t intervals covered 0.93–0.96 (P = 16 and 64, every strategy). At 200 samples the
    # binomial sd is ≈ 0.016, so 0.88 is ≈ 3.5 sd below the lowest measured coverage.
    assert float(((v["asym_fro2"] - asym).abs() <= t95 * v["asym_fro2_se"]).double().mean()) >= 0.88
    assert float(((v["jac_fro2"] - jac).abs() <= t95 * v["jac_fro2_se"]).double().mean()) >= 0.88
    inside = (v["rel_asym_ci_low"] <= rel) & (rel <= v["rel_asym_ci_high"])
    assert float(inside.double().mean()) >= 0.88
    # Unbiased for ‖J − Jᵀ‖²_F: the mean over 200 samples lies within 4 standard errors of it.
    assert abs(float(v["asym_fro2"].mean()) - asym) < 4 * float(v["asym_fro2"].std()) / math.sqrt(b)
    assert set(v) == set(HUTCHINSON_COLUMNS)
    assert bool(((0 <= v["rel_asym_ci_low"]) & (v["rel_asym_ci_high"] <= 1)).all())
    # A named strategy is checked alone: 6 difference passes and its own jvp + vjp pair on 2 rows.
    per_probe = 2 if strategy == "fd" else PRODUCT_COST[strategy]["pair"]
    check = 6 * 2 + (0 if strategy == "fd" else 2 * per_probe)
    assert res.meta["n_evals"] == check + b * n * per_probe
    assert res.meta["n_probes"] == n and res.meta["strategy"] == strategy


def test_hutchinson_pure_rotation_has_relative_asymmetry_one():
    # J = K antisymmetric: J − Jᵀ = 2J, so ‖Jv − Jᵀv‖² = 4‖Jv‖² probe by probe and rel_asym = 1.
    g = torch.Generator().manual_seed(4)
    n = torch.randn(D, D, generator=g, dtype=F64)
    probe = as_probe(LinearField(torch.zeros(D, D, dtype=F64), n - n.T, SHAPE), SHAPE, OU)
    v = curl_hutchinson(probe, _x0(4), TIME, seed=0, batcher=Batcher(64), n_probes=4, strategy="jvp").values
    assert (v["rel_asym"] - 1).abs().max() < 1e-14
    assert (v["rel_asym_ci_high"] == 1).all()


# ------------------------------------------------------------------------------ reproducibility


@pytest.mark.parametrize("field", ["mixture", "linear"])
def test_same_seed_same_numbers_for_any_batch_size(field, torch_threads):
    if field == "mixture":
        p, x0 = as_probe(_conservative("mixture"), (8,), OU), _x0(5, shape=(8,))
    else:
        p, x0 = as_probe(_linear(), SHAPE, OU), _x0(5)
    for run, kw in ((curl_subjacobian, {"block": 4}), (curl_hutchinson, {"n_probes": 4})):
        for strategy in STRATEGIES:
            ref = run(p, x0, TIME, seed=9, batcher=Batcher(1000), strategy=strategy, **kw).values
            small = run(p, x0, TIME, seed=9, batcher=Batcher(1), strategy=strategy, **kw).values
            head = run(p, x0[:2], TIME, seed=9, batcher=Batcher(3), strategy=strategy, **kw).values
            tail = run(p, x0[2:], TIME, seed=9, batcher=Batcher(3), strategy=strategy, start=2, **kw).values
            # Index sets and probes are keyed per sample, but ``x @ Aᵀ`` runs another BLAS kernel for 1 row
            # than for many (~1 ulp apart, measured 1.3e-15 with AD): the float64 tolerance. The relative
            # metrics are scale-free; the asymmetry columns are differences of Jacobian entries, so their
            # rounding is relative to the size of J (scale). Central differences divide the output's
            # rounding by their relative step h ≈ 6e-6 (measured 8e-11): the tolerance of ``fd``.
            for col in ref:
                scale = 1.0 if col.startswith("rel_") or col == "curl_rel_fro" else _jacobian_scale(ref)
                assert_reproducible(ref[col], small[col], "fp64", scale=scale, strategy=strategy)
                whole = torch.cat([head[col], tail[col]])
                assert_reproducible(ref[col], whole, "fp64", scale=scale, strategy=strategy)
            other = run(p, x0, TIME, seed=10, batcher=Batcher(1000), strategy=strategy, **kw).values
            # Another seed draws other index sets and probes (the curl itself is rounding noise here).
            col = "sym_mean_abs" if "sym_mean_abs" in ref else "jac_fro2"
            assert not torch.allclose(ref[col], other[col], rtol=1e-3)


def _jacobian_scale(values: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per sample, the size of the Jacobian entries the curl columns are differences of."""
    if "jac_fro2" in values:
        return values["jac_fro2"].clamp_min(1.0)
    return (values["sym_mean_abs"] + values["curl_mean_abs"]).clamp_min(1.0)


def test_model_inputs_are_bit_identical_for_any_batch_size(torch_threads):
    """With central differences the model sees x_t ± h v for every index set or probe v: those inputs —
    the curl's random draws, as the model receives them — are the same bits for any batch size."""
    lin = _linear()
    seen: list[torch.Tensor] = []

    def recorded(x, t):
        seen.append(x.clone())
        return lin(x)

    p, x0 = as_probe(recorded, SHAPE, OU), _x0(5)
    for run, kw in ((curl_subjacobian, {"block": 4}), (curl_hutchinson, {"n_probes": 4})):
        inputs = []
        for batch in (1000, 3, 1):
            seen.clear()
            run(p, x0, TIME, seed=9, batcher=Batcher(batch), strategy="fd", **kw)
            inputs.append(sorted(tuple(r) for c in seen for r in c.flatten(1).tolist()))
        assert inputs[1] == inputs[0] and inputs[2] == inputs[0]


def test_usage_errors():
    probe = as_probe(_linear(), SHAPE, OU)
    x0 = _x0(2)
    with pytest.raises(UsageError, match="block"):
        curl_subjacobian(probe, x0, TIME, seed=0, batcher=Batcher(8), block=1)
    with pytest.raises(UsageError, match="n_probes"):
        curl_hutchinson(probe, x0, TIME, seed=0, batcher=Batcher(8), n_probes=2)
    with pytest.raises(UsageError, match="strategy"):
        curl_hutchinson(probe, x0, TIME, seed=0, batcher=Batcher(8), strategy="reverse")
    with pytest.raises(UsageError, match="x0 has shape"):
        curl_subjacobian(probe, _x0(2, shape=(12,)), TIME, seed=0, batcher=Batcher(8))
    with pytest.raises(UsageError, match="start"):
        curl_subjacobian(probe, x0, TIME, seed=0, batcher=Batcher(8), start=-1)


# ------------------------------------------------------------------------------ a real diffusers UNet


@pytest.fixture(scope="module")
def unet_probes(tmp_path_factory, single_thread):
    """Probes around a tiny attention UNet2DModel (float64), with the default and the classic processor."""
    from diffusers import UNet2DModel
    from diffusers.models.attention_processor import Attention, AttnProcessor

    folder = tmp_path_factory.mktemp("curl-unet")
    torch.manual_seed(0)
    UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        attention_head_dim=None,
    ).save_pretrained(folder)
    probes = {}
    for kind in ("default", "classic"):
        unet = UNet2DModel.from_pretrained(folder).to(F64).eval().requires_grad_(False)
        for module in unet.modules():
            if isinstance(module, Attention) and kind == "classic":
                module.set_processor(AttnProcessor())
                module.upcast_softmax = False  # keep the float64 model's softmax in float64
        probes[kind] = VectorFieldProbe(
            lambda x, k, unet=unet: unet(x, k).sample,
            process=OU,
            time_convention=DiscreteSchedule.linear(),
            parameterization="epsilon",
            sample_shape=(3, 8, 8),
            dtype=F64,
        )
    return probes


def test_unet_curl_with_auto_strategy_matches_differences(unet_probes):
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64) * 2 - 1
    t = torch.tensor(TIME.t, dtype=F64)
    x_t, _ = forward_samples(x0, TIME, seed=1)
    sets = block_indices(192, 8, 1, TIME.key, [0, 1])
    j_fd = subjacobian(unet_probes["classic"], x_t, t, sets, "fd", Batcher(16))
    for kind, probe in unet_probes.items():
        res = curl_subjacobian(probe, x0, TIME, seed=1, batcher=Batcher(16), block=8)
        strategy = res.meta["strategy"]
        if kind == "classic":
            assert strategy in ("jvp", "double_vjp")
        j_ss = subjacobian(probe, x_t, t, sets, strategy, Batcher(16))
        # Both processors compute the same function; central differences in float64 are good to
        # ~1e-10 of the largest entry, so 1e-7 separates agreement from a wrong product.
        assert (j_ss - j_fd).abs().max() < 1e-7 * j_fd.abs().max()
        # A random network is not a gradient: the curl is of the order of the symmetric part.
        assert res.values["curl_rel_fro"].min() > 0.05
        hut = curl_hutchinson(probe, x0, TIME, seed=1, batcher=Batcher(16), n_probes=4)
        assert hut.meta["strategy"] == strategy
        assert bool(((hut.values["rel_asym"] > 0.05) & (hut.values["rel_asym"] < 1)).all())
