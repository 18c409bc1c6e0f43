"""A score_sde NCSN++ as a diffusers ``UNet2DModel`` with Skip blocks (the architecture of google/ncsnpp-*).

:func:`to_unet2d` exports a loaded network (:mod:`conservcheck.networks.ncsnpp`, same state-dict layout
as score_sde's checkpoints) to diffusers, e.g. to run ``ScoreSdeVePipeline`` with an original
checkpoint; the adapter itself evaluates the native network. :func:`key_map` walks the NCSN++ module list
in the order ``NCSNpp.__init__`` builds it. Every
``GroupNorm`` gets NCSN++'s group count min(C/4, 32) after construction: diffusers fixes the Skip blocks'
attention norms at 32 groups and computes the attention up-blocks' resnet groups with an
operator-precedence slip, which only agree with NCSN++ for ≥ 128 channels (all released configs). The
converted network is exact for the settings of the released high-resolution configs
(``progressive="output_skip"``, ``progressive_input="input_skip"``, BigGAN residual blocks, FIR
resampling); :func:`check_convertible` refuses the others.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from conservcheck.adapters.score_sde.config import SDEConfig
from conservcheck.errors import ModelLoadError


def check_convertible(cfg: SDEConfig) -> None:
    """Raise :class:`ModelLoadError` unless ``cfg`` describes a continuous VE NCSN++ that ``UNet2DModel``
    reproduces exactly (``UNet2DModel`` with a Fourier embedding divides its output by the fed σ)."""
    wanted = {
        "name": "ncsnpp",
        "resblock_type": "biggan",
        "progressive": "output_skip",
        "progressive_input": "input_skip",
        "progressive_combine": "sum",
        "fir": True,
        "fir_kernel": (1, 3, 3, 1),
        "conditional": True,
        "skip_rescale": True,
        "nonlinearity": "swish",
        "normalization": "GroupNorm",
        "attention_type": "ddpm",
        "num_channels": 3,
    }
    for key, value in wanted.items():
        got = getattr(cfg, key)
        if (got.lower() if isinstance(got, str) else got) != (value.lower() if isinstance(value, str) else value):
            raise ModelLoadError(
                f"score_sde model with {key}={got!r} has no diffusers UNet2DModel equivalent (needs {value!r})",
                "convertible: the NCSN++ configs with output_skip/input_skip (CelebA-HQ, FFHQ, LSUN); the score_sde "
                "adapter evaluates every config natively",
            )
    if not (cfg.ve and cfg.continuous and cfg.scaled_by_sigma):
        raise ModelLoadError(
            f"a {cfg.sde} model (continuous: {cfg.continuous}) has no diffusers UNet2DModel equivalent",
            "convertible: continuous VE NCSN++ with scale_by_sigma (the CelebA-HQ, FFHQ and LSUN configs)",
        )
    if cfg.ch_mult[0] != 1:
        raise ModelLoadError(
            f"ch_mult starting with {cfg.ch_mult[0]} has no UNet2DModel equivalent", "UNet2DModel needs ch_mult[0] = 1"
        )
    if cfg.image_size % 2 ** (len(cfg.ch_mult) - 1):
        raise ModelLoadError(
            f"image_size {cfg.image_size} is not divisible by 2^{len(cfg.ch_mult) - 1}",
            "check data.image_size and model.ch_mult",
        )
    if cfg.embedding_type != "fourier":
        raise ModelLoadError(
            f"embedding_type {cfg.embedding_type!r} has no UNet2DModel equivalent for a VE model", "needs 'fourier'"
        )
    if cfg.ve and not cfg.sigma_max:
        raise ModelLoadError(
            "the config has no model.sigma_max for a VE model",
            "add it (50 CIFAR-10, 348 CelebA-HQ/FFHQ-256, 1348 at 1024)",
        )


def unet_kwargs(cfg: SDEConfig) -> dict[str, Any]:
    """``UNet2DModel`` constructor arguments reproducing the NCSN++ of ``cfg``."""
    attn = [r in cfg.attn_resolutions for r in cfg.resolutions]
    return dict(
        sample_size=cfg.image_size,
        in_channels=cfg.num_channels,
        out_channels=cfg.num_channels,
        center_input_sample=not cfg.centered,
        time_embedding_type=cfg.embedding_type,
        flip_sin_to_cos=False,
        freq_shift=1,
        down_block_types=tuple("AttnSkipDownBlock2D" if a else "SkipDownBlock2D" for a in attn),
        up_block_types=tuple("AttnSkipUpBlock2D" if a else "SkipUpBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(cfg.nf * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        mid_block_scale_factor=math.sqrt(2.0),
        act_fn="silu",
        attention_head_dim=None,
        norm_num_groups=None,
        norm_eps=1e-6,
        dropout=0.0,
    )


def build_unet(cfg: SDEConfig) -> torch.nn.Module:
    """A ``UNet2DModel`` with the NCSN++ architecture of ``cfg`` (random weights).

    Every GroupNorm is set to NCSN++'s min(C/4, 32) groups; the setting lives on the modules, not in the
    diffusers config, so the model must not be saved with ``save_pretrained`` and reloaded.
    """
    from diffusers import UNet2DModel

    try:
        # mypy resolves diffusers' top-level model names to the untyped placeholders it defines for a missing
        # torch; the object is the real model
        unet: torch.nn.Module = UNet2DModel(**unet_kwargs(cfg))  # type: ignore[no-untyped-call, assignment]
    except ValueError as err:
        # AttnSkipUpBlock2D builds its resnets' GroupNorms with 32 groups whatever their width
        raise ModelLoadError(
            f"diffusers cannot build this NCSN++ as a UNet2DModel ({err})",
            "attention levels need channel counts (and those of the next finer level) divisible by "
            "32, as in the released configs",
        ) from err
    for mod in unet.modules():
        if isinstance(mod, torch.nn.GroupNorm):
            mod.num_groups = min(mod.num_channels // 4, 32)
    return unet


# NCSN++ submodule → diffusers submodule, in NCSN++ registration order (which is parameters() order)
_RESNET = (
    ("GroupNorm_0", "norm1"),
    ("Conv_0", "conv1"),
    ("Dense_0", "time_emb_proj"),
    ("GroupNorm_1", "norm2"),
    ("Conv_1", "conv2"),
    ("Conv_2", "conv_shortcut"),
)
_ATTN = (("GroupNorm_0", "group_norm"), ("NIN_0", "to_q"), ("NIN_1", "to_k"), ("NIN_2", "to_v"), ("NIN_3", "to_out.0"))
_WB = (("weight", "weight", False), ("bias", "bias", False))
# NIN stores W as [in, out] and computes x W + b; nn.Linear stores [out, in]
_NIN = (("W", "weight", True), ("b", "bias", False))


def _params(kind: str) -> list[tuple[str, str, bool]]:
    """(NCSN++ parameter suffix, diffusers parameter suffix, transpose) of one NCSN++ module kind."""
    if kind == "fourier":
        return [("W", "weight", False)]
    if kind == "module":
        return list(_WB)
    if kind == "combine":
        return [(f"Conv_0.{o}", d, t) for o, d, t in _WB]
    if kind == "resnet":
        return [(f"{om}.{o}", f"{dm}.{d}", t) for om, dm in _RESNET for o, d, t in _WB]
    return [(f"{om}.{o}", f"{dm}.{d}", t) for om, dm in _ATTN for o, d, t in (_NIN if om.startswith("NIN") else _WB)]


def module_plan(cfg: SDEConfig) -> list[tuple[str, str]]:
    """``all_modules[i]`` of score_sde's ``NCSNpp`` as (kind, diffusers prefix), following ``NCSNpp.__init__``
    of the released code (the parameter-free FIR resampling of the image pyramids is not in the list).

    Kinds: ``fourier`` (Gaussian Fourier projection), ``module`` (Linear / Conv / GroupNorm), ``combine``
    (input-skip 1×1 conv), ``resnet`` (``ResnetBlockBigGANpp``), ``attn`` (``AttnBlockpp``).
    """
    levels = len(cfg.ch_mult)
    attn = [r in cfg.attn_resolutions for r in cfg.resolutions]
    plan: list[tuple[str, str]] = []
    if cfg.embedding_type == "fourier":
        plan.append(("fourier", "time_proj"))
    plan += [("module", "time_embedding.linear_1"), ("module", "time_embedding.linear_2"), ("module", "conv_in")]
    for i in range(levels):
        for j in range(cfg.num_res_blocks):
            plan.append(("resnet", f"down_blocks.{i}.resnets.{j}"))
            if attn[i]:
                plan.append(("attn", f"down_blocks.{i}.attentions.{j}"))
        if i != levels - 1:
            plan += [("resnet", f"down_blocks.{i}.resnet_down"), ("combine", f"down_blocks.{i}.skip_conv")]
    plan += [("resnet", "mid_block.resnets.0"), ("attn", "mid_block.attentions.0"), ("resnet", "mid_block.resnets.1")]
    for b, i in enumerate(reversed(range(levels))):
        plan += [("resnet", f"up_blocks.{b}.resnets.{j}") for j in range(cfg.num_res_blocks + 1)]
        if attn[i]:
            plan.append(("attn", f"up_blocks.{b}.attentions.0"))
        # the output-skip head of the finest level is UNet2DModel's output head
        norm, conv = (
            ("conv_norm_out", "conv_out") if i == 0 else (f"up_blocks.{b}.skip_norm", f"up_blocks.{b}.skip_conv")
        )
        plan += [("module", norm), ("module", conv)]
        if i != 0:
            plan.append(("resnet", f"up_blocks.{b}.resnet_up"))
    return plan


@dataclass(frozen=True)
class KeyPair:
    """One parameter: its NCSN++ name (without ``module.``), its diffusers name, and whether to transpose."""

    original: str
    diffusers: str
    transpose: bool = False


def key_map(cfg: SDEConfig, diffusers_keys: Iterable[str]) -> list[KeyPair]:
    """NCSN++ ↔ diffusers parameter names, in NCSN++ ``parameters()`` order.

    ``diffusers_keys`` are the state-dict keys of :func:`build_unet`'s model; a shortcut convolution
    (``Conv_2``) is mapped only where the block has one. Raises :class:`ModelLoadError` when the two
    architectures do not cover each other exactly.
    """
    keys = set(diffusers_keys)
    pairs: list[KeyPair] = []
    for index, (kind, prefix) in enumerate(module_plan(cfg)):
        for orig, diff, transpose in _params(kind):
            d = f"{prefix}.{diff}"
            if d in keys:
                pairs.append(KeyPair(f"all_modules.{index}.{orig}", d, transpose))
    uncovered = sorted(keys - {p.diffusers for p in pairs})
    if uncovered:
        raise ModelLoadError(
            f"the NCSN++ key map does not cover {len(uncovered)} UNet2DModel parameters (first: {uncovered[0]})",
            "this diffusers version builds Skip blocks differently; use the version named in the install requirements",
        )
    return pairs


def to_diffusers(state: Mapping[str, Tensor], pairs: list[KeyPair]) -> dict[str, Tensor]:
    """An NCSN++ state dict (no ``module.`` prefix) renamed to diffusers keys; every parameter must match."""
    wanted = {p.original for p in pairs}
    extra = sorted(k for k in state if k not in wanted and k != "sigmas")
    missing = sorted(wanted - set(state))
    if extra or missing:
        what = f"lacks {missing[0]}" if missing else f"has parameters the config does not build (first: {extra[0]})"
        raise ModelLoadError(
            f"the checkpoint {what}: it does not match the config",
            "check the config's ch_mult, num_res_blocks, attn_resolutions and image_size",
        )
    return {p.diffusers: (state[p.original].t() if p.transpose else state[p.original]) for p in pairs}


def to_unet2d(cfg: SDEConfig, state: Mapping[str, Tensor]) -> torch.nn.Module:
    """A ``UNet2DModel`` holding an NCSN++ state dict in score_sde's layout (``all_modules.{i}.*``, no
    ``module.``; e.g. the ``state_dict()`` of a network the adapter loaded).

    Fed σ, its output is the score, as the native network's. The group counts are set on the modules
    (see :func:`build_unet`): do not ``save_pretrained`` and reload it.
    """
    check_convertible(cfg)
    unet = build_unet(cfg)
    unet.load_state_dict(to_diffusers(state, key_map(cfg, unet.state_dict().keys())))
    return unet.eval()
