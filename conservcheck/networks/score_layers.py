"""Building blocks of the score_sde U-Nets (NCSN++, DDPM++ and DDPM; Song et al. 2021, appendix H).

Attribute names (``GroupNorm_0``, ``Conv_0``, ``Dense_0``, ``NIN_0``, ``W``/``b``, ...) and their order of
registration are those of score_sde_pytorch's checkpoints, so a checkpoint's state dict loads directly
and ``parameters()`` runs in the order of its EMA shadow list. Dropout is omitted: these networks are
only evaluated.

Conventions of the blocks:

* GroupNorm with ε = 1e-6 and a group count chosen by the network (NCSN++: min(C/4, 32); DDPM: 32).
* ``NIN`` is a 1×1 convolution stored as W [in, out] and b [out]: y = Σ_c x_c W_{c·} + b.
* Attention is single-head self-attention over all pixels, weights softmax(qᵀk/√C), with a residual
  connection (÷√2 with ``skip_rescale``). Written with matmul and softmax, so forward-mode AD and double
  backward work.
* Residual blocks add the projected time embedding after their first convolution; BigGAN blocks resample
  both branches inside the block (FIR or naive), DDPM blocks project the shortcut with a ``NIN``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conservcheck.networks import fir

Groups = Callable[[int], int]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "swish": nn.SiLU,
    "elu": nn.ELU,
    "relu": nn.ReLU,
    "lrelu": lambda: nn.LeakyReLU(negative_slope=0.2),
}


def ncsnpp_groups(channels: int) -> int:
    """NCSN++'s GroupNorm group count, min(C/4, 32)."""
    return min(channels // 4, 32)


def ddpm_groups(channels: int) -> int:
    """DDPM's GroupNorm group count: always 32."""
    return 32


def group_norm(channels: int, groups: Groups) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups(channels), num_channels=channels, eps=1e-6)


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=padding)


def conv1x1(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1)


def timestep_embedding(t: Tensor, dim: int, max_positions: float = 10000.0) -> Tensor:
    """Transformer sinusoids of a time label t [B]: [sin(t ω_j), cos(t ω_j)], ω_j = max_positions^(−j/(d/2 − 1)).

    Computed in float32 — as the networks were trained (score_sde and diffusers both do) — and returned in
    float32; an odd ``dim`` gets one zero column. Shape [B, dim].
    """
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(max_positions) / (half - 1))
    )
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class FourierProjection(nn.Module):
    """Gaussian Fourier features of a scalar: [sin(2π v W), cos(2π v W)] with fixed random W [size]."""

    def __init__(self, size: int, scale: float = 16.0) -> None:
        super().__init__()
        # a parameter without gradient, as in the checkpoints (it is not in their EMA shadow list)
        self.W = nn.Parameter(torch.randn(size) * scale, requires_grad=False)

    def forward(self, v: Tensor) -> Tensor:
        proj = v[:, None] * self.W[None, :] * (2 * math.pi)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


class NIN(nn.Module):
    """Per-pixel linear map over channels (a 1×1 convolution stored as W [in, out], b [out])."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(in_ch, out_ch) / math.sqrt(in_ch))
        self.b = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bchw,cd->bdhw", x, self.W) + self.b[None, :, None, None]


class Attention(nn.Module):
    """Single-head self-attention over the pixels of [B, C, H, W], with a residual connection."""

    def __init__(self, channels: int, groups: Groups, skip_rescale: bool = False) -> None:
        super().__init__()
        self.GroupNorm_0 = group_norm(channels, groups)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels)
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        normed = self.GroupNorm_0(x)
        q, k, v = (m(normed).reshape(b, c, h * w) for m in (self.NIN_0, self.NIN_1, self.NIN_2))
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * c**-0.5, dim=-1)  # [B, query, key]
        out: Tensor = self.NIN_3(torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w))
        return (x + out) / math.sqrt(2.0) if self.skip_rescale else x + out


class FIRConv2d(nn.Module):
    """A 3×3 convolution fused with FIR downsampling by 2 (one padding for both), plus a bias."""

    def __init__(self, in_ch: int, out_ch: int, taps: Sequence[float]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, 3, 3) / math.sqrt(9 * in_ch))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.taps = tuple(taps)

    def forward(self, x: Tensor) -> Tensor:
        return fir.conv_downsample_2d(x, self.weight, self.taps) + self.bias[None, :, None, None]


class Downsample(nn.Module):
    """Halve the resolution: FIR filter or 2×2 average, or a strided 3×3 convolution (FIR-fused with ``fir``;
    otherwise TensorFlow's 'SAME' padding: one extra row and column at the end)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int | None = None,
        with_conv: bool = False,
        fir_: bool = False,
        taps: Sequence[float] = (1, 3, 3, 1),
    ) -> None:
        super().__init__()
        out_ch = out_ch or in_ch
        if with_conv and fir_:
            self.Conv2d_0 = FIRConv2d(in_ch, out_ch, taps)
        elif with_conv:
            self.Conv_0 = conv3x3(in_ch, out_ch, stride=2, padding=0)
        self.with_conv, self.fir, self.taps = with_conv, fir_, tuple(taps)

    def forward(self, x: Tensor) -> Tensor:
        if self.with_conv:
            out: Tensor = self.Conv2d_0(x) if self.fir else self.Conv_0(F.pad(x, (0, 1, 0, 1)))
            return out
        return fir.downsample_2d(x, self.taps) if self.fir else F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    """Double the resolution: FIR filter, or nearest neighbour followed by an optional 3×3 convolution
    (the two that score_sde's code can run)."""

    def __init__(
        self, ch: int, with_conv: bool = False, fir_: bool = False, taps: Sequence[float] = (1, 3, 3, 1)
    ) -> None:
        super().__init__()
        if with_conv and fir_:
            raise ValueError("FIR up-convolution is not supported")
        if with_conv:
            self.Conv_0 = conv3x3(ch, ch)
        self.with_conv, self.fir, self.taps = with_conv, fir_, tuple(taps)

    def forward(self, x: Tensor) -> Tensor:
        if self.fir:
            return fir.upsample_2d(x, self.taps)
        h = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.Conv_0(h) if self.with_conv else h


class Combine(nn.Module):
    """Merge the input-image pyramid into the features: 1×1 convolution, then sum or concatenation."""

    def __init__(self, in_ch: int, out_ch: int, method: str = "sum") -> None:
        super().__init__()
        self.Conv_0 = conv1x1(in_ch, out_ch)
        self.method = method

    def forward(self, pyramid: Tensor, h: Tensor) -> Tensor:
        p = self.Conv_0(pyramid)
        return p + h if self.method == "sum" else torch.cat([p, h], dim=1)


class ResnetDDPM(nn.Module):
    """DDPM's residual block: norm, act, conv, + time projection, norm, act, conv; shortcut NIN if widths differ."""

    def __init__(
        self,
        act: nn.Module,
        in_ch: int,
        out_ch: int | None,
        temb_dim: int | None,
        groups: Groups,
        skip_rescale: bool = False,
    ) -> None:
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = group_norm(in_ch, groups)
        self.Conv_0 = conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = nn.Linear(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch, groups)
        self.Conv_1 = conv3x3(out_ch, out_ch)
        if in_ch != out_ch:
            self.NIN_0 = NIN(in_ch, out_ch)
        self.act, self.skip_rescale = act, skip_rescale

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h: Tensor = self.Conv_0(self.act(self.GroupNorm_0(x)))
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.act(self.GroupNorm_1(h)))
        skip: Tensor = self.NIN_0(x) if hasattr(self, "NIN_0") else x
        return (skip + h) / math.sqrt(2.0) if self.skip_rescale else skip + h


class ResnetBigGAN(nn.Module):
    """BigGAN's residual block, optionally resampling by 2 inside (both branches; FIR or naive), with a
    1×1 shortcut when the width changes or it resamples."""

    def __init__(
        self,
        act: nn.Module,
        in_ch: int,
        out_ch: int | None,
        temb_dim: int | None,
        groups: Groups,
        skip_rescale: bool = True,
        up: bool = False,
        down: bool = False,
        fir_: bool = False,
        taps: Sequence[float] = (1, 3, 3, 1),
    ) -> None:
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = group_norm(in_ch, groups)
        self.Conv_0 = conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = nn.Linear(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch, groups)
        self.Conv_1 = conv3x3(out_ch, out_ch)
        if in_ch != out_ch or up or down:
            self.Conv_2 = conv1x1(in_ch, out_ch)
        self.act, self.skip_rescale = act, skip_rescale
        self.up, self.down, self.fir, self.taps = up, down, fir_, tuple(taps)

    def _resample(self, x: Tensor) -> Tensor:
        if self.up:
            return fir.upsample_2d(x, self.taps) if self.fir else F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return fir.downsample_2d(x, self.taps) if self.fir else F.avg_pool2d(x, 2)
        return x

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h: Tensor = self.Conv_0(self._resample(self.act(self.GroupNorm_0(x))))
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.act(self.GroupNorm_1(h)))
        skip: Tensor = self.Conv_2(self._resample(x)) if hasattr(self, "Conv_2") else x
        return (skip + h) / math.sqrt(2.0) if self.skip_rescale else skip + h
