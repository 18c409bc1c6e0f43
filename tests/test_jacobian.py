"""Jacobian products and strategy selection: known answers on analytic fields and a tiny diffusers UNet."""

import math

import pytest
import torch
from conftest import assert_reproducible

from conservcheck import DiscreteSchedule, OUProcess, VectorFieldProbe
from conservcheck.analytic.fields import LinearField, gradient_field
from conservcheck.errors import ProbeContractError, UsageError
from conservcheck.geometry.jacobian import (
    STRATEGIES,
    divergence_exact,
    divergence_hutchinson,
    fd_step,
    jvp,
    jvp_vjp,
    rel_step_for,
    select_strategy,
    vjp,
)

F64, F32 = torch.float64, torch.float32
AD = ("jvp", "double_vjp")
SHAPE = (2, 3)
D = 6
T = 0.5
# Tolerances on products of an O(1) field with O(1) entries. AD: each entry is a short sum of
# correctly rounded terms, a few ulps of O(1) values (measured ≤ 4.4e-16), so 1e-13 leaves ~200×.
# FD: truncation h²|∂³s|/6 plus rounding u|s|/h with h = ∛ε ≈ 6e-6 is of order ε^(2/3) ≈ 4e-11 per
# unit of |s| (measured ≤ 1.3e-10); 1e-8 leaves ~75×.
TOL = {"jvp": 1e-13, "double_vjp": 1e-13, "fd": 1e-8}

_G = torch.Generator().manual_seed(3)
W = torch.randn(D, D, generator=_G, dtype=F64) / math.sqrt(D)


def field(x, t):
    """s_i = tanh((Wx)_i) + 0.3 x_i sin(x_{i−1}) + t x_i on flattened x: nonlinear, not conservative."""
    xf = x.reshape(x.shape[0], -1)
    t = torch.as_tensor(t, dtype=xf.dtype)
    t = t.reshape(-1, 1) if t.ndim else t
    return (torch.tanh(xf @ W.to(xf).T) + 0.3 * xf * torch.sin(xf.roll(1, 1)) + t * xf).reshape(x.shape)


def field_jacobian(x, t):
    """The analytic per-sample Jacobian of :func:`field`, [B, D, D]."""
    xf = x.reshape(x.shape[0], -1)
    sech2 = 1 - torch.tanh(xf @ W.T) ** 2
    jac = sech2[:, :, None] * W[None]
    prev = xf.roll(1, 1)
    idx = torch.arange(D)
    jac[:, idx, idx] += 0.3 * torch.sin(prev) + t
    jac[:, idx, (idx - 1) % D] += 0.3 * xf * torch.cos(prev)
    return jac


def _x(b=4, seed=0, dtype=F64):
    return torch.randn(b, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _potential(y, t):
    """φ = Σ log cosh y_i + 0.05 |y|⁴, with Laplacian Σ sech² y_i + 0.2 (D + 2) |y|²."""
    y = y.flatten(1)
    return torch.log(torch.cosh(y)).sum(1) + 0.05 * (y**2).sum(1) ** 2


def _laplacian(x):
    y = x.flatten(1)
    return (1 / torch.cosh(y) ** 2).sum(1) + 0.2 * (y.shape[1] + 2) * (y**2).sum(1)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_products_match_the_analytic_jacobian(strategy):
    x, v = _x(), _x(seed=1)
    jac = field_jacobian(x, T)
    want_jv = torch.einsum("bij,bj->bi", jac, v.flatten(1)).reshape(x.shape)
    assert (jvp(field, x, T, v, strategy) - want_jv).abs().max() < TOL[strategy]
    if strategy != "fd":
        want_jtv = torch.einsum("bji,bj->bi", jac, v.flatten(1)).reshape(x.shape)
        assert (vjp(field, x, T, v, strategy) - want_jtv).abs().max() < TOL[strategy]
        both = jvp_vjp(field, x, T, v, strategy)
        assert (both[0] - want_jv).abs().max() < TOL[strategy]
        assert (both[1] - want_jtv).abs().max() < TOL[strategy]


def test_products_take_per_sample_times():
    x, v = _x(), _x(seed=1)
    t = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    want = torch.einsum("bij,bj->bi", field_jacobian(x, t[:, None]), v.flatten(1)).reshape(x.shape)
    for s in STRATEGIES:
        assert (jvp(field, x, t, v, s) - want).abs().max() < TOL[s]


def test_fd_has_no_transposed_product_and_names_are_checked():
    x = _x()
    with pytest.raises(UsageError, match="no transposed product"):
        vjp(field, x, T, x, "fd")
    with pytest.raises(UsageError, match="no transposed product"):
        jvp_vjp(field, x, T, x, "fd")
    with pytest.raises(UsageError, match="unknown Jacobian strategy"):
        jvp(field, x, T, x, "forward")


def test_fd_step_follows_dtype_and_scale():
    v = torch.tensor([[1.0, -2.0, 0.5], [1.0, -1.0, 1.0]], dtype=F64)
    x = torch.tensor([[3.0, 3.0, 3.0], [0.1, 0.2, 0.0]], dtype=F64)
    h = fd_step(x, v)
    # rms(x_0) = 3, max|v_0| = 2; rms(x_1) < 1 is floored to 1.
    r = (2.0**-52) ** (1 / 3)
    assert torch.allclose(h, torch.tensor([r * 3 / 2, r], dtype=F64), rtol=1e-15)
    assert rel_step_for(F32) == pytest.approx((2.0**-23) ** (1 / 3), rel=1e-12)
    assert rel_step_for("bf16") == pytest.approx((2.0**-7) ** (1 / 3), rel=1e-12)
    with pytest.raises(UsageError):
        rel_step_for("fp8")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_divergence_exact_equals_the_analytic_trace(strategy):
    x = _x()
    got = divergence_exact(field, x, T, strategy)
    assert (got - field_jacobian(x, T).diagonal(dim1=1, dim2=2).sum(1)).abs().max() < D * TOL[strategy]
    lap = divergence_exact(gradient_field(_potential), x, T, strategy)
    # |y|² ≈ 6 makes the Laplacian O(10): the same tolerances, relative.
    assert ((lap - _laplacian(x)).abs() / _laplacian(x)).max() < D * TOL[strategy]


def test_hutchinson_divergence_is_exact_for_a_diagonal_jacobian():
    # Rademacher v has v_i² = 1, so vᵀJv = tr J for every probe when J is diagonal: zero variance.
    diag = torch.diag(torch.linspace(-1, 2, D, dtype=F64))
    lin = LinearField(diag, torch.zeros(D, D, dtype=F64), SHAPE)
    mean, se = divergence_hutchinson(lin, _x(), T, n_probes=4, seed=0, keys=range(4), strategy="jvp")
    assert torch.allclose(mean, torch.full((4,), float(diag.trace()), dtype=F64), rtol=0, atol=1e-14)
    assert se.abs().max() < 1e-14


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_hutchinson_divergence_within_its_error_of_the_exact_trace(strategy):
    b, n = 200, 8
    x = _x(b, seed=5)
    exact = divergence_exact(field, x, T, "jvp")
    keys = [("stein", "t0.5", i) for i in range(b)]
    mean, se = divergence_hutchinson(field, x, T, n_probes=n, seed=11, keys=keys, strategy=strategy)
    z = (mean - exact) / se
    # Nominal 95% coverage of ±2.36 se (Student t, 7 degrees of freedom); 0.88 is ≈ 4.5 binomial sd
    # (0.015 at 200 samples) below it.
    assert float((z.abs() <= 2.365).double().mean()) >= 0.88
    # Var(vᵀJv) = 2 Σ_{i≠j} ((J_ij + J_ji)/2)² for Rademacher v. The mean over 200 samples of the
    # 8-probe sample variance has a relative sd of ≈ √(2/7)/√200 ≈ 4%: 15% is > 3 sd.
    jac = field_jacobian(x, T)
    sym = (jac + jac.transpose(1, 2)) / 2
    var = 2 * (sym**2).sum((1, 2)) - 2 * (sym.diagonal(dim1=1, dim2=2) ** 2).sum(1)
    assert float((se**2 * n).mean() / var.mean()) == pytest.approx(1.0, abs=0.15)


def test_hutchinson_divergence_is_keyed_per_sample(torch_threads):
    x = _x(6, seed=2)
    keys = [("div", i) for i in range(6)]
    full = divergence_hutchinson(field, x, T, n_probes=5, seed=4, keys=keys, strategy="jvp")
    part = divergence_hutchinson(field, x[3:], T, n_probes=5, seed=4, keys=keys[3:], strategy="jvp")
    # The probes are keyed per sample (bit-identical: tests/test_paths.py), but the field's ``x @ Wᵀ`` may
    # run another BLAS kernel for 3 rows than for 6: the float64 tolerance (docs/report.md#
    # reproducibility), vᵀJv being a sum of D = 6 products of O(1) Jacobian entries (scale 1).
    assert_reproducible(full[0][3:], part[0], "fp64")
    assert_reproducible(full[1][3:], part[1], "fp64")
    # The same probes under another AD strategy: the same numbers to rounding.
    other = divergence_hutchinson(field, x, T, n_probes=5, seed=4, keys=keys, strategy="double_vjp")
    assert (other[0] - full[0]).abs().max() < 1e-13
    with pytest.raises(UsageError, match="n_probes"):
        divergence_hutchinson(field, x, T, n_probes=1, seed=4, keys=keys, strategy="jvp")
    with pytest.raises(UsageError, match="keys"):
        divergence_hutchinson(field, x, T, n_probes=4, seed=4, keys=keys[:2], strategy="jvp")


def test_select_strategy_prefers_candidates_in_order_and_records_deviations():
    x = _x()
    choice = select_strategy(field, x, T)
    assert choice.name == "jvp" and not choice.rejected
    # float64 check: the AD products agree with central differences to the differences' own error.
    assert set(choice.deviations) == set(STRATEGIES)
    assert max(choice.deviations.values()) < 1e-9 and choice.tolerance == 1e-6
    assert select_strategy(field, x, T, ("double_vjp", "jvp")).name == "double_vjp"
    fd = select_strategy(field, x, T, ("fd",))
    assert fd.name == "fd" and fd.max_rel_dev == fd.reference_error < 1e-9
    meta = choice.to_meta()
    assert meta["strategy"] == "jvp" and meta["strategy_max_rel_dev"] == choice.max_rel_dev


class _SinWrongTangent(torch.autograd.Function):
    """sin with a correct backward but a forward-mode rule twice too large."""

    @staticmethod
    def forward(x):
        return torch.sin(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.cos(x)

    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        return 2 * tangent * torch.cos(x)


def _wrong_tangent_field(x, t):
    return _SinWrongTangent.apply(x) + 0.1 * x.roll(1, -1)


def test_select_strategy_rejects_a_wrong_forward_rule():
    choice = select_strategy(_wrong_tangent_field, _x(), T)
    assert choice.name == "double_vjp"
    # The wrong rule doubles the cos(x) part of J v: an O(1) deviation, far above 1e-6.
    assert "deviates from central differences" in choice.rejected["jvp"]
    assert choice.deviations["jvp"] > 0.1 and choice.deviations["double_vjp"] < 1e-9
    with pytest.raises(ProbeContractError, match="no Jacobian strategy works"):
        select_strategy(_wrong_tangent_field, _x(), T, ("jvp",))


# ------------------------------------------------------------------------- a real diffusers UNet


def tiny_attention_unet(tmp_path, classic: bool):
    """UNet2DModel with an attention block (DDPM-CIFAR10 layout, shrunk), saved and reloaded, float64."""
    from diffusers import UNet2DModel
    from diffusers.models.attention_processor import Attention, AttnProcessor

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
    ).save_pretrained(tmp_path)
    unet = UNet2DModel.from_pretrained(tmp_path).to(F64).eval().requires_grad_(False)
    for module in unet.modules():
        if isinstance(module, Attention) and classic:
            module.set_processor(AttnProcessor())
            # The classic processor's softmax otherwise runs in float32 inside a float64 model.
            module.upcast_softmax = False
    return unet


@pytest.fixture(scope="module", params=["default", "classic"])
def unet_probe(request, tmp_path_factory, single_thread):
    unet = tiny_attention_unet(tmp_path_factory.mktemp(f"unet-{request.param}"), request.param == "classic")
    probe = VectorFieldProbe(
        lambda x, k: unet(x, k).sample,
        process=OUProcess(),
        time_convention=DiscreteSchedule.linear(),
        parameterization="epsilon",
        sample_shape=(3, 8, 8),
        dtype=F64,
    )
    return request.param, probe


def test_auto_selection_on_a_tiny_unet_agrees_with_differences(unet_probe):
    kind, probe = unet_probe
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = torch.tensor(0.3, dtype=F64)
    choice = select_strategy(probe.score, x, t)
    assert choice.name in STRATEGIES
    # Every candidate either ran and agreed, or is rejected with a reason.
    for name in STRATEGIES:
        assert name in choice.rejected or choice.deviations[name] <= choice.tolerance
        assert name not in choice.rejected or choice.rejected[name]
    if kind == "classic":
        # bmm + softmax attention is twice differentiable: an AD strategy is available.
        assert choice.name in AD
    # Independent check at twice the step: a float64 network agrees to ~1e-10; 1e-6 is the tolerance.
    v = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    got = jvp(probe.score, x, t, v, choice.name)
    ref = jvp(probe.score, x, t, v, "fd", rel_step=2 * rel_step_for(F64))
    assert float((got - ref).norm() / ref.norm()) < 1e-6
    assert choice.tolerance == 1e-6 and choice.max_rel_dev < 1e-6
