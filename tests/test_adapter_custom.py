"""``module:factory`` references: every parameterization through a declaration, against the exact score.

Oracle: data N(0, σ_d² I), σ_d = 0.7, noised as x = α x0 + σ ε, so x ~ N(0, V I) with V = α² σ_d² + σ²
and the exact score is −x/V. The ideal predictors are linear in x: ε̂ = σ/V x, x̂0 = α σ_d²/V x,
v̂ = α ε̂ − σ x̂0 = α σ (1 − σ_d²)/V x, velocity α' x̂0 + σ' ε̂. The oracle networks compute α and σ from
the *native* time they are fed with the schedules written out here (DDPM's linear β, score_sde's VP,
rectified flow), so a wrong time convention or conversion shows.

The factories below are referenced as ``test_adapter_custom:<name>`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import functools
import math
import sys

import pytest
import torch

from conservcheck import OUProcess, VectorFieldProbe
from conservcheck.adapters import custom
from conservcheck.adapters.resolve import load_reference
from conservcheck.errors import ModelLoadError, UsageError
from conservcheck.process import DiscreteSchedule

SIGMA_D = 0.7
SHAPE = (2, 3)


def linear_alpha_bar(k: torch.Tensor) -> torch.Tensor:
    """DDPM's linear schedule, β_i = 1e-4 + i (0.02 − 1e-4)/999: ᾱ_k = Π_{i ≤ k} (1 − β_i)."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)[k.round().long()]


def coefficients(kind: str, native: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(α, σ, dα/dt, dσ/dt) at a native time; derivatives in canonical time."""
    if kind == "linear":  # OU observed at index k; canonical t = −½ ln ᾱ_k
        ab = linear_alpha_bar(native)
        return ab.sqrt(), (1 - ab).sqrt(), None, None
    if kind == "vpsde":  # score_sde VP time s: ∫β = 0.1 s + ½ (20 − 0.1) s²
        ab = torch.exp(-(0.1 * native + 0.5 * 19.9 * native**2))
        return ab.sqrt(), (1 - ab).sqrt(), None, None
    if kind == "ve":
        return torch.ones_like(native), native, None, None
    if kind == "ou":  # canonical OU time
        a = torch.exp(-native)
        s = torch.sqrt(1 - a**2)
        return a, s, -a, a**2 / s
    return 1 - native, native, -torch.ones_like(native), torch.ones_like(native)  # flow


class Oracle(torch.nn.Module):
    """The ideal predictor of ``parameterization`` for the Gaussian, fed native time of ``kind``."""

    def __init__(self, parameterization: str, kind: str) -> None:
        super().__init__()
        self.parameterization, self.kind = parameterization, kind
        self.scale = torch.nn.Parameter(torch.ones(()))  # a parameter, so dtype/device moves show

    def forward(self, x: torch.Tensor, native: torch.Tensor) -> torch.Tensor:
        a, s, da, ds = (c if c is None else c.reshape(-1, 1, 1) for c in coefficients(self.kind, native))
        v = a**2 * SIGMA_D**2 + s**2
        eps, x0 = s / v * x, a * SIGMA_D**2 / v * x
        out = {
            "score": lambda: -x / v,
            "epsilon": lambda: eps,
            "x0": lambda: x0,
            "v": lambda: a * eps - s * x0,
            "velocity": lambda: da * x0 + ds * eps,
        }[self.parameterization]()
        return out * self.scale


def _declared(parameterization: str, process: str, time_convention: str, device="cpu", dtype=torch.float32):
    kind = {"ve": "ve", "flow": "flow"}.get(process, time_convention if time_convention != "canonical" else "ou")
    return Oracle(parameterization, kind), dict(
        parameterization=parameterization, process=process, time_convention=time_convention, sample_shape=SHAPE
    )


make_score_ve = functools.partial(_declared, "score", "ve", "canonical")
make_epsilon_linear = functools.partial(_declared, "epsilon", "ou", "linear")
make_x0_vpsde = functools.partial(_declared, "x0", "vp", "vpsde")
make_v_ou = functools.partial(_declared, "v", "ou", "canonical")
make_velocity_flow = functools.partial(_declared, "velocity", "flow", "canonical")
make_velocity_ou = functools.partial(_declared, "velocity", "ou", "canonical")


def make_probe(device="cpu", dtype=torch.float32):
    """The documented recipe: a ready probe."""
    net = Oracle("epsilon", "linear").to(device=device, dtype=dtype)
    return VectorFieldProbe(
        lambda x, k: net(x, k),
        process=OUProcess(),
        time_convention=DiscreteSchedule.linear(),
        parameterization="epsilon",
        sample_shape=SHAPE,
        device=device,
        dtype=dtype,
    )


def make_without_arguments():
    return Oracle("score", "ve"), {"parameterization": "score", "process": "ve", "sample_shape": SHAPE, "name": "plain"}


def make_broken():
    raise ValueError("weights file missing")


def make_number():
    return 42


def make_unknown_key():
    return Oracle("score", "ve"), {
        "parameterization": "score",
        "process": "ve",
        "sample_shape": SHAPE,
        "schedule": "linear",
    }


def make_no_shape():
    return Oracle("score", "ve"), {"parameterization": "score", "process": "ve"}


def make_bad_time():
    return Oracle("score", "ve"), {
        "parameterization": "score",
        "process": "ve",
        "sample_shape": SHAPE,
        "time_convention": "quadratic",
    }


not_callable = 3


def canonical_times(name: str) -> torch.Tensor:
    if name == "make_epsilon_linear":  # on the schedule's grid, where the index map is exact
        return -0.5 * torch.log(linear_alpha_bar(torch.tensor([0.0, 10.0, 250.0, 700.0, 999.0])))
    if name == "make_x0_vpsde":
        s = torch.tensor([1e-3, 0.1, 0.5, 0.9], dtype=torch.float64)
        return 0.5 * (0.1 * s + 0.5 * 19.9 * s**2)
    if name == "make_score_ve":
        return torch.tensor([0.01, 0.5, 3.0, 40.0], dtype=torch.float64)
    if name.endswith("flow"):
        return torch.tensor([0.02, 0.3, 0.7, 0.97], dtype=torch.float64)
    return torch.tensor([0.01, 0.3, 1.0, 4.0], dtype=torch.float64)


def exact_score(x: torch.Tensor, t: torch.Tensor, process: str) -> torch.Tensor:
    a, s, _, _ = coefficients({"ve": "ve", "flow": "flow"}.get(process, "ou"), t)
    return -x / (a**2 * SIGMA_D**2 + s**2).reshape(-1, 1, 1)


@pytest.mark.parametrize(
    ("name", "process"),
    [
        ("make_score_ve", "ve"),
        ("make_epsilon_linear", "ou"),
        ("make_x0_vpsde", "ou"),
        ("make_v_ou", "ou"),
        ("make_velocity_flow", "flow"),
        ("make_velocity_ou", "ou"),
    ],
)
def test_declared_parameterizations_give_exact_score(name, process):
    probe = custom.load_factory(f"test_adapter_custom:{name}", dtype=torch.float64)
    t = canonical_times(name)
    x = torch.randn(t.shape[0], *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # float64 throughout; the native-time maps (index grid, VP quadratic, identity) are exact to ~1e-15
    assert torch.allclose(probe.score(x, t), exact_score(x, t, process), rtol=1e-10, atol=0)
    assert probe.info.extra["factory"] == f"test_adapter_custom:{name}"
    assert probe.fn.scale.dtype == torch.float64 and not probe.fn.scale.requires_grad and not probe.fn.training


def test_ready_probe_and_reference_resolution():
    probe = load_reference("test_adapter_custom:make_probe", dtype=torch.float64)
    assert probe.dtype == torch.float64 and probe.info.extra["factory"] == "test_adapter_custom:make_probe"
    t = canonical_times("make_epsilon_linear")
    x = torch.randn(t.shape[0], *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(probe.score(x, t), exact_score(x, t, "ou"), rtol=1e-10, atol=0)
    plain = custom.load_factory("test_adapter_custom:make_without_arguments")
    assert plain.info.name == "plain" and plain.dtype == torch.float32


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("no_colon_here", UsageError, "not a module:factory reference"),
        ("conservcheck_no_such_module:make", ModelLoadError, "cannot import 'conservcheck_no_such_module'"),
        ("test_adapter_custom:missing", ModelLoadError, "has no attribute 'missing'"),
        ("test_adapter_custom:not_callable", ModelLoadError, "not a callable factory"),
        ("test_adapter_custom:make_broken", ModelLoadError, "raised ValueError: weights file missing"),
        ("test_adapter_custom:make_number", ModelLoadError, "returned a int"),
        ("test_adapter_custom:make_unknown_key", UsageError, "unknown key.s. schedule"),
        ("test_adapter_custom:make_no_shape", UsageError, "missing key.s. sample_shape"),
        ("test_adapter_custom:make_bad_time", UsageError, "unknown time_convention 'quadratic'"),
    ],
)
def test_errors_are_one_line(spec, error, message):
    with pytest.raises(error, match=message) as err:
        custom.load_factory(spec)
    assert "\n" not in str(err.value) and err.value.hint


def test_module_in_current_folder(tmp_path, monkeypatch):
    (tmp_path / "cc_local_models.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return (lambda x, t: -x), dict(parameterization='score', process='ve', sample_shape=(3,))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "cc_local_models", raising=False)
    probe = custom.load_factory("cc_local_models:make")
    x = torch.ones(2, 3)
    assert torch.equal(probe.score(x, 1.0), -x) and math.isclose(probe.data_range[1], 1.0)
