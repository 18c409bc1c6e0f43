"""Stable Diffusion-class pipelines: the probe against StableDiffusionPipeline's own steps, prompt
encoding, memory hygiene, refusals, and the CLI audit with a prompt at w ∈ {1, 7.5}.

The pipelines are tiny (tests/tiny_conditional.py) and saved as the SD 1.5 (PNDM, epsilon, text encoder
as ``pytorch_model.bin``) and SD 2.1 (DDIM, v_prediction, gelu text encoder, linear projections)
repositories are laid out. The pipeline runs DDIM (η = 0) in float64 from given latents; its states are
captured after every step and compared with DDIM written with the probe's guided score.
"""

from __future__ import annotations

import sys

import pytest
import torch
from tiny_conditional import rel, save_sd_pipeline

from conservcheck import conditioning
from conservcheck.adapters import latent, text_to_image
from conservcheck.adapters.resolve import load_reference
from conservcheck.errors import ModelLoadError, UsageError

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
PROMPTS = ["a cat", "the dog"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    made = {}

    def make(version: str):
        if version not in made:
            weights = "bin" if version == "1" else "safetensors"
            made[version] = save_sd_pipeline(tmp_path_factory.mktemp(f"sd{version}"), version, weights)
        return made[version]

    return make


def test_detect_takes_sd_folders_before_the_latent_adapter(sd_folder, latent_folder):
    folder = sd_folder("1")
    assert text_to_image.detect(folder) and latent.detect(folder)
    assert not text_to_image.detect(latent_folder("kl"))
    probe = load_reference(str(folder), condition={"prompt": ("a cat",)})
    assert probe.info.adapter == "text_to_image" and probe.conditioning.kind == "text"


def _pipeline(folder, scheduler_cls):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=F64),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder").to(F64),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=F64),
        scheduler=scheduler_cls.from_pretrained(folder / "scheduler", clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ddim_in_score_terms(probe, x, ks, alphas_cumprod, final_alpha_cumprod, stride):
    """The states after each DDIM (η = 0) step, written with the probe's score (ε̂ = −σ s)."""
    states = []
    with torch.no_grad():
        for k in ks:
            t = probe.time_convention.to_canonical(torch.tensor(float(k), dtype=F64))
            s = probe.score(x, t)
            a, sig = probe.process.alpha(t), probe.process.sigma(t)
            x0, eps = (x + sig**2 * s) / a, -sig * s
            prev = k - stride
            abar = alphas_cumprod[prev] if prev >= 0 else final_alpha_cumprod
            x = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
            states.append(x)
    return states


@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize("w", [1.0, 7.5])
def test_guided_probe_steps_like_the_pipeline(sd_folder, version, w):
    from diffusers import DDIMScheduler

    folder = sd_folder(version)
    probe = text_to_image.load(folder, dtype=F64, prompt=PROMPTS, negative_prompt="a bad one")
    assert probe.parameterization == ("epsilon" if version == "1" else "v")
    pipe = _pipeline(folder, DDIMScheduler)
    seen = []
    x_init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)

    def keep(pipe, i, t, kw):
        seen.append(kw["latents"].clone())
        return {}

    pipe(
        prompt=PROMPTS[1], negative_prompt="a bad one", guidance_scale=w, num_inference_steps=4,
        latents=x_init.clone(), output_type="latent", height=16, width=16, callback_on_step_end=keep,
    )  # fmt: skip
    sched = pipe.scheduler
    ks = [int(k) for k in sched.timesteps]
    with conditioning.select(probe, condition=1, guidance=w):
        ours = ddim_in_score_terms(probe, x_init, ks, sched.alphas_cumprod.to(F64), sched.final_alpha_cumprod, 250)
    # DDIMScheduler keeps ᾱ in float32 and the pipeline feeds integer timesteps: float32 rounding of the
    # step's coefficients (measured ≤ 6.3e-8 relative to the largest entry over 4 steps)
    errors = [rel(a, b) for a, b in zip(ours, seen)]
    assert max(errors) < 1e-6, errors


def test_prompts_are_encoded_once_and_the_encoders_freed(sd_folder, monkeypatch):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    calls = []
    original = StableDiffusionPipeline.encode_prompt

    def counting(self, prompt, *args, **kw):
        calls.append(list(prompt))
        return original(self, prompt, *args, **kw)

    monkeypatch.setattr(StableDiffusionPipeline, "encode_prompt", counting)
    probe = text_to_image.load(sd_folder("1"), dtype=F64, prompt=["a cat", "the dog", "a cat"])
    assert calls == [["a cat", "the dog"]]
    emb = probe.fn.cond_encoder_hidden_states
    assert emb.shape == (3, 16, 32) and torch.equal(emb[0], emb[2]) and not torch.equal(emb[0], emb[1])
    assert not any(isinstance(m, CLIPTextModel) for m in probe.fn.modules())
    info = probe.describe()
    assert info["conditioning"]["unconditional"] == "the empty prompt"
    assert any(f.startswith("text_encoder/") for f in info["weights_files"])
    assert any(f.startswith("tokenizer/") for f in info["weights_files"])


def test_autoencoder_is_read_only_to_encode_images_and_freed(sd_folder):
    from diffusers import AutoencoderKL

    folder = sd_folder("2")
    probe = text_to_image.load(folder, dtype=F64, prompt="a cat")
    assert probe._autoencoder is None and probe.image_shape == (3, 16, 16)
    images = torch.rand(2, 3, 16, 16, dtype=F64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = probe.encode(images)
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=F64).eval()
    with torch.no_grad():
        want = vae.encode(images).latent_dist.mode() * 0.5
    assert z.shape == (2, 4, 8, 8) and rel(z, want) < 1e-12
    probe.release()
    assert probe._autoencoder is None


def test_refusals_are_one_line(sd_folder, tmp_path, monkeypatch):
    import json
    import shutil

    with pytest.raises(UsageError, match="needs a prompt"):
        text_to_image.load(sd_folder("1"))
    xl = tmp_path / "xl"
    shutil.copytree(sd_folder("1"), xl)
    cfg = json.loads((xl / "unet" / "config.json").read_text())
    (xl / "unet" / "config.json").write_text(json.dumps({**cfg, "addition_embed_type": "text_time"}))
    with pytest.raises(ModelLoadError, match="SDXL-class"):
        text_to_image.load(xl, prompt="a cat")
    with pytest.raises(UsageError, match="takes --prompt, --negative-prompt, not --class-label"):
        load_reference(str(sd_folder("1")), condition={"class_label": (3,)})
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the text extra were not installed
    with pytest.raises(ModelLoadError, match=r"pip install transformers \(the text extra\)") as err:
        text_to_image.load(sd_folder("1"), prompt="a cat")
    assert "\n" not in str(err.value)


def test_cli_audit_with_a_prompt_at_two_guidance_scales(sd_folder, audit_end_to_end):
    data = audit_end_to_end(sd_folder("2"), "--prompt", "a cat", "--guidance-scale", "1,7.5", "--negative-prompt", "x")
    cond = data["model"]["conditioning"]
    assert data["model"]["adapter"] == "text_to_image" and cond["prompts"] == ["a cat"]
    assert cond["negative_prompt"] == "x" and cond["guidance_scales"] == [1.0, 7.5]
    assert {c["guidance"] for c in data["verdict"]["checks"]} == {1.0, 7.5}
    assert data["verdict"]["status"] in ("pass", "violation")
