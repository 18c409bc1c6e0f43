"""Class-conditional DiT pipelines: the probe against DiTPipeline's own steps (learned sigma: ε is the
first C of 2C channels; guidance on ε), its decoded images, labels, and the CLI audit at w ∈ {1, 7.5}.

The DiT is tiny (tests/tiny_conditional.py) with 1000 classes, as the pipeline hard-codes the null class
1000. DiTPipeline has no latents argument or step callback: its states are the transformer's inputs,
captured with a forward pre-hook (the first half of the doubled batch when it guides).
"""

from __future__ import annotations

import pytest
import torch
from tiny_conditional import rel, save_dit_pipeline

from conservcheck import conditioning
from conservcheck.adapters import dit
from conservcheck.adapters.resolve import load_reference
from conservcheck.errors import UsageError

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    made = {}

    def make(legacy: bool = False):
        if legacy not in made:
            made[legacy] = save_dit_pipeline(tmp_path_factory.mktemp(f"dit-{legacy}"), legacy)
        return made[legacy]

    return make


def test_detect_both_class_names(dit_folder, latent_folder):
    for legacy in (False, True):
        assert dit.detect(dit_folder(legacy))
        probe = load_reference(str(dit_folder(legacy)), condition={"class_label": (3,)})
        assert probe.info.adapter == "dit" and probe.info.extra["learned_sigma"] is True
    assert not dit.detect(latent_folder("kl"))


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("w", [1.0, 4.0])
def test_guided_probe_steps_like_the_pipeline(dit_folder, legacy, w):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    folder = dit_folder(legacy)
    probe = dit.load(folder, dtype=F64, class_label=[3, 207])
    pipe = DiTPipeline(
        transformer=DiTTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=F64),
        vae=AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=F64),
        scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"),
    )
    pipe.set_progress_bar_config(disable=True)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda mod, args: seen.append(args[0][:1].clone()))
    images = pipe(
        class_labels=[207], guidance_scale=w, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images  # fmt: skip
    hook.remove()
    sched = pipe.scheduler
    x = seen[0]
    states = []
    with conditioning.select(probe, condition=1, guidance=w), torch.no_grad():
        for k in [int(k) for k in sched.timesteps]:
            t = probe.time_convention.to_canonical(torch.tensor(float(k), dtype=F64))
            s = probe.score(x, t)
            a, sig = probe.process.alpha(t), probe.process.sigma(t)
            x0, eps = (x + sig**2 * s) / a, -sig * s
            abar = sched.alphas_cumprod[k - 250] if k >= 250 else sched.final_alpha_cumprod
            x = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
            states.append(x)
        decoded = (probe.decode(x) / 2 + 0.5).clamp(0, 1)
    # float32 scheduler coefficients (measured ≤ 4e-8 per state, ≤ 1.2e-8 on the decoded image)
    errors = [rel(a, b) for a, b in zip(states, seen[1:])]
    assert max(errors) < 1e-6, errors
    assert float((decoded - images).abs().max()) < 1e-6


def test_labels_random_and_out_of_range(dit_folder):
    probe = dit.load(dit_folder(), class_label="random")
    cond = probe.describe()["conditioning"]
    assert cond["class_labels"] == "random" and cond["num_classes"] == 1000 and cond["null_class"] == 1000
    assert probe.conditioning.assignment == "random" and probe.conditioning.n_conditions == 1000
    with pytest.raises(UsageError, match="outside the model's 1000 classes"):
        dit.load(dit_folder(), class_label=[1000])
    with pytest.raises(UsageError, match="needs a class label"):
        dit.load(dit_folder())


def test_cli_audit_with_random_labels_at_two_guidance_scales(dit_folder, audit_end_to_end):
    data = audit_end_to_end(dit_folder(), "--class-label", "random", "--guidance-scale", "1,7.5")
    cond = data["model"]["conditioning"]
    assert data["model"]["adapter"] == "dit" and cond["class_labels"] == "random"
    assert cond["guidance_scales"] == [1.0, 7.5] and data["options"]["class_label"] == "random"
    assert {c["guidance"] for c in data["verdict"]["checks"]} == {1.0, 7.5}
