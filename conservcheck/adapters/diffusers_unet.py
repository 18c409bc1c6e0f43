"""diffusers pixel-space models: a ``UNet2DModel`` plus the scheduler it was trained with.

Two families, told apart by the scheduler's class in the saved config:

* **DDPM** (``DDPMScheduler``, ``DDIMScheduler``, ``PNDMScheduler``; any beta schedule) — x_k = √ᾱ_k x0 +
  √(1 − ᾱ_k) ε at the integer index k. The probe uses the paper's :class:`OUProcess` observed at
  t_k = −½ log ᾱ_k (:class:`DiscreteSchedule` built from the scheduler's own ``alphas_cumprod``); the
  UNet is fed k as a float tensor [B]. ``prediction_type`` epsilon / sample / v_prediction becomes the
  parameterization epsilon / x0 / v: s = −ε̂/√(1−ᾱ_k), s = (√ᾱ_k x̂0 − x)/(1−ᾱ_k),
  s = −x − √(ᾱ_k/(1−ᾱ_k)) v̂.
* **NCSN++ VE** (``ScoreSdeVeScheduler``, e.g. google/ncsnpp-celebahq-256) — x_σ = x0 + σ ε. The UNet is
  fed σ itself as a float tensor [B] (a Python float would be truncated to an integer inside
  ``UNet2DModel.forward``); with ``time_embedding_type="fourier"`` it takes log σ internally and divides
  its output by σ, so the output already is the score. Canonical time is σ (:class:`VEProcess`).

Data range: [0, 1] when the UNet has ``center_input_sample`` (it maps [0, 1] to [−1, 1] itself), else
[−1, 1].

Hygiene applied to every loaded UNet (outputs unchanged): ``eval()``, parameters frozen, every
``Attention`` module switched to the classic ``AttnProcessor`` (bmm + softmax; the default fused SDPA has
no forward-mode AD on CPU and no double backward on CUDA's memory-efficient kernel), softmax up-casting
disabled in float64 (it would round a float64 model's attention to float32), and GroupNorm inputs made
contiguous (forward-mode AD otherwise fails on a non-contiguous tangent: "view size is not compatible").

The adapter never runs code from the model folder: it builds ``UNet2DModel`` and the scheduler by name
from diffusers, loads safetensors when present and pickled ``.bin`` weights only through
``torch.load(weights_only=True)``; pickles that need more are loaded only with ``trust_remote_code=True``.
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch

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
    scheduler_units,
)
from conservcheck.adapters.hub import snapshot_of
from conservcheck.errors import ModelLoadError
from conservcheck.probe import ProbeInfo, VectorFieldProbe

NAME = "diffusers"

#: σ_max of score_sde's training configs (score_sde_pytorch, configs/ve/) for the NCSN++ checkpoints the Hub
#: publishes in diffusers form: hub id → (σ_max, config file).
TRAINING_SIGMA_MAX: dict[str, tuple[float, str]] = {
    "google/ncsnpp-celebahq-256": (348.0, "configs/ve/celebahq_256_ncsnpp_continuous.py"),
    "google/ncsnpp-ffhq-256": (348.0, "configs/ve/ffhq_256_ncsnpp_continuous.py"),
    "google/ncsnpp-church-256": (380.0, "configs/ve/church_ncsnpp_continuous.py"),
    "google/ncsnpp-ffhq-1024": (1348.0, "configs/ve/ffhq_ncsnpp_continuous.py"),
}


def detect(path: pathlib.Path) -> bool:
    """A diffusers folder with a ``UNet2DModel`` and no autoencoder (:func:`~._diffusers.layout`: pipeline with
    subfolders or flat, or a bare UNet folder) — unless its scheduler is a flow-matching one."""
    lay = layout(pathlib.Path(path))
    if lay is None or lay.autoencoder is not None:
        return False
    return not (lay.scheduler_config and is_flow_matching(read_json(lay.scheduler_config)))


def training_sigma_max(path: pathlib.Path, scheduler_sigma_max: float) -> dict[str, Any]:
    """The report fields saying which σ_max a VE model's range uses, and why.

    For the NCSN++ checkpoints the Hub publishes in diffusers form (recognised by their hub-cache folder),
    the σ_max of score_sde's training config: the network only saw σ up to it. Their scheduler configs can
    say otherwise (google/ncsnpp-celebahq-256: 380 against the training config's 348); that value only sets
    where ``ScoreSdeVePipeline`` starts sampling and is recorded as ``scheduler_sigma_max``. For other
    folders, the scheduler config's value.
    """
    repo = (snapshot_of(path) or (None, None))[0]
    known = TRAINING_SIGMA_MAX.get(repo or "")
    if known is None:
        return {"sigma_max": scheduler_sigma_max, "sigma_max_source": "scheduler config"}
    value, config = known
    agree = "agrees with" if value == scheduler_sigma_max else "differs from"
    return {
        "sigma_max": value,
        "sigma_max_source": (
            f"score_sde training config {config}: the network was trained on sigma <= {value:g}; the scheduler "
            f"config's sigma_max {scheduler_sigma_max:g} {agree} it and only sets where ScoreSdeVePipeline "
            "starts sampling"
        ),
        "scheduler_sigma_max": scheduler_sigma_max,
    }


def load(
    path: pathlib.Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    **options: Any,
) -> VectorFieldProbe:
    """A probe for a diffusers pixel-space UNet2DModel folder (pipeline or bare UNet).

    Options: ``precision`` (forward-pass mode, see :mod:`conservcheck.precision`), ``variant`` (weights
    variant such as ``fp16``).
    """
    check_options(options)
    path = pathlib.Path(path)
    lay = layout(path)
    if lay is None:
        raise ModelLoadError(
            f"{path} is not a diffusers UNet2DModel folder",
            "expected model_index.json naming a unet (in unet/ or at the root), or a UNet2DModel config.json",
        )
    sched_cfg = read_scheduler_config(lay)
    units = scheduler_units(sched_cfg, str(lay.scheduler_config))
    loaded = load_unet(
        lay, device=device, dtype=dtype, trust_remote_code=trust_remote_code, variant=options.get("variant")
    )
    if units.family == "ncsnpp_ve":
        sigmas = training_sigma_max(path, float(units.extra["sigma_max"]))
        units.extra.update(sigmas, native_range=[units.extra["native_range"][0], sigmas["sigma_max"]])
    unet, data_range = loaded.unet, loaded.data_range
    unet_config = model_config(unet)
    shape = sample_shape(unet_config)
    channels = shape[0] if units.learned_variance and unet_config.out_channels == 2 * shape[0] else None
    info = ProbeInfo(
        name=path.name,
        adapter=NAME,
        reference=str(path),
        weights_sha256=loaded.sha256,
        trust_remote_code=bool(trust_remote_code),
        extra={"family": units.family, **units.extra, "data_range": list(data_range), **loaded.provenance()},
    )
    return VectorFieldProbe(
        UNetField(unet, channels),
        process=units.process,
        sample_shape=shape,
        parameterization=units.parameterization,
        time_convention=units.time_convention,
        data_range=data_range,
        device=device,
        dtype=dtype,
        precision=options.get("precision"),
        info=info,
    )
