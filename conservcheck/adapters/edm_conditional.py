"""Class-conditional EDM networks (NVlabs/edm's ``EDMPrecond`` & co. with ``label_dim`` > 0).

EDM's preconditioned networks take ``class_labels`` as one-hot rows [B, label_dim] (float); fed
``class_labels=None`` they use a row of zeros, which is the unconditional input a network trained with
``label_dropout`` learned (EDM's own sampler does not guide; without label dropout the zero row is an
input the network never saw, and the guided field is what the network happens to compute there).

The condition is the class label y ∈ {0, …, label_dim − 1}: the network is fed the one-hot row of y;
``class_label`` is one label, a list (sample i gets label i mod K) or ``"random"`` (a seeded draw per
sample). The field at guidance scale w is D_∅ + w (D_y − D_∅) in score units (s = (D − x)/σ² is affine in
D, :mod:`conservcheck.conditioning`). Units, trust and loading are those of :mod:`conservcheck.adapters.edm`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from conservcheck.conditioning import ConditionalField, class_conditioning
from conservcheck.parameterization import conversion
from conservcheck.probe import ProbeInfo, VectorFieldProbe
from conservcheck.process import TimeConvention, VEProcess


class LabelledDenoiser(torch.nn.Module):
    """``network(x, σ, class_labels)`` of a preconditioned EDM network D(x; σ, y), y one-hot [B, label_dim]."""

    def __init__(self, denoiser: Callable[..., Tensor]) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor) -> Tensor:
        return self.denoiser(x, sigma, class_labels=class_labels, force_fp32=True)


def wrap(
    net: Callable[..., Tensor],
    *,
    label_dim: int,
    class_label: int | Sequence[int] | str | None,
    sample_shape: tuple[int, ...],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    data_range: tuple[float, float] = (-1.0, 1.0),
    precision: str | None = "fp32",
    info: ProbeInfo | None = None,
) -> VectorFieldProbe:
    """A conditional probe for a class-conditional EDM denoiser ``net(x, σ, class_labels=…, force_fp32=…)``."""
    conditioning, labels = class_conditioning(class_label, int(label_dim), "zeros", "a row of zeros (no class)")
    one_hot = torch.nn.functional.one_hot(labels, int(label_dim)).to(torch.float32)
    field = ConditionalField(
        LabelledDenoiser(net),
        {"class_labels": one_hot},
        {"class_labels": torch.zeros(1, int(label_dim))},
        conditioning,
    ).to(device)
    info = info if info is not None else ProbeInfo(name=type(net).__name__, adapter="edm")
    extra: dict[str, Any] = {
        "family": "edm",
        "native_time": "sigma (noise standard deviation; x = y + sigma n)",
        "output": "denoised D(x; sigma, y)",
        "data_range": list(data_range),
        "conversion": conversion("x0", alpha="1").replace("x0_hat", "D(x; sigma)"),
        "condition_input": f"class_labels: one-hot rows [B, {int(label_dim)}]; unconditional: zeros",
        "guidance": "D_uncond + w (D_cond - D_uncond), one doubled batch",
    }
    for k, v in extra.items():
        info.extra.setdefault(k, v)
    return VectorFieldProbe(
        field,
        process=VEProcess(),
        sample_shape=sample_shape,
        parameterization="x0",
        time_convention=TimeConvention(),
        data_range=data_range,
        device=device,
        dtype=dtype,
        precision=precision,
        info=info,
    )


__all__ = ["LabelledDenoiser", "wrap"]
