"""FIR resampling of images (StyleGAN2's ``upfirdn2d``, as used by NCSN++).

``upfirdn2d`` upsamples a batch of images [N, C, H, W] by inserting ``up − 1`` zeros after every pixel
(rows and columns), pads (a negative pad crops), convolves every channel with a 2-D kernel (a true
convolution: the kernel is flipped) and keeps every ``down``-th pixel. NCSN++ resamples by a factor 2 with
the separable kernel k ⊗ k / (Σk)², k = (1, 3, 3, 1) by default; upsampling multiplies it by 4 so a
constant image keeps its value.

Pure torch, differentiable to any order (forward and reverse mode); the kernel is built in the input's
dtype from its exact values (k/64 for (1, 3, 3, 1)), so float64 inputs stay float64 throughout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def kernel_2d(taps: Sequence[float], gain: float = 1.0, *, like: Tensor) -> Tensor:
    """The normalised 2-D kernel gain · (k ⊗ k) / (Σk)² of 1-D taps ``k`` (a 2-D ``k`` is only normalised),
    in ``like``'s dtype and device."""
    k = torch.as_tensor(taps, dtype=torch.float64)
    if k.ndim == 1:
        k = torch.outer(k, k)
    k = k / k.sum() * gain
    return k.to(dtype=like.dtype, device=like.device)


def upfirdn2d(x: Tensor, kernel: Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> Tensor:
    """Upsample by zero insertion, pad ``pad = (before, after)`` on both axes, convolve with ``kernel``,
    keep every ``down``-th pixel. x: [N, C, H, W]; kernel: [kh, kw]."""
    n, c, h, w = x.shape
    if up > 1:
        x = F.pad(x.reshape(n, c, h, 1, w, 1), (0, up - 1, 0, 0, 0, up - 1)).reshape(n, c, h * up, w * up)
    before, after = pad
    x = F.pad(x, (max(before, 0), max(after, 0), max(before, 0), max(after, 0)))
    if before < 0 or after < 0:
        x = x[..., max(-before, 0) : x.shape[-2] - max(-after, 0), max(-before, 0) : x.shape[-1] - max(-after, 0)]
    weight = torch.flip(kernel, (0, 1)).to(x.dtype)[None, None].expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, stride=down, groups=c)


def upsample_2d(x: Tensor, taps: Sequence[float] = (1, 3, 3, 1), factor: int = 2) -> Tensor:
    """Upsample [N, C, H, W] → [N, C, factor·H, factor·W] with the FIR filter ``taps``."""
    k = kernel_2d(taps, factor**2, like=x)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: Tensor, taps: Sequence[float] = (1, 3, 3, 1), factor: int = 2) -> Tensor:
    """Downsample [N, C, H, W] → [N, C, H/factor, W/factor] with the FIR filter ``taps``."""
    k = kernel_2d(taps, like=x)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def conv_downsample_2d(x: Tensor, weight: Tensor, taps: Sequence[float] = (1, 3, 3, 1), factor: int = 2) -> Tensor:
    """FIR-filter then convolve with ``weight`` [out, in, k, k] at stride ``factor`` (one padding for both)."""
    k = kernel_2d(taps, like=x)
    p = (k.shape[0] - factor) + (weight.shape[-1] - 1)
    return F.conv2d(upfirdn2d(x, k, pad=((p + 1) // 2, p // 2)), weight, stride=factor)
