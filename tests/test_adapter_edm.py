"""EDM denoisers: the four preconditionings against the exact Gaussian score, and pickle loading.

Oracle: data N(0, σ_d² I) with σ_d = 0.8 (≠ 1, and ≠ EDM's σ_data = 0.5, where the ideal EDM network F
would vanish). Noised in EDM's VE coordinates x = y + σ n, the ideal denoiser is D*(x; σ) = σ_d²/(σ_d² +
σ²) x and the exact score −x/(σ_d² + σ²). The oracle raw network recovers σ from the c_noise it is fed and
returns the F that makes D = D*, using the formulas of EDM's preconditioning table written out here.
"""

from __future__ import annotations

import math
import pathlib
import pickle

import pytest
import torch

from conservcheck.adapters import edm
from conservcheck.adapters.resolve import load_reference
from conservcheck.errors import ModelLoadError
from conservcheck.geometry import jacobian

SIGMA_D = 0.8
SHAPE = (2, 4, 4)
M = 1000


def exact_score(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return -x / (SIGMA_D**2 + sigma**2).reshape(-1, 1, 1, 1)


def iddpm_levels() -> torch.Tensor:
    """iDDPM's noise levels u_0 > … > u_M = 0 by EDM's recursion, in float32 as EDM computes them."""
    u = torch.zeros(M + 1)
    abar = lambda j: (0.5 * math.pi * torch.tensor(j) / M / 1.008).sin() ** 2  # noqa: E731 - C_2 = 0.008
    for j in range(M, 0, -1):
        u[j - 1] = ((u[j] ** 2 + 1) / (abar(j - 1) / abar(j)).clip(min=0.001) - 1).sqrt()
    return u


def table(name: str, c_noise: torch.Tensor) -> tuple:
    """(σ, c_skip, c_out, c_in) of EDM's table, σ recovered from c_noise."""
    if name == "edm":
        sigma = torch.exp(4 * c_noise)
        return (
            sigma,
            0.25 / (sigma**2 + 0.25),
            0.5 * sigma / torch.sqrt(sigma**2 + 0.25),
            1 / torch.sqrt(sigma**2 + 0.25),
        )
    if name == "ve":
        sigma = 2 * torch.exp(c_noise)
        return sigma, torch.ones_like(sigma), sigma, torch.ones_like(sigma)
    if name == "vp":
        t = c_noise / (M - 1)
        sigma = torch.sqrt(torch.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1)
    else:
        sigma = iddpm_levels().to(c_noise.dtype)[(M - 1 - c_noise).round().long()]
    return sigma, torch.ones_like(sigma), -sigma, 1 / torch.sqrt(sigma**2 + 1)


class OracleF(torch.nn.Module):
    """The raw network F(c_in x; c_noise) that the preconditioning ``name`` turns into D*."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x_in, c_noise, class_labels=None):
        sigma, c_skip, c_out, c_in = (c.reshape(-1, 1, 1, 1) for c in table(self.name, c_noise))
        x = x_in / c_in
        f = (SIGMA_D**2 / (SIGMA_D**2 + sigma**2) * x - c_skip * x) / c_out
        # iDDPM networks also predict a variance: 2C channels, of which the first C are used
        return torch.cat([f, torch.full_like(f, 7.0)], 1) if self.name == "iddpm" else f


class EDMPrecond(torch.nn.Module):
    """A preconditioned denoiser with the interface of EDM's ``EDMPrecond`` around the oracle."""

    def __init__(self, label_dim: int = 0) -> None:
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = SHAPE[1], SHAPE[0], label_dim
        self.sigma_data, self.sigma_min, self.sigma_max = 0.5, 0.002, 80.0
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.model = OracleF("edm")
        self.calls_fp32 = []

    def forward(self, x, sigma, class_labels=None, force_fp32=False):
        self.calls_fp32.append(force_fp32)
        return edm.Denoiser(self.model, edm.EDMPreconditioning(0.5), SHAPE[0])(x, sigma) * self.weight


class Touch:
    """Unpickling this creates ``path``: evidence of code run while loading."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def inputs(sigma: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.tensor(sigma, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(sigma), *SHAPE, generator=g, dtype=torch.float64) * torch.sqrt(SIGMA_D**2 + s**2).reshape(
        -1, 1, 1, 1
    )
    return x, s


@pytest.mark.parametrize("name", ["edm", "vp", "ve"])
def test_preconditioned_oracle_gives_exact_score(name):
    x, sigma = inputs([0.002, 0.05, 0.5, 3.0, 80.0])
    probe = edm.wrap(OracleF(name), precond=name, sample_shape=SHAPE, dtype=torch.float64)
    assert probe.process.name == "ve" and probe.parameterization == "x0"
    got = probe.score(x, sigma)
    # float64: s = (D - x)/sigma^2 cancels D - x ~ (sigma/sigma_d)^2 x, which at sigma = 0.002 costs a factor
    # (sigma_d/sigma)^2 = 1.6e5 on 2.2e-16 rounding, ~4e-11 (measured 1.8e-11 in norm)
    assert torch.allclose(got, exact_score(x, sigma), rtol=1e-9, atol=0)


def test_iddpm_oracle_on_its_levels():
    u = iddpm_levels().double()
    sigma = u[[3, 100, 500, 900, 999]]  # on the table: the nearest level is σ itself
    x, _ = inputs([0.0] * 5)
    x = x / SIGMA_D * torch.sqrt(SIGMA_D**2 + sigma**2).reshape(-1, 1, 1, 1)
    probe = edm.wrap(OracleF("iddpm"), precond="iddpm", sample_shape=SHAPE, dtype=torch.float64)
    # cancellation in D - x costs (sigma_d/u_999)^2 = 1.6e4 on float64 rounding: ~4e-12
    assert torch.allclose(probe.score(x, sigma), exact_score(x, sigma), rtol=1e-10, atol=0)
    levels = edm.IDDPMPreconditioning().u
    # The same float32 operations on scalars, in the same order: the same bits on any one machine.
    assert torch.equal(levels, iddpm_levels())
    # Against an independent computation: the recursion in float64 (Python floats). EDM evaluates it in
    # float32: each level adds its own rounding (a few ulps of 2^-24 through sin², the ratio and the square
    # root), and carries the rounding of the level below without growth (u_{j−1}² r = u_j² + 1 − r ≥ u_j²,
    # so a relative error of u_j² shrinks in u_{j−1}²). Near the clean end (u_j² + 1)/r − 1 cancels
    # (r = ᾱ_{j−1}/ᾱ_j → 1) and amplifies the rounding of r by ≈ 1/u_j². 16 ulps × (1 + 1/u_j²) bounds both (measured
    # 1.1e-7 at u_0 and 4.8e-4 at u_{M−1}; the bound is 9.5e-7 and 2.3e-2 there). Platforms differ in the
    # last bits of float32 sin and sqrt, so no level is pinned to its bits.
    exact = [0.0] * (M + 1)
    abar = lambda j: math.sin(0.5 * math.pi * j / M / 1.008) ** 2  # noqa: E731 - C_2 = 0.008
    for j in range(M, 0, -1):
        exact[j - 1] = math.sqrt((exact[j] ** 2 + 1) / max(abar(j - 1) / abar(j), 0.001) - 1)
    ref = torch.tensor(exact[:M], dtype=torch.float64)
    bound = 16 * 2.0**-24 * (1 + 1 / ref**2)
    assert bool(((levels[:M].double() - ref).abs() <= bound * ref).all()) and float(levels[M]) == 0.0
    # sigma_max = u_0 and sigma_min = u_{M-1} of NVlabs/edm's own iDDPMPrecond (float32, read from it on
    # one machine): within the same bound of the float64 values, so within twice of ours.
    assert float(levels[0]) == pytest.approx(20291.171875, rel=2 * float(bound[0]))
    assert float(levels[M - 1]) == pytest.approx(0.006422337144613266, rel=2 * float(bound[M - 1]))


def test_coefficient_known_values():
    s = torch.tensor([0.5], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm.EDMPreconditioning(0.5).coefficients(s)
    # at sigma = sigma_data: c_skip = 1/2, c_out = sigma_data/sqrt 2, c_in = 1/(sigma_data sqrt 2)
    want = torch.tensor([0.5, 0.5 / math.sqrt(2), math.sqrt(2), math.log(0.5) / 4], dtype=torch.float64)
    assert torch.allclose(torch.cat([c_skip, c_out, c_in, c_noise]), want, rtol=1e-15, atol=0)
    assert float(edm.VEPreconditioning().coefficients(torch.tensor([2.0]))[3]) == 0.0  # c_noise = ln(sigma/2)
    vp = edm.VPPreconditioning()
    # EDM's VPPrecond: sigma_max = sigma(1) = 152.167 (it reports 152.16698 in float32); sigma(1e-5) =
    # sqrt(expm1(1.000995e-6)) = 1.0004976e-3 (EDM's float32 exp(.) - 1 rounds its sigma_min to 9.766e-4)
    assert float(vp.sigma(torch.tensor(1.0, dtype=torch.float64))) == pytest.approx(152.16698, rel=1e-6)
    assert float(vp.sigma(torch.tensor(1e-5, dtype=torch.float64))) == pytest.approx(1.0004976e-3, rel=1e-6)
    assert float(vp.coefficients(vp.sigma(torch.tensor([1.0], dtype=torch.float64)))[3]) == pytest.approx(
        999.0, rel=1e-12
    )


def test_wrap_preconditioned_module():
    x, sigma = inputs([0.01, 1.0, 20.0])
    net = EDMPrecond().double()
    probe = edm.wrap(net, sample_shape=SHAPE, dtype=torch.float64)
    # float64; cancellation in D - x at sigma = 0.01 costs a factor 6.4e3 on rounding
    assert torch.allclose(probe.score(x, sigma), exact_score(x, sigma), rtol=1e-10, atol=0)
    assert net.calls_fp32 == [True]  # EDM preconditioners are asked to stay in float32


def _write_pickle(folder: pathlib.Path, payload: dict) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "network-snapshot-000200.pkl"
    with open(path, "wb") as f:
        pickle.dump(payload, f)
    return path


def test_pickle_needs_trust(tmp_path):
    marker = tmp_path / "code-ran"
    path = _write_pickle(tmp_path / "net", {"ema": EDMPrecond(), "loss_fn": Touch(marker)})
    assert edm.detect(path) and edm.detect(path.parent)
    with pytest.raises(ModelLoadError, match="trust_remote_code=True") as err:
        edm.load(path)
    assert "\n" not in str(err.value) and not marker.exists()
    with pytest.raises(ModelLoadError, match="trust_remote_code=True"):
        load_reference(str(path))
    assert not marker.exists()
    probe = load_reference(str(path), trust_remote_code=True, dtype=torch.float64)
    assert marker.exists() and probe.info.adapter == "edm"
    assert probe.info.trust_remote_code and probe.info.extra["preconditioning"] == "EDMPrecond"
    assert probe.sample_shape == SHAPE and probe.precision == "fp32" and probe.info.extra["sigma_data"] == 0.5
    x, sigma = inputs([0.1, 2.0])
    # the oracle module computes in the input's float64 (its float32 weight is exactly 1)
    assert torch.allclose(probe.score(x, sigma), exact_score(x, sigma), rtol=1e-10, atol=0)


def test_pickle_errors(tmp_path, ncsnpp_folder):
    path = _write_pickle(tmp_path / "cond", {"ema": EDMPrecond(label_dim=10)})
    with pytest.raises(ModelLoadError, match="class-conditional"):
        edm.load(path, trust_remote_code=True)
    with pytest.raises(ModelLoadError, match="no entry 'net'"):
        edm.load(path, trust_remote_code=True, key="net")
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    assert not edm.detect(plain) and not edm.detect(ncsnpp_folder)


class LegacyIdentity(torch.autograd.Function):
    """An old-style autograd.Function (no setup_context, no jvp), like EDM's AttentionOp."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * 1.0


def test_legacy_autograd_function_falls_back_from_forward_mode():
    base = OracleF("edm")

    def raw(x_in, c_noise):
        return LegacyIdentity.apply(base(x_in, c_noise))

    probe = edm.wrap(raw, precond="edm", sample_shape=SHAPE, dtype=torch.float64)
    x, sigma = inputs([0.3, 1.5])
    choice = jacobian.select_strategy(probe.score, x, sigma)
    # torch.func refuses the Function; its backward is made of differentiable ops, so reverse over
    # reverse works and is chosen; central differences stay available
    assert "setup_context" in choice.rejected["jvp"]
    assert choice.name == "double_vjp" and "fd" in choice.deviations


def test_pickle_audit_end_to_end_records_the_trust_flag(tmp_path, audit_end_to_end):
    path = _write_pickle(tmp_path / "net", {"ema": EDMPrecond()})
    data = audit_end_to_end(path, "--trust-remote-code", "--sigmas", "0.5,2")
    assert data["model"]["adapter"] == "edm" and data["model"]["trust_remote_code"] is True
    assert data["options"]["trust_remote_code"] is True
    # The oracle denoiser is the exact score of N(0, σ_data² I): conservative, so every check passes.
    assert data["verdict"]["status"] == "pass", data["verdict"]
