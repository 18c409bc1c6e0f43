"""SD3-class flow transformers: the probe against StableDiffusion3Pipeline's own Euler steps, the text
encoders (two CLIPs with projection, no T5), differentiable joint attention, and the CLI audit.

The scheduler is FlowMatchEulerDiscreteScheduler(shift=3): x ← x + (σ' − σ) v̂ with the transformer fed
1000 σ. From the probe's score at t = σ, v̂ = (ε̂ − x)/(1 − t) with ε̂ = −t s. The pipeline starts at
σ = 1, where the score −x carries no information about v̂; the comparison starts from its first state.
"""

from __future__ import annotations

import pytest
import torch
from tiny_conditional import rel, save_sd3_pipeline

from conservcheck import conditioning
from conservcheck.adapters import flow, sd3
from conservcheck.adapters.resolve import load_reference
from conservcheck.geometry import jacobian

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
PROMPTS = ["a cat", "the dog"]


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return save_sd3_pipeline(tmp_path_factory.mktemp("sd3"))


def test_detect(sd3_folder):
    assert sd3.detect(sd3_folder) and not flow.detect(sd3_folder)
    probe = load_reference(str(sd3_folder), condition={"prompt": ("a cat",)})
    assert probe.info.adapter == "sd3" and probe.process.name == "flow"
    assert probe.info.extra["text_encoders"] == ["text_encoder", "text_encoder_2"]
    # 16 CLIP tokens, then the 256 T5 positions the pipeline fills with zeros without a T5 encoder
    assert probe.info.extra["text_embedding_shape"] == [16 + 256, 32]


@pytest.mark.parametrize("w", [1.0, 7.5])
def test_guided_probe_steps_like_the_pipeline(sd3_folder, w):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline as Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    folder = sd3_folder
    probe = sd3.load(folder, dtype=F64, prompt=PROMPTS, negative_prompt="a bad one")
    clip = CLIPTextModelWithProjection
    pipe = Pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(folder / "transformer").to(F64),
        vae=AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=F64),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        text_encoder=clip.from_pretrained(folder / "text_encoder").to(F64),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder_2=clip.from_pretrained(folder / "text_encoder_2").to(F64),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    seen = []

    def keep(pipe, i, t, kw):
        seen.append(kw["latents"].clone())
        return {}

    x_init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    pipe(
        prompt=PROMPTS[1], negative_prompt="a bad one", guidance_scale=w, num_inference_steps=4,
        latents=x_init, output_type="latent", height=16, width=16, callback_on_step_end=keep,
    )  # fmt: skip
    sigmas = pipe.scheduler.sigmas.to(F64)
    assert float(sigmas[1]) < 0.9  # shift 3 moved the grid
    x, errors = seen[0], []
    with conditioning.select(probe, condition=1, guidance=w), torch.no_grad():
        for i in range(1, 4):
            t = sigmas[i]
            v = (-t * probe.score(x, t) - x) / (1 - t)
            x = x + (sigmas[i + 1] - t) * v
            errors.append(rel(x, seen[i]))
    # the pipeline feeds 1000 σ in float32 (measured ≤ 5.2e-8)
    assert max(errors) < 1e-6, errors


def test_joint_attention_is_differentiable_forward_and_backward(sd3_folder):
    probe = sd3.load(sd3_folder, dtype=F64, prompt="a cat")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    with conditioning.select(probe, guidance=7.5):
        choice = jacobian.select_strategy(probe.score, x, torch.tensor(0.4, dtype=F64))
    # the math SDPA kernel carries tangents and double backward: forward mode runs and agrees with differences
    assert choice.name == "jvp" and choice.rejected == {}, choice


@pytest.mark.slow
def test_cli_audit_with_a_prompt_at_two_guidance_scales(sd3_folder, audit_end_to_end):
    data = audit_end_to_end(sd3_folder, "--prompt", "a cat", "--guidance-scale", "1,7.5")
    assert data["model"]["adapter"] == "sd3" and data["model"]["conditioning"]["guidance_scales"] == [1.0, 7.5]
    assert {c["guidance"] for c in data["verdict"]["checks"]} == {1.0, 7.5}
    assert data["jacobian_strategy"]["curl.subjacobian"] == "jvp"
