"""The network of a score_sde config, built from :mod:`conservcheck.networks` and loaded with a checkpoint.

``model.name = "ncsnpp"`` (NCSN++, NCSN++ deep, DDPM++, DDPM++ deep) builds
:class:`~conservcheck.networks.ncsnpp.NCSNpp`; ``"ddpm"`` builds score_sde's DDPM baseline
(:class:`~conservcheck.networks.ddpm_unet.DDPMUNet`). Both lay out their parameters like score_sde's
classes, so a checkpoint's ``model`` state dict (``module.`` stripped) loads as it is and the EMA shadow
list maps onto ``parameters()`` by position.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from conservcheck.adapters.score_sde.config import SDEConfig
from conservcheck.errors import ModelLoadError, reason
from conservcheck.networks import ncsnpp
from conservcheck.networks.ddpm_unet import DDPMUNet
from conservcheck.networks.ncsnpp import NCSNpp

SDES = ("vesde", "vpsde", "subvpsde")
_FIX = "fix the config (or start from a preset: see conservcheck.adapters.score_sde.config.PRESETS)"


def check_supported(cfg: SDEConfig) -> None:
    """Raise :class:`ModelLoadError` naming the setting when ``cfg`` is not a network score_sde can evaluate."""
    name = cfg.name.lower()
    if name not in ("ncsnpp", "ddpm"):
        raise ModelLoadError(
            f"score_sde model.name {cfg.name!r} is not supported (supported: ncsnpp, ddpm)",
            "NCSN/NCSNv2 checkpoints use other architectures; wrap them with a 'module:factory' reference",
        )
    if cfg.sde.lower() not in SDES:
        raise ModelLoadError(f"unknown training.sde {cfg.sde!r}", f"use one of {', '.join(SDES)}")
    if cfg.subvp and not cfg.continuous:
        raise ModelLoadError("score_sde trains sub-VP models in continuous time only", "set training.continuous true")
    if cfg.normalization.lower() != "groupnorm" or cfg.attention_type.lower() != "ddpm":
        raise ModelLoadError(
            f"normalization {cfg.normalization!r} / attention_type {cfg.attention_type!r} is not supported",
            "score_sde's NCSN++, DDPM++ and DDPM use GroupNorm and attention_type 'ddpm'",
        )
    if cfg.image_size % 2 ** (len(cfg.ch_mult) - 1):
        raise ModelLoadError(
            f"image_size {cfg.image_size} is not divisible by 2^{len(cfg.ch_mult) - 1}",
            "check data.image_size and model.ch_mult",
        )
    if name == "ddpm":
        if not cfg.conditional:
            raise ModelLoadError("score_sde's DDPM cannot be built with model.conditional false", _FIX)
        bad = [c for c in {cfg.nf * m for m in cfg.ch_mult} if c % 32]
        if bad:
            raise ModelLoadError(f"DDPM's GroupNorm has 32 groups; width {bad[0]} is not divisible by 32", _FIX)
    else:
        problem = ncsnpp.check_supported(
            resblock_type=cfg.resblock_type,
            progressive=cfg.progressive,
            progressive_input=cfg.progressive_input,
            progressive_combine=cfg.progressive_combine,
            embedding_type=cfg.embedding_type,
            nonlinearity=cfg.nonlinearity,
            fir=cfg.fir,
            resamp_with_conv=cfg.resamp_with_conv,
        )
        if problem:
            raise ModelLoadError(f"score_sde model with {problem}", _FIX)
    embedding = cfg.time_embedding
    if embedding == "fourier" and not cfg.continuous:
        raise ModelLoadError("a Fourier time embedding needs continuous training", "set training.continuous true")
    if embedding == "positional" and cfg.ve and cfg.continuous:
        raise ModelLoadError(
            "a continuously trained VE model with a positional embedding would be fed sigma as a table index",
            "score_sde's continuous VE configs use embedding_type 'fourier'",
        )
    if cfg.ve and not cfg.sigma_max:
        raise ModelLoadError(
            "the config has no model.sigma_max for a VE model",
            "add it (50 CIFAR-10, 90 CelebA 64, 348 CelebA-HQ/FFHQ-256, 378 bedroom, 380 church, 1348 at 1024)",
        )


def build(cfg: SDEConfig, num_scales: int) -> nn.Module:
    """The network of ``cfg`` with random weights (``num_scales`` entries in its ``sigmas`` table)."""
    check_supported(cfg)
    common: dict[str, Any] = dict(
        image_size=cfg.image_size,
        num_channels=cfg.num_channels,
        centered=cfg.centered,
        nf=cfg.nf,
        ch_mult=cfg.ch_mult,
        num_res_blocks=cfg.num_res_blocks,
        attn_resolutions=cfg.attn_resolutions,
        resamp_with_conv=cfg.resamp_with_conv,
        nonlinearity=cfg.nonlinearity,
        scale_by_sigma=cfg.scaled_by_sigma,
        sigma_min=cfg.sigma_min,
        sigma_max=cfg.sigma_max or 50.0,  # score_sde's default: the VP models' (unused) table
        num_scales=num_scales,
    )
    try:
        if cfg.name.lower() == "ddpm":
            return DDPMUNet(**common)
        return NCSNpp(
            **common,
            conditional=cfg.conditional,
            resblock_type=cfg.resblock_type,
            progressive=cfg.progressive,
            progressive_input=cfg.progressive_input,
            progressive_combine=cfg.progressive_combine,
            fir=cfg.fir,
            fir_kernel=cfg.fir_kernel,
            skip_rescale=cfg.skip_rescale,
            embedding_type=cfg.embedding_type,
        )
    except (ValueError, RuntimeError, ZeroDivisionError) as err:
        # e.g. a width GroupNorm cannot split into min(C/4, 32) groups
        raise ModelLoadError(f"the network of this config cannot be built ({reason(err)})", _FIX) from err


def trainable(net: nn.Module) -> list[str]:
    """Names of the parameters score_sde's EMA tracks, in ``parameters()`` order (all but the Fourier W)."""
    return [name for name, p in net.named_parameters() if p.requires_grad]


def architecture(cfg: SDEConfig) -> str:
    """The paper's name of the architecture: DDPM, DDPM++, NCSN++ (and their deep variants)."""
    if cfg.name.lower() == "ddpm":
        return "DDPM (score_sde)"
    plain = cfg.progressive.lower() == "none" and cfg.progressive_input.lower() == "none" and not cfg.fir
    deep = " deep" if cfg.num_res_blocks >= 8 else ""
    return f"{'DDPM++' if plain else 'NCSN++'}{deep} (conservcheck.networks.ncsnpp)"


def load_weights(net: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a checkpoint's state dict (no ``module.`` prefix) into ``net``; every parameter must match.

    A missing ``sigmas`` buffer (a bare state dict saved without it) keeps the table built from the config.
    """
    own = net.state_dict()
    missing = [k for k in own if k not in state and k != "sigmas"]
    extra = [k for k in state if k not in own]
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has parameters the config does not build (first: {extra[0]})"
        raise ModelLoadError(
            f"the checkpoint {what}: it does not match the config ({len(missing)} missing, {len(extra)} unexpected)",
            "check the config's name, nf, ch_mult, num_res_blocks, attn_resolutions and progressive settings",
        )
    for key, value in own.items():
        if key in state and tuple(state[key].shape) != tuple(value.shape):
            raise ModelLoadError(
                f"the checkpoint's {key} has shape {tuple(state[key].shape)}, the config builds {tuple(value.shape)}",
                "check the config's nf, ch_mult and num_res_blocks",
            )
    with torch.no_grad():
        net.load_state_dict(dict(state), strict="sigmas" in state)
