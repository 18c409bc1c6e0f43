"""The diffusers adapter checked against diffusers' own math, with tiny real models saved to tmp folders.

Tolerances: the schedulers hold ᾱ_k in float32 and take √ᾱ_k, √(1−ᾱ_k) in float32 (relative rounding
~6e-8) while the probe uses those ᾱ_k in float64, so in float64 models the two agree to ~1e-7 of the
largest value compared; we require 1e-6. Where diffusers' fused attention (SDPA) meets the probe's
classic attention in float32, outputs agree to float32 rounding (≤ 7e-7 relative); we require 1e-5.
"""

import collections
import hashlib
import json
import shutil

import pytest
import torch

from conservcheck import ModelLoadError, UsageError
from conservcheck.adapters import _diffusers, diffusers_unet

pytestmark = pytest.mark.usefixtures("single_thread")

SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]
PREDICTIONS = ["epsilon", "sample", "v_prediction"]
F64 = torch.float64


def _x(shape=(2, 3, 16, 16), seed=0, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _implied_x0(probe, x, t):
    """x̂0 = (x + σ² s)/α: Tweedie's denoiser implied by the probe's score at canonical time t."""
    s = probe.score(x, t)
    a, sig = probe.process.alpha(t), probe.process.sigma(t)
    return (x + sig**2 * s) / a


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------------------------------
# detect


def test_detect_pipeline_and_bare_unet_folders(ddpm_folder, tmp_path):
    pipe = ddpm_folder()
    assert diffusers_unet.detect(pipe)
    bare = tmp_path / "bare"
    shutil.copytree(pipe / "unet", bare)
    assert diffusers_unet.detect(bare)
    assert not diffusers_unet.detect(pipe / "scheduler")
    assert not diffusers_unet.detect(pipe / "model_index.json")
    (tmp_path / "vaepipe").mkdir()
    for sub in ("unet", "scheduler", "vae"):
        shutil.copytree(pipe / ("unet" if sub == "vae" else sub), tmp_path / "vaepipe" / sub)
    index = json.loads((pipe / "model_index.json").read_text())
    (tmp_path / "vaepipe" / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderKL"]}))
    assert not diffusers_unet.detect(tmp_path / "vaepipe")  # latent pipelines belong to the latent adapter
    # model_index.json decides the components, as for diffusers: a stray vae/ folder is not one
    shutil.copy(pipe / "model_index.json", tmp_path / "vaepipe")
    assert diffusers_unet.detect(tmp_path / "vaepipe")


def test_flow_matching_scheduler_is_left_to_the_flow_adapter(ddpm_folder, tmp_path):
    folder = tmp_path / "flow"
    shutil.copytree(ddpm_folder(), folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000})
    )
    assert not diffusers_unet.detect(folder)


# ---------------------------------------------------------------------------------------------------
# DDPM family: implied x̂0 equals the scheduler's pred_original_sample


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_implied_x0_equals_ddpm_scheduler_step(ddpm_folder, schedule, prediction):
    from diffusers import DDPMScheduler, UNet2DModel

    folder = ddpm_folder(schedule, prediction)
    probe = diffusers_unet.load(folder, dtype=F64)
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet", torch_dtype=F64).eval()
    x = _x()
    for k in (0, 10, 250, 500, 999):
        t = probe.time_convention.to_canonical(torch.tensor(float(k), dtype=F64))
        with torch.no_grad():
            ours = _implied_x0(probe, x, t)
            out = unet(x, k).sample  # the pipelines' call: integer timestep
        ref = sched.step(out, k, x, generator=torch.Generator().manual_seed(1)).pred_original_sample
        # measured: ≤ 5e-8 (epsilon, v), ≤ 3e-12 (sample); see the module docstring for the bound
        assert _rel(ours, ref) < 1e-6, (k, _rel(ours, ref))


def test_learned_variance_channels_are_dropped(ddpm_folder):
    from diffusers import DDPMScheduler, UNet2DModel

    folder = ddpm_folder("linear", "epsilon", variance_type="learned_range")
    probe = diffusers_unet.load(folder, dtype=F64)
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet", torch_dtype=F64).eval()
    x, k = _x(), 400
    t = probe.time_convention.to_canonical(torch.tensor(float(k), dtype=F64))
    with torch.no_grad():
        out = unet(x, k).sample
        assert out.shape[1] == 6
        ref = sched.step(out, k, x, generator=torch.Generator().manual_seed(1)).pred_original_sample
        assert _rel(_implied_x0(probe, x, t), ref) < 1e-6


# ---------------------------------------------------------------------------------------------------
# DDPM family: the probe's probability-flow ODE (DDIM η = 0 in score terms) equals DDIMPipeline


def _ddim_in_score_terms(probe, x, ks):
    """DDIM η=0 written with the probe's score: x̂0 = (x + σ²s)/α, ε̂ = −σ s, x ← α' x̂0 + σ' ε̂.

    Steps through the canonical times of indices ``ks`` and ends at t = 0 (α = 1, σ = 0), as
    DDIMScheduler does with set_alpha_to_one. Returns every state.
    """
    tc, pr = probe.time_convention, probe.process
    ts = [tc.to_canonical(torch.tensor(float(k), dtype=F64)) for k in ks] + [torch.tensor(0.0, dtype=F64)]
    states = [x]
    with torch.no_grad():
        for t, t_next in zip(ts[:-1], ts[1:]):
            s = probe.score(x, t)
            a, sig = pr.alpha(t), pr.sigma(t)
            x0, eps = (x + sig**2 * s) / a, -sig * s
            x = pr.alpha(t_next) * x0 + pr.sigma(t_next) * eps
            states.append(x)
    return states


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])  # DDIMScheduler has no sigmoid
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_probability_flow_matches_ddim_pipeline(ddpm_folder, schedule, prediction):
    from diffusers import DDIMPipeline

    folder = ddpm_folder(schedule, prediction)
    probe = diffusers_unet.load(folder, dtype=F64)
    pipe = DDIMPipeline.from_pretrained(folder)
    pipe.unet.to(F64)
    pipe.set_progress_bar_config(disable=True)
    seen = []  # the pipeline's own states: the input of each UNet call
    hook = pipe.unet.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    images = pipe(
        batch_size=2, generator=torch.Generator().manual_seed(0), eta=0.0, num_inference_steps=10, output_type="pt"
    ).images
    hook.remove()
    ks = [int(k) for k in pipe.scheduler.timesteps]
    ours = _ddim_in_score_terms(probe, seen[0], ks)
    # every intermediate state, relative to its largest entry (measured ≤ 1.9e-7 over 10 steps)
    for step, (a, b) in enumerate(zip(ours[1:-1], seen[1:]), start=1):
        assert _rel(a, b) < 1e-6, (step, _rel(a, b))
    # end samples as the pipeline returns them, (x/2 + 1/2) clamped to [0, 1] (measured ≤ 6e-7)
    end = (ours[-1] / 2 + 0.5).clamp(0, 1)
    assert float((end - images).abs().max()) < 1e-5


# ---------------------------------------------------------------------------------------------------
# NCSN++ VE family


def test_ve_probe_is_the_output_score_sde_pipeline_feeds_its_scheduler(ncsnpp_folder):
    from diffusers import ScoreSdeVePipeline

    probe = diffusers_unet.load(ncsnpp_folder)
    assert probe.process.name == "ve" and probe.parameterization == "score" and probe.data_range == (0.0, 1.0)
    pipe = ScoreSdeVePipeline.from_pretrained(ncsnpp_folder)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    hook = pipe.unet.register_forward_hook(
        lambda mod, args, out: calls.append((args[0].clone(), args[1].clone(), out.sample.clone()))
    )
    pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    hook.remove()
    assert len(calls) == 8  # one corrector and one predictor call per step
    for sample, sigma, out in calls:
        assert sigma.dtype.is_floating_point and sigma.shape == (2,)
        with torch.no_grad():
            ours = probe.score(sample, sigma)
        assert _rel(ours, out) < 1e-5  # float32; SDPA vs classic attention (measured 3e-7)
    assert any(float(s[0]) != round(float(s[0])) for _, s, _ in calls)  # σ is fed unrounded


def test_ve_step_pred_reads_the_output_as_the_score(ncsnpp_folder):
    """ScoreSdeVeScheduler.step_pred moves the mean by (σ_i² − σ_{i−1}²)·out: the Euler step of the reverse
    VE SDE dx = −d[σ²] ∇log p_σ(x). Run with the exact score of N(μ, σ_d² I) data and with the probe."""
    from diffusers import ScoreSdeVeScheduler, UNet2DModel

    sched = ScoreSdeVeScheduler.from_pretrained(ncsnpp_folder, subfolder="scheduler")
    sched.set_timesteps(10)
    sched.set_sigmas(10)
    x, mu, sd = _x((2, 3, 8, 8), seed=3) * 5, 0.3, 0.4
    probe = diffusers_unet.load(ncsnpp_folder, dtype=F64)
    unet = UNet2DModel.from_pretrained(ncsnpp_folder, subfolder="unet", torch_dtype=F64).eval()
    for i in (1, 4, 8):
        t = sched.timesteps[i]
        idx = int(t * (len(sched.timesteps) - 1))
        sig, sig_prev = sched.discrete_sigmas[idx].double(), sched.discrete_sigmas[idx - 1].double()
        exact = -(x - mu) / (sd**2 + sig**2)
        step = sched.step_pred(exact, t, x, generator=torch.Generator().manual_seed(0)).prev_sample_mean
        assert torch.allclose(step - x, (sig**2 - sig_prev**2) * exact, rtol=1e-6, atol=0)  # float32 σ table
        sigma_fed = sched.sigmas[i].double() * torch.ones(2, dtype=F64)
        with torch.no_grad():
            ours = probe.score(x, sigma_fed)
            theirs = unet(x, sigma_fed).sample
        assert _rel(ours, theirs) < 1e-12  # float64 on both sides
        a = sched.step_pred(ours, t, x, generator=torch.Generator().manual_seed(0)).prev_sample_mean
        b = sched.step_pred(theirs, t, x, generator=torch.Generator().manual_seed(0)).prev_sample_mean
        assert _rel(a - x, b - x) < 1e-12


# ---------------------------------------------------------------------------------------------------
# Hygiene: differentiable, unchanged outputs


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (F64, 1e-12)])
def test_attention_swap_keeps_outputs(ddpm_folder, dtype, tol):
    from diffusers import UNet2DModel
    from diffusers.models.attention_processor import Attention, AttnProcessor

    folder = ddpm_folder()
    probe = diffusers_unet.load(folder, dtype=dtype)
    raw = UNet2DModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype).eval()
    attn = [m for m in probe.fn.modules() if isinstance(m, Attention)]
    assert attn and all(isinstance(m.processor, AttnProcessor) for m in attn)
    assert not probe.fn.training and not any(p.requires_grad for p in probe.fn.parameters())
    x, k = _x(dtype=dtype), torch.tensor([3.0, 700.0], dtype=dtype)
    with torch.no_grad():
        assert _rel(probe.fn(x, k), raw(x, k).sample) < tol  # measured 7e-7 (float32), 1e-15 (float64)


@pytest.mark.parametrize("which", ["ddpm", "ncsnpp"])
def test_forward_and_reverse_mode_agree(ddpm_folder, ncsnpp_folder, which):
    folder = ddpm_folder() if which == "ddpm" else ncsnpp_folder
    probe = diffusers_unet.load(folder, dtype=F64)
    shape = (2, *probe.sample_shape)
    x, u, v = _x(shape, 0), _x(shape, 1), _x(shape, 2)
    t = torch.tensor(0.4 if which == "ddpm" else 2.0, dtype=F64)
    f = lambda y: probe.score(y, t)  # noqa: E731
    _, jv = torch.func.jvp(f, (x,), (v,))  # forward mode: needs classic attention and contiguous GroupNorm
    _, vjp = torch.func.vjp(f, x)
    (jtu,) = vjp(u)
    assert abs(float((u * jv).sum() - (jtu * v).sum())) < 1e-10 * float((u * jv).abs().sum())
    # second order: d/dx uᵀJv by double backward equals forward-over-reverse
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((f(xr) * u).sum(), xr, create_graph=True)
    (h_rev,) = torch.autograd.grad((g * v).sum(), xr)
    _, h_fwd = torch.func.jvp(lambda y: torch.func.vjp(f, y)[1](u)[0], (x,), (v,))
    assert _rel(h_rev, h_fwd) < 1e-9


# ---------------------------------------------------------------------------------------------------
# Provenance and weights


def test_info_records_units_and_weights_hash(ddpm_folder):
    folder = ddpm_folder("squaredcos_cap_v2", "v_prediction")
    probe = diffusers_unet.load(folder)
    d = probe.describe()
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert d["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert d["weights_files"] == {"unet/diffusion_pytorch_model.safetensors": d["weights_sha256"]}
    assert d["weights_format"] == "safetensors" and d["trust_remote_code"] is False
    assert d["parameterization"] == "v" and d["process"]["name"] == "ou"
    assert d["time_convention"] == {"name": "squaredcos_cap_v2", "num_steps": 1000}
    assert d["data_range"] == [-1.0, 1.0] and d["native_range"] == [0, 999]
    assert d["adapter"] == "diffusers" and d["family"] == "ddpm"


def test_pickled_bin_weights_load_with_weights_only(ddpm_folder, tmp_path):
    from diffusers import DDPMPipeline

    folder = tmp_path / "bin"
    DDPMPipeline.from_pretrained(ddpm_folder()).save_pretrained(folder, safe_serialization=False)
    weights = folder / "unet" / "diffusion_pytorch_model.bin"
    assert weights.is_file() and not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    probe = diffusers_unet.load(folder, dtype=F64)
    ref = diffusers_unet.load(ddpm_folder(), dtype=F64)
    assert probe.info.extra["weights_loader"] == "torch.load(weights_only=True)"
    assert probe.info.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    x = _x()
    with torch.no_grad():
        assert torch.equal(probe.score(x, 0.3), ref.score(x, 0.3))  # same weights, same batch: same bits


def test_pickle_needing_arbitrary_code_requires_trust(ddpm_folder, tmp_path):
    from diffusers import DDPMPipeline

    folder = tmp_path / "pickle"
    DDPMPipeline.from_pretrained(ddpm_folder()).save_pretrained(folder, safe_serialization=False)
    weights = folder / "unet" / "diffusion_pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    torch.save(collections.defaultdict(list, state), weights)  # defaultdict is outside weights_only's allow-list
    with pytest.raises(ModelLoadError, match="needs arbitrary unpickling") as err:
        diffusers_unet.load(folder)
    assert "trust_remote_code=True" in err.value.hint
    probe = diffusers_unet.load(folder, dtype=F64, trust_remote_code=True)
    assert probe.info.trust_remote_code is True
    assert probe.info.extra["weights_loader"] == "torch.load(weights_only=False)"
    ref = diffusers_unet.load(ddpm_folder(), dtype=F64)
    x = _x()
    with torch.no_grad():
        assert torch.equal(probe.score(x, 0.3), ref.score(x, 0.3))  # same weights, same batch: same bits


# ---------------------------------------------------------------------------------------------------
# Failures


def test_unknown_scheduler_names_the_supported_ones(ddpm_folder, tmp_path):
    folder = tmp_path / "unipc"
    shutil.copytree(ddpm_folder(), folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "UniPCMultistepScheduler"}))
    with pytest.raises(ModelLoadError, match="unsupported scheduler class 'UniPCMultistepScheduler'") as err:
        diffusers_unet.load(folder)
    assert all(name in err.value.hint for name in _diffusers.SUPPORTED_SCHEDULERS)


def test_bare_unet_without_scheduler_config(ddpm_folder, tmp_path):
    shutil.copytree(ddpm_folder() / "unet", tmp_path / "bare")
    with pytest.raises(ModelLoadError, match="no scheduler config"):
        diffusers_unet.load(tmp_path / "bare")
    shutil.copy(ddpm_folder() / "scheduler" / "scheduler_config.json", tmp_path / "bare")
    assert diffusers_unet.load(tmp_path / "bare").parameterization == "epsilon"


@pytest.mark.parametrize(
    "change,message",
    [
        ({"_class_name": "UNet2DConditionModel"}, "not an unconditional UNet2DModel"),
        ({"num_class_embeds": 10}, "class-conditional UNet2DModel"),
    ],
)
def test_conditional_unet_is_refused(ddpm_folder, tmp_path, change, message):
    folder = tmp_path / "cond"
    shutil.copytree(ddpm_folder(), folder)
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ModelLoadError, match=message):
        diffusers_unet.load(folder)


def test_unknown_option_is_a_usage_error(ddpm_folder):
    with pytest.raises(UsageError, match="unknown adapter option"):
        diffusers_unet.load(ddpm_folder(), sigma_max=3)


def test_ncsnpp_audit_end_to_end(ncsnpp_folder, audit_end_to_end):
    data = audit_end_to_end(ncsnpp_folder)
    assert data["model"]["adapter"] == "diffusers" and data["process"]["name"] == "ve"
    # VE default time points: σ = (0.01 … 50) × the data range's width (1 for [0, 1] data), as canonical t.
    assert [round(p["sigma"], 6) for p in data["time_points"]] == [0.01, 0.05, 0.2, 1.0, 5.0, 50.0]
    assert data["verdict"]["status"] in ("pass", "violation")
