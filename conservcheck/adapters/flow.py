"""Flow-matching / rectified-flow velocity models: x_t = (1 − t) x0 + t ε, v = ε − x0.

The network predicts the velocity v̂ ≈ E[ε − x0 | x_t] of the straight path. With :class:`FlowProcess`
(α = 1 − t, σ = t) and the ``velocity`` parameterization the probe converts it exactly:
ε̂ = x + (1 − t) v̂ and s = −ε̂/t (x̂0 = x − t v̂).

Two sources:

* **a diffusers folder** — a ``UNet2DModel`` with a ``FlowMatchEulerDiscreteScheduler`` or
  ``FlowMatchHeunDiscreteScheduler`` config (pipeline folder with ``unet/`` and ``scheduler/``, or a bare
  UNet folder with ``scheduler_config.json``). These schedulers noise as σ ε + (1 − σ) x0
  (``scale_noise``), feed the network ``timestep = σ · num_train_timesteps`` and step with
  x ← x + (σ_next − σ) v̂, so t = σ and native time is ``num_train_timesteps`` · t. ``shift`` and dynamic
  shifting only choose which σ the sampler visits; they do not change this map. ``invert_sigmas`` (a
  reversed convention) is refused. The UNet gets the diffusers adapter's hygiene (classic attention,
  frozen, contiguous GroupNorm inputs).
* **a plain callable** ``fn(x, native_time)`` through :func:`wrap`, with ``time_scale`` (native = scale
  · t) and ``convention``: ``"noise_at_1"`` (the above; diffusers, SD3) or ``"data_at_1"`` (x_τ = τ x0 +
  (1 − τ) ε with the network predicting x0 − ε, as in Liu et al.'s rectified flow and torchcfm; then
  τ = 1 − t and v̂ = −output).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from conservcheck.adapters._diffusers import (
    UNetField,
    check_options,
    is_flow_matching,
    layout,
    load_unet,
    model_config,
    read_json,
    read_scheduler_config,
    sample_shape,
)
from conservcheck.errors import ModelLoadError, UsageError
from conservcheck.parameterization import conversion
from conservcheck.probe import ProbeInfo, VectorFieldProbe
from conservcheck.process import FlowProcess, TimeConvention

NAME = "flow"

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
CONVENTIONS = ("noise_at_1", "data_at_1")
_OPTIONS = ("precision", "variant")


class AffineTime(TimeConvention):
    """Native time = offset + scale · t (e.g. diffusers' ``timestep`` = 1000 · t; τ = 1 − t)."""

    name = "affine"

    def __init__(self, scale: float = 1.0, offset: float = 0.0) -> None:
        if scale == 0:
            raise UsageError("a time scale of 0 maps every time to the same native time", "pass a nonzero time_scale")
        self.scale, self.offset = float(scale), float(offset)

    def to_canonical(self, native: Tensor) -> Tensor:
        return (torch.as_tensor(native, dtype=torch.float64) - self.offset) / self.scale

    def from_canonical(self, t: Tensor) -> Tensor:
        return self.offset + self.scale * torch.as_tensor(t, dtype=torch.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "scale": self.scale, "offset": self.offset}


class Negated(torch.nn.Module):
    """``−fn(x, τ)``: a data-at-1 network predicts x0 − ε = −v."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return -self.fn(x, t)


def wrap(
    fn: Callable[[Tensor, Tensor], Tensor],
    *,
    sample_shape: tuple[int, ...],
    time_scale: float = 1.0,
    convention: str = "noise_at_1",
    data_range: tuple[float, float] = (-1.0, 1.0),
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    precision: str | None = None,
    info: ProbeInfo | None = None,
) -> VectorFieldProbe:
    """A probe for a velocity network ``fn(x, native_time)``.

    ``convention="noise_at_1"``: x_t = (1 − t) x0 + t ε, fn is fed ``time_scale`` · t and predicts ε − x0.
    ``convention="data_at_1"``: x_τ = τ x0 + (1 − τ) ε, fn is fed ``time_scale`` · τ and predicts x0 − ε.
    """
    if convention not in CONVENTIONS:
        raise UsageError(f"unknown flow convention {convention!r}", f"use one of {', '.join(CONVENTIONS)}")
    data_at_1 = convention == "data_at_1"
    # τ = 1 − t: native = scale · (1 − t)
    time = AffineTime(-time_scale, time_scale) if data_at_1 else AffineTime(time_scale)
    info = info if info is not None else ProbeInfo(name=type(fn).__name__, adapter=NAME)
    info.extra.setdefault("family", "flow")
    info.extra.setdefault("convention", convention)
    info.extra.setdefault("native_time", f"{time_scale:g} * (1 - t)" if data_at_1 else f"{time_scale:g} * t")
    info.extra.setdefault("output", "velocity x0 - eps (negated)" if data_at_1 else "velocity eps - x0")
    info.extra.setdefault("data_range", list(data_range))
    info.extra.setdefault("conversion", conversion("velocity", "flow"))
    return VectorFieldProbe(
        Negated(fn) if data_at_1 else fn,
        process=FlowProcess(),
        sample_shape=sample_shape,
        parameterization="velocity",
        time_convention=time,
        data_range=data_range,
        device=device,
        dtype=dtype,
        precision=precision,
        info=info,
    )


def scheduler_time_scale(config: dict[str, Any], source: str = "the scheduler config") -> float:
    """``num_train_timesteps`` of a flow-matching scheduler config (native time = that × t).

    Raises :class:`ModelLoadError` for another scheduler class or ``invert_sigmas``.
    """
    name = str(config.get("_class_name"))
    if name not in FLOW_SCHEDULERS:
        raise ModelLoadError(
            f"unsupported flow scheduler {name!r} in {source}", f"supported: {', '.join(FLOW_SCHEDULERS)}"
        )
    if config.get("invert_sigmas"):
        raise ModelLoadError(
            f"{source} sets invert_sigmas: the network's time runs the other way",
            "wrap the network with conservcheck.adapters.flow.wrap(..., convention='data_at_1')",
        )
    return float(config.get("num_train_timesteps", 1000))


def detect(path: pathlib.Path) -> bool:
    """A diffusers UNet2DModel folder (pipeline or bare) whose scheduler is a flow-matching one, with no
    autoencoder."""
    lay = layout(pathlib.Path(path))
    if lay is None or lay.scheduler_config is None or lay.autoencoder is not None:
        return False
    return is_flow_matching(read_json(lay.scheduler_config))


def load(
    path: pathlib.Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    **options: Any,
) -> VectorFieldProbe:
    """A probe for a diffusers flow-matching UNet2DModel folder.

    Options: ``precision`` (see :mod:`conservcheck.precision`), ``variant`` (weights variant).
    """
    check_options(options, _OPTIONS)
    path = pathlib.Path(path)
    lay = layout(path)
    if lay is None:
        raise ModelLoadError(
            f"{path} is not a diffusers UNet2DModel folder with a scheduler",
            "expected unet/ and scheduler/ (or config.json with scheduler_config.json)",
        )
    sched = read_scheduler_config(lay)
    scale = scheduler_time_scale(sched, str(lay.scheduler_config))
    loaded = load_unet(
        lay, device=device, dtype=dtype, trust_remote_code=trust_remote_code, variant=options.get("variant")
    )
    info = ProbeInfo(
        name=path.name,
        adapter=NAME,
        reference=str(path),
        weights_sha256=loaded.sha256,
        trust_remote_code=bool(trust_remote_code),
        extra={
            "scheduler": sched.get("_class_name"),
            "native_time": f"timestep = sigma * {scale:g}, float tensor [B] (t = sigma)",
            "native_range": [0.0, scale],
            "shift": sched.get("shift", 1.0),
            "use_dynamic_shifting": bool(sched.get("use_dynamic_shifting", False)),
            **loaded.provenance(),
        },
    )
    return wrap(
        UNetField(loaded.unet),
        sample_shape=sample_shape(model_config(loaded.unet)),
        time_scale=scale,
        data_range=loaded.data_range,
        device=device,
        dtype=dtype,
        precision=options.get("precision"),
        info=info,
    )
