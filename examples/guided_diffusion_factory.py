"""openai guided-diffusion / improved-diffusion checkpoints through a ``module:factory`` reference.

Those repositories publish ``.pt`` state dicts of their ``UNetModel`` (e.g. guided-diffusion's
``256x256_diffusion_uncond.pt``, ``64x64_diffusion.pt``; improved-diffusion's ``cifar10_uncond_50M_500K.pt``)
and the flags that build it. conservcheck does not ship their code: this factory imports their package
— ``guided_diffusion`` (or ``improved_diffusion``), installed with ``pip install -e <clone>`` — builds the
network and its diffusion from the same flags, and declares the units:

* the network is fed the DDPM index k (× 1000/T when ``rescale_timesteps``, improved-diffusion's default)
  and predicts ε (x0 with ``predict_xstart``);
* with ``learn_sigma`` it outputs 2C channels — ε̂, then the variance interpolation v — and only the first
  C are the score's: s = −ε̂/√(1 − ᾱ_k);
* the schedule is the diffusion's own ``betas`` (``noise_schedule`` linear or cosine, ``diffusion_steps``
  T), observed as the OU process at t_k = −½ log ᾱ_k; data in [−1, 1].

Usage (flags as in the repositories' READMEs; ``use_fp16`` is ignored — the network runs in the probe's
dtype)::

    pip install -e /path/to/guided-diffusion
    export GUIDED_DIFFUSION_CHECKPOINT=256x256_diffusion_uncond.pt
    export GUIDED_DIFFUSION_FLAGS="--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 \\
        --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 \\
        --num_res_blocks 2 --resblock_updown True --use_scale_shift_norm True"
    PYTHONPATH=examples conservcheck audit guided_diffusion_factory:make --paths rotation

``GUIDED_DIFFUSION_PACKAGE`` picks ``guided_diffusion`` or ``improved_diffusion`` (default: the first that
imports); a class-conditional network (``--class_cond True``) needs ``GUIDED_DIFFUSION_CLASS``, the class
label every evaluation uses.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex

import torch

from conservcheck.process import DiscreteSchedule

PACKAGES = ("guided_diffusion", "improved_diffusion")


class EpsilonOfLearnedVariance(torch.nn.Module):
    """``fn(x, k)``: the network at index k (scaled like the diffusion's ``_scale_timesteps``), its first C
    output channels (ε̂, or x̂0 with ``predict_xstart``); with ``class_label`` every sample gets that class."""

    def __init__(self, net: torch.nn.Module, channels: int, time_scale: float, class_label: int | None) -> None:
        super().__init__()
        self.net, self.channels, self.time_scale, self.class_label = net, channels, time_scale, class_label

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        t = k * self.time_scale
        if self.class_label is None:
            out = self.net(x, t)
        else:
            out = self.net(x, t, y=torch.full((x.shape[0],), self.class_label, dtype=torch.long, device=x.device))
        return out[:, : self.channels]


def _package():
    wanted = os.environ.get("GUIDED_DIFFUSION_PACKAGE")
    for name in (wanted,) if wanted else PACKAGES:
        try:
            return importlib.import_module(f"{name}.script_util")
        except ImportError:
            continue
    raise ImportError(
        f"none of {', '.join((wanted,) if wanted else PACKAGES)} is importable: pip install -e a clone of "
        "openai/guided-diffusion or openai/improved-diffusion"
    )


def _required(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ValueError(f"set {name} (see examples/guided_diffusion_factory.py)")
    return value


def make(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, declaration) for the checkpoint ``$GUIDED_DIFFUSION_CHECKPOINT``, built with
    ``$GUIDED_DIFFUSION_FLAGS``."""
    util = _package()
    defaults = util.model_and_diffusion_defaults()
    parser = argparse.ArgumentParser()
    util.add_dict_to_argparser(parser, defaults)
    args = parser.parse_args(shlex.split(os.environ.get("GUIDED_DIFFUSION_FLAGS", "")))
    kwargs = util.args_to_dict(args, defaults.keys())
    kwargs["timestep_respacing"] = ""  # the training schedule: every index k is the network's own
    if "use_fp16" in kwargs:
        kwargs["use_fp16"] = False
    net, diffusion = util.create_model_and_diffusion(**kwargs)
    state = torch.load(_required("GUIDED_DIFFUSION_CHECKPOINT"), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    net.to(device=device, dtype=dtype)
    if "dtype" in vars(net):
        net.dtype = dtype  # guided-diffusion's UNet casts its input to this attribute (float32 by default)
    class_label = None
    if kwargs.get("class_cond"):
        class_label = int(_required("GUIDED_DIFFUSION_CLASS"))
    steps = len(diffusion.betas)
    time_scale = 1000.0 / steps if getattr(diffusion, "rescale_timesteps", False) else 1.0
    size = int(kwargs["image_size"])
    model = EpsilonOfLearnedVariance(net, int(getattr(net, "in_channels", 3)), time_scale, class_label)
    return model, dict(
        parameterization="x0" if kwargs.get("predict_xstart") else "epsilon",
        process="ou",
        time_convention=DiscreteSchedule.from_betas(
            torch.as_tensor(diffusion.betas), name=str(kwargs["noise_schedule"])
        ),
        sample_shape=(model.channels, size, size),
        data_range=(-1.0, 1.0),
        name=os.path.basename(os.environ["GUIDED_DIFFUSION_CHECKPOINT"]),
    )
