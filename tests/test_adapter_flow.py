"""Flow-matching velocity models: the exact Gaussian oracle, and diffusers' FlowMatch scheduler math.

Oracle: data N(0, σ_d² I), σ_d = 0.6, on the path x_t = (1 − t) x0 + t ε. Then x_t ~ N(0, V_t I) with
V_t = (1 − t)² σ_d² + t², the exact score is −x/V_t and the ideal velocity is
v*(x, t) = E[ε − x0 | x_t] = (t − (1 − t) σ_d²)/V_t · x.
"""

from __future__ import annotations

import json

import pytest
import torch

from conservcheck.adapters import diffusers_unet, flow
from conservcheck.adapters.resolve import load_reference
from conservcheck.errors import ModelLoadError, UsageError

pytestmark = pytest.mark.usefixtures("single_thread")

SIGMA_D = 0.6
SHAPE = (3, 4, 4)


def variance(t: torch.Tensor) -> torch.Tensor:
    return ((1 - t) ** 2 * SIGMA_D**2 + t**2).reshape(-1, 1, 1, 1)


def ideal_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (t - (1 - t) * SIGMA_D**2).reshape(-1, 1, 1, 1) / variance(t) * x


def samples(t: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(t.shape[0], *SHAPE, generator=g, dtype=torch.float64) * variance(t).sqrt()


T = torch.tensor([0.01, 0.2, 0.5, 0.8, 0.99], dtype=torch.float64)


def test_oracle_velocity_gives_exact_score():
    probe = flow.wrap(ideal_velocity, sample_shape=SHAPE, dtype=torch.float64)
    x = samples(T)
    # float64 algebra: eps = x + (1 - t) v, s = -eps / t; ~1e-15 relative
    assert torch.allclose(probe.score(x, T), -x / variance(T), rtol=1e-12, atol=0)
    assert probe.process.name == "flow" and probe.parameterization == "velocity"


def test_time_scale_and_data_at_1_convention():
    x = samples(T)
    seen = []

    def scaled(x, k):  # fed k = 1000 t
        seen.append(k)
        return ideal_velocity(x, k / 1000)

    def data_at_1(x, tau):  # x_tau = tau x0 + (1 - tau) eps; predicts x0 - eps
        return -ideal_velocity(x, 1 - tau)

    p1 = flow.wrap(scaled, sample_shape=SHAPE, time_scale=1000, dtype=torch.float64)
    p2 = flow.wrap(data_at_1, sample_shape=SHAPE, convention="data_at_1", dtype=torch.float64)
    assert torch.allclose(p1.score(x, T), -x / variance(T), rtol=1e-12, atol=0)
    assert torch.allclose(seen[0], 1000 * T, rtol=1e-15)
    assert torch.allclose(p2.score(x, T), -x / variance(T), rtol=1e-12, atol=0)
    with pytest.raises(UsageError, match="convention"):
        flow.wrap(scaled, sample_shape=SHAPE, convention="reversed")


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        freq_shift=1,
        flip_sin_to_cos=False,
    )


@pytest.fixture(scope="module")
def flow_folder(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = tmp_path_factory.mktemp("flow")
    tiny_unet().save_pretrained(folder / "unet")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "DiffusionPipeline",
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_detect(flow_folder, ncsnpp_folder, tmp_path):
    assert flow.detect(flow_folder) and not diffusers_unet.detect(flow_folder)
    assert load_reference(str(flow_folder)).info.adapter == "flow"
    assert not flow.detect(ncsnpp_folder)
    bare = tmp_path / "bare"
    tiny_unet().save_pretrained(bare)
    (bare / "scheduler_config.json").write_text((flow_folder / "scheduler" / "scheduler_config.json").read_text())
    assert flow.detect(bare)
    probe = flow.load(bare)
    assert probe.info.extra["native_time"].startswith("timestep = sigma * 1000")


def test_euler_steps_match_scheduler(flow_folder):
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    probe = flow.load(flow_folder, dtype=torch.float64)
    unet = UNet2DModel.from_pretrained(flow_folder / "unet").double().eval()
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(flow_folder / "scheduler")
    sched.set_timesteps(sigmas=[0.9, 0.7, 0.5, 0.3, 0.1])  # shifted by 3: 0.964 … 0.25, then 0
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, 8, generator=g).double()  # float32 values: the scheduler rounds samples to float32
    worst = 0.0
    for i, ts in enumerate(sched.timesteps):
        sigma, sigma_next = sched.sigmas[i].double(), sched.sigmas[i + 1].double()
        with torch.no_grad():
            v = unet(x, ts.double().expand(2)).sample
            want = sched.step(v, ts, x).prev_sample
            t = (ts.double() / 1000).expand(2)  # the probe then feeds the scheduler's own timestep
            u = probe.process.pf_ode_velocity(x, probe.score(x, t), t)  # dx/dt from the score: must be v
        got = x + (sigma_next - sigma) * u
        worst = max(worst, float((got - want).norm() / want.norm()))
        x = want.float().double()
    # float64: v -> s -> dx/dt is exact algebra, rounded with a 1/(1 - sigma) <= 28 factor (measured 2.4e-16)
    assert worst < 1e-12


def test_denoised_matches_stochastic_scheduler(flow_folder):
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    probe = flow.load(flow_folder, dtype=torch.float64)
    unet = UNet2DModel.from_pretrained(flow_folder / "unet").double().eval()
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(flow_folder / "scheduler", stochastic_sampling=True)
    sched.set_timesteps(sigmas=[0.5])  # one step from sigma = 0.75 (shifted) to 0: prev = x0_hat exactly
    ts, sigma = sched.timesteps[0], sched.sigmas[0].double()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4)).double()
    with torch.no_grad():
        x0_sched = sched.step(unet(x, ts.double().expand(2)).sample, ts, x).prev_sample  # x - sigma v
        s = probe.score(x, sigma.expand(2))
    x0_probe = (x + sigma**2 * s) / (1 - sigma)
    # the probe feeds 1000 * sigma in float64, the scheduler its float32 timestep: equal up to one float32
    # rounding of the product (at most ~6e-8 relative in time); measured 3.4e-16
    assert float((x0_probe - x0_sched).norm() / x0_sched.norm()) < 1e-7


def test_info_and_refusals(flow_folder, tmp_path):
    probe = flow.load(flow_folder)
    assert probe.info.extra["shift"] == 3.0 and probe.info.extra["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert probe.time_convention.to_dict() == {"name": "affine", "scale": 1000.0, "offset": 0.0}
    assert probe.data_range == (-1.0, 1.0) and probe.sample_shape == (3, 8, 8)
    with pytest.raises(ModelLoadError, match="invert_sigmas"):
        flow.scheduler_time_scale({"_class_name": "FlowMatchEulerDiscreteScheduler", "invert_sigmas": True})
    with pytest.raises(ModelLoadError, match="unsupported flow scheduler"):
        flow.scheduler_time_scale({"_class_name": "FlowMatchLCMScheduler"})


def test_flow_audit_end_to_end(flow_folder, audit_end_to_end):
    data = audit_end_to_end(flow_folder, "--times", "0.3,0.8")
    assert data["model"]["adapter"] == "flow" and data["process"]["name"] == "flow"
    assert [p["t"] for p in data["time_points"]] == [0.3, 0.8]
    assert data["verdict"]["status"] in ("pass", "violation")
