"""The DDPM U-Net of Ho et al. (2020) as score_sde trains it (its ``model.name = "ddpm"`` configs).

Sinusoidal time embedding through two dense layers; per resolution ``num_res_blocks`` DDPM residual
blocks (GroupNorm with 32 groups, a ``NIN`` shortcut when the width changes), attention after each at the
resolutions in ``attn_resolutions``; strided-convolution (or average-pool) downsampling, a middle
resnet–attention–resnet, and on the way up ``num_res_blocks + 1`` blocks per resolution with *one*
attention after them (score_sde's version; Ho et al.'s attends after every block) and nearest-neighbour
upsampling with a convolution. Data in [0, 1] is mapped to [−1, 1] unless ``centered``; the output is
divided by ``sigmas[label]`` with ``scale_by_sigma`` (discrete VE training).

The module list ``all_modules`` and the buffer ``sigmas`` are laid out as in score_sde's checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from conservcheck.networks.ncsnpp import sigma_table
from conservcheck.networks.score_layers import (
    ACTIVATIONS,
    Attention,
    Downsample,
    ResnetDDPM,
    Upsample,
    conv3x3,
    ddpm_groups,
    group_norm,
    timestep_embedding,
)


class DDPMUNet(nn.Module):
    """score_sde's DDPM: ``forward(x, labels)`` → [B, C, H, W] (module doc)."""

    sigmas: Tensor

    def __init__(
        self,
        *,
        image_size: int,
        num_channels: int = 3,
        centered: bool = True,
        nf: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        resamp_with_conv: bool = True,
        nonlinearity: str = "swish",
        scale_by_sigma: bool = False,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        num_scales: int = 1000,
    ) -> None:
        super().__init__()
        self.register_buffer("sigmas", sigma_table(sigma_min, sigma_max, num_scales))
        self.nf, self.levels, self.num_res_blocks = nf, len(ch_mult), num_res_blocks
        self.centered, self.scale_by_sigma = centered, scale_by_sigma
        self.attn = [image_size // 2**i in attn_resolutions for i in range(self.levels)]
        self.act = act = ACTIVATIONS[nonlinearity.lower()]()

        def resnet(in_ch: int, out_ch: int | None = None) -> nn.Module:
            return ResnetDDPM(act, in_ch, out_ch, 4 * nf, ddpm_groups)

        mods: list[nn.Module] = [nn.Linear(nf, 4 * nf), nn.Linear(4 * nf, 4 * nf), conv3x3(num_channels, nf)]
        skips, ch = [nf], nf
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                mods.append(resnet(ch, nf * mult))
                ch = nf * mult
                if self.attn[level]:
                    mods.append(Attention(ch, ddpm_groups))
                skips.append(ch)
            if level != self.levels - 1:
                mods.append(Downsample(ch, with_conv=resamp_with_conv))
                skips.append(ch)
        mods += [resnet(ch), Attention(ch, ddpm_groups), resnet(ch)]
        for level in reversed(range(self.levels)):
            for _ in range(num_res_blocks + 1):
                mods.append(resnet(ch + skips.pop(), nf * ch_mult[level]))
                ch = nf * ch_mult[level]
            if self.attn[level]:
                mods.append(Attention(ch, ddpm_groups))
            if level != 0:
                mods.append(Upsample(ch, with_conv=resamp_with_conv))
        mods += [group_norm(ch, ddpm_groups), conv3x3(ch, num_channels)]
        self.all_modules = nn.ModuleList(mods)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        """x: [B, C, H, W]; labels: [B] time labels (999·s for continuous VP, the index k for discrete)."""
        layer = iter(self.all_modules)
        dense_0, dense_1 = next(layer), next(layer)
        temb = dense_1(self.act(dense_0(timestep_embedding(labels, self.nf).to(x.dtype))))
        h = x if self.centered else 2 * x - 1
        hs = [next(layer)(h)]
        for level in range(self.levels):
            for _ in range(self.num_res_blocks):
                h = next(layer)(hs[-1], temb)
                if self.attn[level]:
                    h = next(layer)(h)
                hs.append(h)
            if level != self.levels - 1:
                hs.append(next(layer)(hs[-1]))
        h = next(layer)(hs[-1], temb)
        h = next(layer)(h)
        h = next(layer)(h, temb)
        for level in reversed(range(self.levels)):
            for _ in range(self.num_res_blocks + 1):
                h = next(layer)(torch.cat([h, hs.pop()], dim=1), temb)
            if self.attn[level]:
                h = next(layer)(h)
            if level != 0:
                h = next(layer)(h)
        norm, conv = next(layer), next(layer)
        out: Tensor = conv(self.act(norm(h)))
        if self.scale_by_sigma:
            out = out / self.sigmas[labels.long()].to(out.dtype).reshape(-1, *([1] * (out.ndim - 1)))
        return out
