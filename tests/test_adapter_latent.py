"""The latent adapter: latent-space probe, latent scaling and encode/decode, checked against diffusers.

Tolerances: LDMPipeline draws float32 latents, so the pipeline comparison runs in float32 with diffusers'
fused attention against the probe's classic attention (float32 rounding, up to 7e-7 relative per call,
compounded over 10 steps); we require 1e-5 relative. Scheduler comparisons run in float64 (bound 1e-6,
see test_adapter_diffusers.py).
"""

import json

import pytest
import torch

from conservcheck import ModelLoadError
from conservcheck.adapters import diffusers_unet, latent

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


def _rand(shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_detect_latent_pipelines(latent_folder, ddpm_folder):
    for kind in ("vq", "kl"):
        assert latent.detect(latent_folder(kind))
        assert not diffusers_unet.detect(latent_folder(kind))
    assert not latent.detect(ddpm_folder())


@pytest.mark.parametrize("kind,channels,autoencoder", [("vq", 3, "VQModel"), ("kl", 4, "AutoencoderKL")])
def test_probe_lives_in_latent_space(latent_folder, kind, channels, autoencoder):
    probe = latent.load(latent_folder(kind))
    assert probe.sample_shape == (channels, 8, 8)
    d = probe.describe()
    assert d["autoencoder"] == autoencoder and d["scaling_factor"] == 0.5 and d["latent"] is True
    assert set(d["weights_files"]) == {
        "unet/diffusion_pytorch_model.safetensors",
        f"{'vqvae' if kind == 'vq' else 'vae'}/diffusion_pytorch_model.safetensors",
    }


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_encode_applies_the_scaling_and_decode_inverts_it(latent_folder, kind):
    from diffusers import AutoencoderKL, VQModel

    folder = latent_folder(kind)
    probe = latent.load(folder, dtype=F64)
    cls, sub = (VQModel, "vqvae") if kind == "vq" else (AutoencoderKL, "vae")
    ae = cls.from_pretrained(folder, subfolder=sub, torch_dtype=F64).eval()
    images = _rand((3, 3, 16, 16), dtype=F64).clamp(-1, 1)
    z = probe.encode(images, batch_size=2)
    with torch.no_grad():
        raw = ae.encode(images).latents if kind == "vq" else ae.encode(images).latent_dist.mode()
        recon = ae(images).sample  # the autoencoder's own round trip (posterior mode / quantised)
    assert z.shape == (3, *probe.sample_shape)
    assert _rel(z, 0.5 * raw) < 1e-12  # scaled latents z = scaling_factor · E(x)
    assert _rel(probe.decode(z, batch_size=2), recon) < 1e-12  # decode divides the scaling back out


def test_probability_flow_matches_ldm_pipeline(latent_folder):
    from diffusers import LDMPipeline

    folder = latent_folder("vq")
    probe = latent.load(folder)
    pipe = LDMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    states, decoded_input = [], []
    h1 = pipe.unet.register_forward_pre_hook(lambda mod, args: states.append(args[0].clone()))
    # the pipeline decodes latents / scaling_factor; the quantiser is the first module to see them
    h2 = pipe.vqvae.quantize.register_forward_pre_hook(lambda mod, args: decoded_input.append(args[0].clone()))
    images = pipe(
        batch_size=2, generator=torch.Generator().manual_seed(0), eta=0.0, num_inference_steps=10, output_type="np"
    ).images
    h1.remove(), h2.remove()
    tc, pr = probe.time_convention, probe.process
    ks = [int(k) for k in pipe.scheduler.timesteps]
    ts = [tc.to_canonical(torch.tensor(float(k), dtype=F64)) for k in ks] + [torch.tensor(0.0, dtype=F64)]
    x = states[0]
    with torch.no_grad():
        for step, (t, t_next) in enumerate(zip(ts[:-1], ts[1:]), start=1):
            s = probe.score(x, t)
            a, sig = pr.alpha(t).float(), pr.sigma(t).float()
            x = pr.alpha(t_next).float() * (x + sig**2 * s) / a + pr.sigma(t_next).float() * (-sig * s)
            if step < len(states):
                assert _rel(x, states[step]) < 1e-5, step  # measured ≤ 2.5e-7
    assert _rel(x / probe.scaling_factor, decoded_input[0]) < 1e-5
    ours = (probe.decode(decoded_input[0] * probe.scaling_factor) / 2 + 0.5).clamp(0, 1)
    assert float((ours.permute(0, 2, 3, 1) - torch.from_numpy(images)).abs().max()) < 1e-5


def test_latent_x0_equals_scheduler_step(latent_folder):
    from diffusers import DDPMScheduler, UNet2DModel

    folder = latent_folder("kl")
    probe = latent.load(folder, dtype=F64)
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet", torch_dtype=F64).eval()
    x = _rand((2, 4, 8, 8), dtype=F64)
    for k in (5, 300, 999):
        t = probe.time_convention.to_canonical(torch.tensor(float(k), dtype=F64))
        with torch.no_grad():
            s = probe.score(x, t)
            ref = sched.step(unet(x, k).sample, k, x, generator=torch.Generator().manual_seed(0)).pred_original_sample
        ours = (x + probe.process.sigma(t) ** 2 * s) / probe.process.alpha(t)
        assert _rel(ours, ref) < 1e-6


def test_conditional_unet_is_refused(latent_folder, tmp_path):
    import shutil

    folder = tmp_path / "sd-like"
    shutil.copytree(latent_folder("kl"), folder)
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**cfg, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ModelLoadError, match="not an unconditional UNet2DModel"):
        latent.load(folder)


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_data_images_are_encoded_and_latents_taken_as_given(latent_folder, kind, tmp_path):
    import numpy as np

    from conservcheck.x0.data import load_data

    probe = latent.load(latent_folder(kind), dtype=F64)
    assert probe.image_shape == (3, 16, 16)  # 8×8 latents, two down blocks of the autoencoder
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)  # HWC, 8-bit
    np.save(tmp_path / "images.npy", pixels)
    x, info = load_data(str(tmp_path / "images.npy"), probe, 4, seed=0)
    # The same images mapped onto [−1, 1] and encoded by the probe itself.
    want = probe.encode(torch.from_numpy(pixels).permute(0, 3, 1, 2).double() / 255 * 2 - 1)
    assert x.shape == (4, *probe.sample_shape) and _rel(x, want) < 1e-12
    assert info["mapping"].endswith("encoded into latents by the model's autoencoder")
    # Scaled latents have no fixed bounds: an array shaped like them is used as is, even beyond ±1.
    z = 3 * torch.randn(5, *probe.sample_shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    np.save(tmp_path / "latents.npy", z.numpy())
    got, info = load_data(str(tmp_path / "latents.npy"), probe, 5, seed=0)
    assert torch.equal(got, z) and info["mapping"] == "latents used as given"


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_latent_audit_end_to_end(latent_folder, kind, audit_end_to_end):
    data = audit_end_to_end(latent_folder(kind), "--time-indices", "10,500")
    assert data["model"]["adapter"] == "latent" and data["model"]["latent"] is True
    assert [p["index"] for p in data["time_points"]] == [10, 500]
    assert data["verdict"]["status"] in ("pass", "violation")
