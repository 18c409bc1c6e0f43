"""The embedded models load offline by name and answer in the right units, checked against known answers.

Known answers:
* digits, k = 999 (ᾱ = 4.04e−5): p_t is N(0, I) up to O(√ᾱ), so the exact score is −x to within
  α‖E[x0|x]‖/(σ²‖x‖) + (1/σ² − 1) ≤ 0.0064·16/16 + 4e−5 ≈ 0.7 % (|x0| ≤ 1 per pixel, D = 256).
* digits, k = 100: Tweedie's denoiser x̂0 = (x + σ² s)/α built from the probe's score must remove most of
  the noise from noised training digits. A units mistake (dividing ε̂ by 1 − ᾱ instead of √(1 − ᾱ), the
  pitfall in docs/units.md) leaves an error of order (1 − σ)²E‖ε̂‖²/α² ≈ 0.5 per pixel, 60× the measured one.
* funnel: the model's score against the exact score of Neal's funnel (conservcheck.analytic.funnel.Funnel).
"""

from __future__ import annotations

import hashlib
import math
import time

import pytest
import torch

from conservcheck import ModelLoadError, UsageError
from conservcheck.adapters import embedded
from conservcheck.analytic.funnel import Funnel

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


@pytest.fixture(scope="module")
def digits64():
    return embedded.load("digits", dtype=F64)


@pytest.fixture(scope="module")
def funnel64():
    return embedded.load("funnel", dtype=F64)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_names_and_detect():
    assert embedded.available() == ["digits", "funnel"]
    for name in embedded.available():
        folder = embedded.asset_folder(name)
        assert folder.is_dir()
        assert not embedded.detect(folder)  # reached by name only


def test_unknown_name_and_option_raise():
    with pytest.raises(ModelLoadError, match="no embedded model named 'mnist'"):
        embedded.load("mnist")
    with pytest.raises(UsageError, match="unknown adapter option"):
        embedded.load("funnel", revision="main")


def test_digits_probe_units_and_provenance(digits64):
    p = digits64
    assert p.sample_shape == (1, 16, 16) and p.parameterization == "epsilon" and p.process.name == "ou"
    assert p.time_convention.num_steps == 1000 and p.data_range == (-1.0, 1.0)
    info = p.info
    assert (info.name, info.adapter, info.reference) == ("digits", "embedded", "embedded:digits")
    weights = embedded.asset_folder("digits") / "unet" / "diffusion_pytorch_model.safetensors"
    assert info.weights_sha256 == _sha256(weights)
    assert not info.trust_remote_code
    # the 8×8 level holds a real attention layer, which Jacobian tools must differentiate through
    assert any(type(m).__name__ == "Attention" for m in p.fn.modules())


def test_digits_score_shape_finite_and_gaussian_at_the_last_index(digits64):
    p = digits64
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = p.time_convention.to_canonical(torch.tensor(999.0))
    with torch.no_grad():
        s = p.score(x, t)
    assert s.shape == x.shape and s.dtype == F64 and bool(torch.isfinite(s).all())
    rel = float((s + x).norm() / x.norm())
    # exact: ≤ 0.007 (module docstring); the trained model measures 0.027
    assert rel < 0.05


def test_digits_tweedie_denoiser_removes_the_noise(digits64):
    load_digits = pytest.importorskip("sklearn.datasets").load_digits
    import torch.nn.functional as F

    images = torch.as_tensor(load_digits().images[:64], dtype=F64)[:, None] / 16.0
    x0 = 2 * F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False) - 1
    p = digits64
    t = p.time_convention.to_canonical(torch.tensor(100.0))
    a, sig = float(p.process.alpha(t)), float(p.process.sigma(t))
    x = a * x0 + sig * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    with torch.no_grad():
        x0_hat = (x + sig**2 * p.score(x, t)) / a
    mse, noise = float((x0_hat - x0).square().mean()), float((x / a - x0).square().mean())
    # measured 0.0073 against 0.118 for the noisy input (ratio 0.06); a units mistake gives ≈ 0.5
    assert mse < 0.25 * noise
    assert mse < 0.02


def test_funnel_probe_units_and_provenance(funnel64):
    p = funnel64
    assert p.sample_shape == (10,) and p.parameterization == "epsilon" and p.process.name == "ou"
    assert p.time_convention.to_dict() == {"name": "canonical"}
    info = p.info
    assert (info.name, info.adapter, info.reference) == ("funnel", "embedded", "embedded:funnel")
    assert info.weights_sha256 == _sha256(embedded.asset_folder("funnel") / "model.safetensors")
    assert info.extra["exact_reference"] == {"kind": "neal_funnel", "n": 9, "scale": 3.0}
    ref = embedded.reference_field("funnel")
    assert isinstance(ref, Funnel) and (ref.n, ref.scale, ref.process.name) == (9, 3.0, "ou")
    assert embedded.reference_field("digits") is None


# Per-sample relative error ‖s_θ − s‖/‖s‖ measured by examples/train_funnel.py on 4096 samples of p_t
# (docs/embedded.md): median 0.041 / 0.033 / 0.030 and 90th percentile 0.154 / 0.121 / 0.099 at
# t = 0.2 / 0.5 / 1. Bounds are 1.5× those: this test draws 1024 other samples, and the quantiles of a
# heavy-tailed error spread by several % between draws (this draw: medians 0.042 / 0.034 / 0.029). An
# untrained network gives medians 0.9–1.1; dividing ε̂ by σ² instead of σ multiplies the score by 1/σ,
# an error of 0.74 / 0.26 / 0.08 at these times — each above its bound.
MEDIAN_BOUND = {0.2: 0.062, 0.5: 0.050, 1.0: 0.045}
Q90_BOUND = {0.2: 0.23, 0.5: 0.18, 1.0: 0.15}


@pytest.mark.parametrize("t", [0.2, 0.5, 1.0])
def test_funnel_score_matches_the_exact_funnel_score(funnel64, t):
    funnel = Funnel(n=9, scale=3.0)
    gen = torch.Generator().manual_seed(7)
    n = 1024
    x0 = funnel.sample(n, gen)
    sigma = math.sqrt(-math.expm1(-2 * t))
    y = math.exp(-t) * x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=F64)
    with torch.no_grad():
        s_model = funnel64.score(y, t)
    s_exact = funnel.score(y, torch.full((n,), t, dtype=F64))
    rel = ((s_model - s_exact).norm(dim=1) / s_exact.norm(dim=1)).sort().values
    median, q90 = float(rel[n // 2]), float(rel[int(0.9 * n)])
    assert median < MEDIAN_BOUND[t]
    assert q90 < Q90_BOUND[t]


def test_funnel_float32_matches_float64(funnel64):
    p32 = embedded.load("funnel")
    y = 3 * torch.randn(16, 10, generator=torch.Generator().manual_seed(3), dtype=F64)
    with torch.no_grad():
        s64 = funnel64.score(y, 0.5)
        s32 = p32.score(y.float(), 0.5)
    # float32 rounding through a 4-layer MLP: ~1e-6 relative; 1e-4 leaves room for accumulation order
    assert float((s32.double() - s64).abs().max() / s64.abs().max()) < 1e-4


def test_reference_strings_and_load_time():
    from conservcheck.adapters.resolve import load_reference

    embedded.load("digits")  # imports diffusers once; the timing below is the loading itself
    for name in embedded.available():
        start = time.perf_counter()
        probe = load_reference(f"embedded:{name}")
        elapsed = time.perf_counter() - start
        assert probe.info.reference == f"embedded:{name}" and probe.info.adapter == "embedded"
        # a 2.6 MB and a 1 MB safetensors file: measured ≤ 0.1 s on a shared 2-core CPU
        assert elapsed < 3.0
