"""NCSN++ and DDPM++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs", appendix H).

One U-Net family, configured like score_sde's ``model`` config section:

* time embedding: Gaussian Fourier features of log σ (``embedding_type="fourier"``, continuous VE) or
  transformer sinusoids of the time label (``"positional"``), then two dense layers (``conditional``);
* ``num_res_blocks`` residual blocks per resolution (``resblock_type="biggan"``: BigGAN blocks that also
  do the resampling; ``"ddpm"``: DDPM blocks with separate resampling layers), attention at the
  resolutions in ``attn_resolutions``, residual sums divided by √2 with ``skip_rescale``;
* ``progressive_input``: how the input image enters the coarser levels — ``"none"``, ``"input_skip"``
  (an image pyramid merged by a 1×1 convolution, ``progressive_combine`` sum or cat) or ``"residual"``
  (a pyramid of features, resampled by strided convolutions and averaged into the main path);
* ``progressive``: how the output leaves — ``"none"`` (one head at the finest level) or ``"output_skip"``
  (a head per level, upsampled and summed);
* FIR resampling with ``fir_kernel`` (``fir``) or naive/strided resampling;
* data in [0, 1] is mapped to [−1, 1] inside unless ``centered``;
* the output is divided by σ with ``scale_by_sigma`` (σ is the fed time for a Fourier embedding, else
  the ``sigmas`` table entry of the integer label).

NCSN++ is ``progressive_input="input_skip"`` / ``"residual"`` with FIR; DDPM++ is ``"none"`` / ``"none"``
without FIR. The module list ``all_modules`` holds the layers in the order score_sde builds them, and the
buffer ``sigmas`` comes first, so a score_sde checkpoint's state dict (without the ``module.`` prefix of
``DataParallel``) loads with ``load_state_dict``; :func:`check_supported` names the settings this
implementation does not cover: those that need score_sde's upsampling layer, which cannot run in PyTorch
(``progressive="residual"``, non-FIR output skips, DDPM blocks unless FIR without convolution), so no
checkpoint of them can have been trained with score_sde's code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conservcheck.networks import fir
from conservcheck.networks.score_layers import (
    ACTIVATIONS,
    Attention,
    Combine,
    Downsample,
    FourierProjection,
    ResnetBigGAN,
    ResnetDDPM,
    Upsample,
    conv3x3,
    group_norm,
    ncsnpp_groups,
    timestep_embedding,
)

PROGRESSIVE = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")


def sigma_table(sigma_min: float, sigma_max: float, num_scales: int) -> Tensor:
    """score_sde's noise levels, geometric from σ_max down to σ_min: [num_scales] float64."""
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), num_scales, dtype=torch.float64))


def check_supported(
    *,
    resblock_type: str,
    progressive: str,
    progressive_input: str,
    progressive_combine: str,
    embedding_type: str,
    nonlinearity: str,
    fir: bool,
    resamp_with_conv: bool,
) -> str | None:
    """Why this NCSN++ configuration cannot be built (None when it can)."""
    choices = {
        "resblock_type": (resblock_type, ("biggan", "ddpm")),
        "progressive": (progressive, PROGRESSIVE),
        "progressive_input": (progressive_input, PROGRESSIVE_INPUT),
        "progressive_combine": (progressive_combine, ("sum", "cat")),
        "embedding_type": (embedding_type, ("fourier", "positional")),
        "nonlinearity": (nonlinearity, tuple(ACTIVATIONS)),
    }
    for name, (value, allowed) in choices.items():
        if value.lower() not in allowed:
            return f"{name}={value!r} is not one of {', '.join(allowed)}"
    # score_sde's own upsampling layer cannot run in PyTorch without FIR (F.interpolate is given both a
    # size and a scale factor) nor as a FIR up-convolution (its weight is flipped with a negative slice
    # step): networks that need it were never trained with score_sde's code, and are refused
    up_layer = {
        "progressive='residual'": progressive.lower() == "residual",
        "progressive='output_skip' without fir": progressive.lower() == "output_skip" and not fir,
        "resblock_type='ddpm' with resamp_with_conv or without fir": resblock_type.lower() == "ddpm"
        and (resamp_with_conv or not fir),
    }
    for setting, needed in up_layer.items():
        if needed:
            return f"{setting}, which needs an upsampling layer score_sde's code cannot run"
    return None


class NCSNpp(nn.Module):
    """NCSN++ / DDPM++: ``forward(x, time_cond)`` → [B, C, H, W] (module doc; names follow score_sde's config)."""

    sigmas: Tensor

    def __init__(
        self,
        *,
        image_size: int,
        num_channels: int = 3,
        centered: bool = False,
        nf: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        conditional: bool = True,
        resblock_type: str = "biggan",
        progressive: str = "none",
        progressive_input: str = "residual",
        progressive_combine: str = "sum",
        fir: bool = True,
        fir_kernel: Sequence[int] = (1, 3, 3, 1),
        skip_rescale: bool = True,
        resamp_with_conv: bool = True,
        embedding_type: str = "fourier",
        fourier_scale: float = 16.0,
        nonlinearity: str = "swish",
        scale_by_sigma: bool = True,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        num_scales: int = 1000,
    ) -> None:
        super().__init__()
        problem = check_supported(
            resblock_type=resblock_type,
            progressive=progressive,
            progressive_input=progressive_input,
            progressive_combine=progressive_combine,
            embedding_type=embedding_type,
            nonlinearity=nonlinearity,
            fir=fir,
            resamp_with_conv=resamp_with_conv,
        )
        if problem:
            raise ValueError(problem)
        self.register_buffer("sigmas", sigma_table(sigma_min, sigma_max, num_scales))
        self.nf, self.levels, self.num_res_blocks = nf, len(ch_mult), num_res_blocks
        self.centered, self.conditional, self.scale_by_sigma = centered, conditional, scale_by_sigma
        self.biggan = resblock_type.lower() == "biggan"
        self.progressive, self.progressive_input = progressive.lower(), progressive_input.lower()
        self.fourier = embedding_type.lower() == "fourier"
        self.fir, self.taps, self.skip_rescale = fir, tuple(fir_kernel), skip_rescale
        self.attn = [image_size // 2**i in attn_resolutions for i in range(self.levels)]
        self.act = act = ACTIVATIONS[nonlinearity.lower()]()
        temb_dim = 4 * nf  # the blocks own their time projection even when unconditional (then unused)

        def resnet(in_ch: int, out_ch: int | None = None, up: bool = False, down: bool = False) -> nn.Module:
            if self.biggan:
                return ResnetBigGAN(
                    act, in_ch, out_ch, temb_dim, ncsnpp_groups, skip_rescale, up, down, fir, fir_kernel
                )
            return ResnetDDPM(act, in_ch, out_ch, temb_dim, ncsnpp_groups, skip_rescale)

        def attention(ch: int) -> nn.Module:
            return Attention(ch, ncsnpp_groups, skip_rescale)

        mods: list[nn.Module] = []
        if self.fourier:
            mods.append(FourierProjection(nf, fourier_scale))
        if conditional:
            mods += [nn.Linear(2 * nf if self.fourier else nf, 4 * nf), nn.Linear(4 * nf, 4 * nf)]
        mods.append(conv3x3(num_channels, nf))
        skips, ch, pyramid_ch = [nf], nf, num_channels
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                mods.append(resnet(ch, nf * mult))
                ch = nf * mult
                if self.attn[level]:
                    mods.append(attention(ch))
                skips.append(ch)
            if level == self.levels - 1:
                continue
            mods.append(
                resnet(ch, down=True)
                if self.biggan
                else Downsample(ch, with_conv=resamp_with_conv, fir_=fir, taps=fir_kernel)
            )
            if self.progressive_input == "input_skip":
                mods.append(Combine(pyramid_ch, ch, progressive_combine.lower()))
                ch = 2 * ch if progressive_combine.lower() == "cat" else ch
            elif self.progressive_input == "residual":
                mods.append(Downsample(pyramid_ch, ch, with_conv=True, fir_=fir, taps=fir_kernel))
                pyramid_ch = ch
            skips.append(ch)
        mods += [resnet(ch), attention(ch), resnet(ch)]
        for level in reversed(range(self.levels)):
            for _ in range(num_res_blocks + 1):
                mods.append(resnet(ch + skips.pop(), nf * ch_mult[level]))
                ch = nf * ch_mult[level]
            if self.attn[level]:
                mods.append(attention(ch))
            if self.progressive == "output_skip":
                mods += [group_norm(ch, ncsnpp_groups), conv3x3(ch, num_channels)]
            if level != 0:
                mods.append(
                    resnet(ch, up=True)
                    if self.biggan
                    else Upsample(ch, with_conv=resamp_with_conv, fir_=fir, taps=fir_kernel)
                )
        if self.progressive != "output_skip":
            mods += [group_norm(ch, ncsnpp_groups), conv3x3(ch, num_channels)]
        self.all_modules = nn.ModuleList(mods)

    def _merge(self, a: Tensor, b: Tensor) -> Tensor:
        return (a + b) / math.sqrt(2.0) if self.skip_rescale else a + b

    def _pyramid_down(self, x: Tensor) -> Tensor:
        return fir.downsample_2d(x, self.taps) if self.fir else F.avg_pool2d(x, 2)

    def forward(self, x: Tensor, time_cond: Tensor) -> Tensor:
        """x: [B, C, H, W]; time_cond: [B] — σ for a Fourier embedding, else the time label (the
        ``sigmas`` index when ``scale_by_sigma``)."""
        layer = iter(self.all_modules)
        if self.fourier:
            temb = next(layer)(torch.log(time_cond))
        else:
            temb = timestep_embedding(time_cond, self.nf).to(x.dtype)
        if self.conditional:
            dense_0, dense_1 = next(layer), next(layer)
            temb = dense_1(self.act(dense_0(temb)))
        else:
            temb = None
        if not self.centered:
            x = 2 * x - 1
        pyramid = x
        hs = [next(layer)(x)]
        for level in range(self.levels):
            for _ in range(self.num_res_blocks):
                h = next(layer)(hs[-1], temb)
                if self.attn[level]:
                    h = next(layer)(h)
                hs.append(h)
            if level == self.levels - 1:
                continue
            down = next(layer)
            h = down(hs[-1], temb) if self.biggan else down(hs[-1])
            if self.progressive_input == "input_skip":
                pyramid = self._pyramid_down(pyramid)
                h = next(layer)(pyramid, h)
            elif self.progressive_input == "residual":
                pyramid = self._merge(next(layer)(pyramid), h)
                h = pyramid
            hs.append(h)
        h = next(layer)(hs[-1], temb)
        h = next(layer)(h)
        h = next(layer)(h, temb)
        out = None
        for level in reversed(range(self.levels)):
            for _ in range(self.num_res_blocks + 1):
                h = next(layer)(torch.cat([h, hs.pop()], dim=1), temb)
            if self.attn[level]:
                h = next(layer)(h)
            if self.progressive == "output_skip":
                norm, conv = next(layer), next(layer)
                head = conv(self.act(norm(h)))
                out = head if out is None else fir.upsample_2d(out, self.taps) + head
            if level != 0:
                up = next(layer)
                h = up(h, temb) if self.biggan else up(h)
        if self.progressive == "output_skip":
            assert out is not None, "every level of output_skip adds a head"
            result: Tensor = out
        else:
            norm, conv = next(layer), next(layer)
            result = conv(self.act(norm(h)))
        if self.scale_by_sigma:
            sigma = time_cond if self.fourier else self.sigmas[time_cond.long()]
            result = result / sigma.to(result.dtype).reshape(-1, *([1] * (result.ndim - 1)))
        return result
