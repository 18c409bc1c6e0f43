"""The guided-diffusion / improved-diffusion recipe (``examples/guided_diffusion_factory.py``) end to end.

openai's packages are not installed here, so the test writes stand-ins with their public surface
(``<package>.script_util``: ``model_and_diffusion_defaults``, ``add_dict_to_argparser``, ``args_to_dict``,
``create_model_and_diffusion`` returning a network and a diffusion with ``betas`` and
``rescale_timesteps``). The stand-in network has their output convention: with ``learn_sigma`` 2C
channels, ε̂ then a variance interpolation (here a constant, so a recipe that read the wrong half fails),
fed the DDPM index (× 1000/T with ``rescale_timesteps``). Its ε̂ is the ideal one for data N(0, σ_d² I),
so the exact score is known; its schedule follows their ``get_named_beta_schedule`` (linear scaled to T
steps, cosine with s = 0.008 and β ≤ 0.999). The factory runs through the real custom adapter path
(``load_reference("guided_diffusion_factory:make")``), and the units are checked against diffusers'
``DDPMScheduler`` with the same betas and ``variance_type="learned_range"``, which reads ε̂ from the
first C channels the same way.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from conservcheck.adapters.resolve import load_reference
from conservcheck.errors import ModelLoadError

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
SIGMA_D = 0.6

SCRIPT_UTIL = f"""
import argparse
import math

import numpy as np
import torch

SIGMA_D = {SIGMA_D}


def model_and_diffusion_defaults():
    return dict(image_size=64, num_channels=128, learn_sigma=False, class_cond=False, diffusion_steps=1000,
                noise_schedule="linear", timestep_respacing="", predict_xstart=False, rescale_timesteps=False,
                use_fp16=False)


def str2bool(v):
    return v if isinstance(v, bool) else v.lower() in ("yes", "true", "t", "y", "1")


def add_dict_to_argparser(parser, default_dict):
    for k, v in default_dict.items():
        parser.add_argument(f"--{{k}}", default=v, type=str2bool if isinstance(v, bool) else type(v))


def args_to_dict(args, keys):
    return {{k: getattr(args, k) for k in keys}}


def named_betas(name, steps):
    if name == "linear":
        scale = 1000 / steps
        return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)])


class Diffusion:
    def __init__(self, betas, rescale_timesteps):
        self.betas, self.rescale_timesteps, self.num_timesteps = betas, rescale_timesteps, len(betas)


class UNetModel(torch.nn.Module):
    def __init__(self, learn_sigma, class_cond, alphas_cumprod, time_scale):
        super().__init__()
        self.dtype = torch.float32
        self.in_channels, self.learn_sigma, self.class_cond, self.time_scale = 3, learn_sigma, class_cond, time_scale
        self.gain = torch.nn.Parameter(torch.ones(()))
        self.register_buffer("abar", torch.as_tensor(alphas_cumprod))

    def forward(self, x, timesteps, y=None):
        assert (y is not None) == self.class_cond
        k = (timesteps.double() / self.time_scale).round().long()
        abar = self.abar[k].to(self.dtype).reshape(-1, 1, 1, 1)
        h = x.type(self.dtype)
        eps = torch.sqrt(1 - abar) * h / (abar * SIGMA_D ** 2 + 1 - abar) * self.gain
        out = torch.cat([eps, torch.full_like(eps, 7.0)], 1) if self.learn_sigma else eps
        return out.type(x.dtype)


def create_model_and_diffusion(image_size, num_channels, learn_sigma, class_cond, diffusion_steps, noise_schedule,
                               timestep_respacing, predict_xstart, rescale_timesteps, use_fp16):
    assert timestep_respacing == "" and not use_fp16
    betas = named_betas(noise_schedule, diffusion_steps)
    diffusion = Diffusion(betas, rescale_timesteps)
    time_scale = 1000.0 / diffusion_steps if rescale_timesteps else 1.0
    return UNetModel(learn_sigma, class_cond, np.cumprod(1 - betas), time_scale), diffusion
"""

CASES = {
    # guided-diffusion's 256x256_diffusion_uncond.pt flags (linear, 1000 steps, learn_sigma)
    "guided_linear": (
        "guided_diffusion",
        "--image_size 8 --learn_sigma True --noise_schedule linear --diffusion_steps 1000 --use_fp16 True",
        "linear",
        1000,
        1.0,
    ),
    # improved-diffusion's CIFAR-10 flags (cosine, 4000 steps, learn_sigma, rescale_timesteps)
    "improved_cosine": (
        "improved_diffusion",
        "--image_size 8 --learn_sigma True --noise_schedule cosine --diffusion_steps 4000 --rescale_timesteps True",
        "squaredcos_cap_v2",
        4000,
        0.25,
    ),
    # a class-conditional ImageNet-style network: the recipe fixes one class
    "guided_class_cond": (
        "guided_diffusion",
        "--image_size 8 --learn_sigma True --class_cond True",
        "linear",
        1000,
        1.0,
    ),
}


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    """``recipe(case)`` → (probe, stand-in network, its betas): the stand-in package installed, a checkpoint
    saved by it, the factory loaded through ``load_reference``."""
    import argparse
    import importlib
    import shlex
    import sys

    def make(case: str):
        package, flags, _, _, _ = CASES[case]
        root = tmp_path / case
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
        (root / package / "script_util.py").write_text(SCRIPT_UTIL)
        monkeypatch.syspath_prepend(str(root))
        monkeypatch.syspath_prepend(str(EXAMPLES))
        for name in [m for m in sys.modules if m.split(".")[0] in ("guided_diffusion", "improved_diffusion")]:
            monkeypatch.delitem(sys.modules, name)
        util = importlib.import_module(f"{package}.script_util")
        parser = argparse.ArgumentParser()
        util.add_dict_to_argparser(parser, util.model_and_diffusion_defaults())
        args = util.args_to_dict(parser.parse_args(shlex.split(flags)), util.model_and_diffusion_defaults())
        net, diffusion = util.create_model_and_diffusion(**{**args, "use_fp16": False})
        checkpoint = root / "model.pt"
        torch.save(net.state_dict(), checkpoint)
        monkeypatch.setenv("GUIDED_DIFFUSION_PACKAGE", package)
        monkeypatch.setenv("GUIDED_DIFFUSION_CHECKPOINT", str(checkpoint))
        monkeypatch.setenv("GUIDED_DIFFUSION_FLAGS", flags)
        if args["class_cond"]:
            monkeypatch.setenv("GUIDED_DIFFUSION_CLASS", "207")
        probe = load_reference("guided_diffusion_factory:make", dtype=torch.float64)
        return probe, net.double(), torch.as_tensor(diffusion.betas)

    return make


@pytest.mark.parametrize("case", list(CASES))
def test_recipe_units_against_diffusers_scheduler(recipe, case):
    from diffusers import DDPMScheduler

    _, _, schedule, steps, time_scale = CASES[case]
    probe, net, betas = recipe(case)
    assert probe.info.adapter == "custom" and probe.parameterization == "epsilon" and probe.process.name == "ou"
    assert probe.sample_shape == (3, 8, 8) and probe.data_range == (-1.0, 1.0)
    # their schedule is diffusers' schedule of the same name (linear scaled to T, squaredcos_cap_v2)
    named = DDPMScheduler(num_train_timesteps=steps, beta_schedule=schedule)
    abar = probe.time_convention.alphas_cumprod
    assert torch.allclose(abar, named.alphas_cumprod.double(), rtol=2e-5, atol=1e-9)  # diffusers: float32
    scheduler = DDPMScheduler(
        num_train_timesteps=steps, trained_betas=betas.tolist(), variance_type="learned_range", clip_sample=False
    )
    g = torch.Generator().manual_seed(0)
    for k in (0, 10, steps // 2, steps - 1):
        t = probe.time_convention.to_canonical(torch.tensor(float(k), dtype=torch.float64))
        x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64) * torch.sqrt(abar[k] * SIGMA_D**2 + 1 - abar[k])
        with torch.no_grad():
            score = probe.score(x, t)
            # exact: x ~ N(0, (ᾱ σ_d² + 1 − ᾱ) I), so s = −x/(ᾱ σ_d² + 1 − ᾱ); float64 throughout
            assert torch.allclose(score, -x / (abar[k] * SIGMA_D**2 + 1 - abar[k]), rtol=1e-12, atol=0)
            # diffusers reads the same network output (2C channels, ε̂ first) and gives the same x̂0
            labels = torch.full((2,), k * time_scale, dtype=torch.float64)
            y = torch.full((2,), 207) if "class" in case else None
            out = net(x, labels, y=y)
            x0 = scheduler.step(out, k, x).pred_original_sample
        alpha, sigma = probe.process.alpha(t), probe.process.sigma(t)
        mine = (x + sigma**2 * score) / alpha
        # x̂0 = (x − √(1 − ᾱ) ε̂)/√ᾱ cancels terms of size |x|/√ᾱ, and diffusers rounds √ᾱ and √(1 − ᾱ)
        # through float32 (relative 6e-8): the error is measured on that scale
        err = float((mine - x0).abs().max() * alpha / x.abs().max())
        assert err < 1e-6, (k, err)


def test_recipe_needs_its_checkpoint(recipe, monkeypatch):
    recipe("guided_linear")
    monkeypatch.delenv("GUIDED_DIFFUSION_CHECKPOINT")
    with pytest.raises(ModelLoadError, match="raised ValueError: set GUIDED_DIFFUSION_CHECKPOINT"):
        load_reference("guided_diffusion_factory:make")
