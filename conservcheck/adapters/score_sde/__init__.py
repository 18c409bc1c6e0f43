"""Song et al.'s score_sde_pytorch checkpoints: NCSN++ converted to a diffusers ``UNet2DModel``.

A checkpoint ``checkpoint_*.pth`` is ``{"model", "ema", "optimizer", "step"}``. ``model`` is the state
dict of an ``NCSNpp`` wrapped in ``DataParallel`` (keys ``module.all_modules.{i}.*`` and the buffer
``module.sigmas``); ``ema`` is ``{"decay", "num_updates", "shadow_params"}`` where ``shadow_params`` is a
positional list over the parameters with ``requires_grad``, in ``parameters()`` order — the Gaussian
Fourier projection ``all_modules.0.W`` is fixed and not in it. Evaluation uses the EMA weights (the
default here; ``weights="raw"`` uses the trained weights as they were at the save).

The network is rebuilt as a diffusers ``UNet2DModel`` with Skip blocks (the architecture of
google/ncsnpp-celebahq-256) and the weights are renamed by :func:`key_map`, which walks the NCSN++
module list in the order ``NCSNpp.__init__`` builds it. Every ``GroupNorm`` gets NCSN++'s group count
min(C/4, 32) after construction: diffusers fixes the Skip blocks' attention norms at 32 groups and
computes the attention up-blocks' resnet groups with an operator-precedence slip, which only agree with
NCSN++ for ≥ 128 channels (all released configs). The converted network is exact for the settings of
the released high-resolution configs (``progressive="output_skip"``, ``progressive_input="input_skip"``,
BigGAN residual blocks, FIR resampling); the CIFAR-10 NCSN++ (``progressive_input="residual"``) and
DDPM++ (``progressive="none"``, per-block √2 rescaling and one attention per up level) configurations
have no ``UNet2DModel`` equivalent and are refused.

Units (``sampling``/``sde_lib`` of score_sde, continuous training):

* **VE** — σ(s) = σ_min (σ_max/σ_min)^s. The network is fed σ, takes log σ in its Fourier embedding and
  divides its output by σ (``scale_by_sigma``): the output is the score. Canonical time is σ
  (:class:`VEProcess`), data in [0, 1] (``centered=False``; the network maps it to [−1, 1] itself).
* **VP** — β(s) = β_min + s(β_max − β_min), fed s·999, output ε-like: s_θ = −out/std(s) with
  std(s) = √(1 − e^{−∫₀ˢβ}). That is the OU process at t = ½∫₀ˢβ (:class:`VPSDETime`) with the
  ``epsilon`` parameterization; data in [−1, 1] (``centered=True``).

The architecture and SDE come from a config: a preset name (:data:`PRESETS`, the released configs) or a
JSON/YAML file in the layout of score_sde's ``ml_collections`` configs (``training.sde``,
``data.image_size``, ``model.ch_mult``, ...; ``config.to_dict()`` written out works), passed as
``config=`` or found beside the checkpoint. A VE checkpoint's ``sigmas`` buffer is checked against the
config's σ_max and σ_min. Checkpoints are read with ``torch.load(weights_only=True)``; one that needs
arbitrary unpickling is loaded only with ``trust_remote_code=True``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from conservcheck.adapters._diffusers import check_options, prepare
from conservcheck.adapters.score_sde.checkpoint import (
    apply_ema,
    check_sigmas,
    checkpoint_file,
    model_state,
    read_checkpoint,
)
from conservcheck.adapters.score_sde.config import SDEConfig, find_config, preset_names, read_config
from conservcheck.adapters.score_sde.convert import build_unet, check_convertible, key_map, to_diffusers
from conservcheck.adapters.weights import hash_files
from conservcheck.errors import ModelLoadError, UsageError
from conservcheck.parameterization import conversion
from conservcheck.probe import ProbeInfo, VectorFieldProbe
from conservcheck.process import OUProcess, TimeConvention, VEProcess, VPSDETime, expand_like

NAME = "score_sde"

_OPTIONS = ("config", "weights", "precision")
# score_sde feeds continuous VP models t·999 ("the maximum value of time embedding is assumed to 999")
VP_TIME_SCALE = 999.0
# how much of a legacy (non-zip) torch file to scan for parameter names in detect()


def detect(path: pathlib.Path) -> bool:
    """A score_sde checkpoint file (``.pth``/``.pt``/``.ckpt`` whose pickle names ``all_modules.*``), or a
    folder holding exactly one."""
    try:
        return checkpoint_file(pathlib.Path(path)) is not None
    except ModelLoadError:
        return True


class NCSNppField(torch.nn.Module):
    """``fn(x, native_time)`` of a converted NCSN++: the original network's output.

    The UNet is fed ``time_scale`` × native time (σ for VE, 999·s for VP). ``UNet2DModel`` with a Fourier
    embedding always divides its output by the fed time; NCSN++ does so only with ``scale_by_sigma``, so
    without it the division is undone.
    """

    def __init__(self, unet: torch.nn.Module, time_scale: float, undo_division: bool) -> None:
        super().__init__()
        self.unet = unet
        self.time_scale = float(time_scale)
        self.undo_division = bool(undo_division)
        self.eval()

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        fed = t * self.time_scale
        out = self.unet(x, fed, return_dict=False)[0]
        return out * expand_like(fed, out) if self.undo_division else out


def units(cfg: SDEConfig) -> dict[str, Any]:
    """Process, time convention, parameterization, data range and report fields of a config."""
    fourier = cfg.embedding_type == "fourier"
    data_range = (-1.0, 1.0) if cfg.centered else (0.0, 1.0)
    if cfg.ve:
        return dict(
            process=VEProcess(),
            time_convention=TimeConvention(),
            parameterization="score",
            data_range=data_range,
            time_scale=1.0,
            undo_division=fourier and not cfg.scaled_by_sigma,
            extra={
                "family": "score_sde_ve",
                "native_time": "sigma (noise standard deviation), fed to the network as is",
                "native_range": [cfg.sigma_min, cfg.sigma_max],
                "output": "score (the network divides by sigma: scale_by_sigma)",
                "conversion": conversion("score"),
            },
        )
    return dict(
        process=OUProcess(),
        time_convention=VPSDETime(cfg.beta_min, cfg.beta_max),
        parameterization="epsilon",
        data_range=data_range,
        time_scale=VP_TIME_SCALE,
        undo_division=fourier and not cfg.scaled_by_sigma,
        extra={
            "family": "score_sde_vp",
            "native_time": f"VP-SDE time s in [0, 1], fed to the network as s*{VP_TIME_SCALE:g}",
            "native_range": [1e-5, 1.0],
            "output": "epsilon-like",
            "conversion": conversion("epsilon", sigma="sqrt(1 - exp(-int_0^s beta))")
            + "; OU time t = 0.5 int_0^s beta",
        },
    )


def load(
    path: pathlib.Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    **options: Any,
) -> VectorFieldProbe:
    """A probe for a score_sde NCSN++ checkpoint (a file, or a folder holding one).

    Options: ``config`` (preset name or JSON/YAML file; default: a config file beside the checkpoint),
    ``weights`` (``"ema"``, the default, or ``"raw"``), ``precision`` (see :mod:`conservcheck.precision`).
    """
    import diffusers

    check_options(options, _OPTIONS)
    weights = str(options.get("weights", "ema")).lower()
    if weights not in ("ema", "raw"):
        raise UsageError(
            f"unknown weights choice {options['weights']!r}", "use weights='ema' (default) or weights='raw'"
        )
    path = pathlib.Path(path)
    file = checkpoint_file(path)
    if file is None:
        raise ModelLoadError(
            f"{path} is not a score_sde checkpoint", "pass a checkpoint_*.pth written by score_sde's training loop"
        )
    source = options.get("config") or find_config(file)
    if source is None:
        raise ModelLoadError(
            f"no config for {file.name}: the architecture and SDE decide how to read it",
            f"pass config=<preset> ({', '.join(preset_names())}) or put config.json beside the checkpoint",
        )
    cfg, cfg_source = read_config(source)
    check_convertible(cfg)
    ckpt, loader = read_checkpoint(file, trust_remote_code)
    state, ema, step = model_state(ckpt)
    check_sigmas(state.get("sigmas"), cfg)
    unet = build_unet(cfg)
    pairs = key_map(cfg, unet.state_dict().keys())
    if weights == "ema":
        state = apply_ema(state, ema, pairs)
    try:
        unet.load_state_dict(to_diffusers(state, pairs))
    except RuntimeError as err:
        raise ModelLoadError(
            f"the checkpoint's tensors do not fit the config ({str(err).splitlines()[-1].strip()})",
            "check the config's nf, ch_mult, num_res_blocks and attn_resolutions",
        ) from err
    unet = prepare(unet.to(device=device, dtype=dtype), dtype)
    u = units(cfg)
    digest, per_file = hash_files([file], file.parent)
    info = ProbeInfo(
        name=file.name,
        adapter=NAME,
        reference=str(path),
        weights_sha256=digest,
        trust_remote_code=bool(trust_remote_code),
        extra={
            **u["extra"],
            "data_range": list(u["data_range"]),
            "config": cfg_source,
            "sde": cfg.sde,
            "architecture": "NCSN++ converted to diffusers UNet2DModel (Skip blocks)",
            "weights": weights,
            "ema_decay": float(ema["decay"])
            if weights == "ema" and isinstance(ema, Mapping) and "decay" in ema
            else None,
            "step": int(step) if step is not None else None,
            "weights_files": per_file,
            "weights_format": "pickle",
            "weights_loader": loader,
            "attention_processor": "AttnProcessor",
            "diffusers_version": diffusers.__version__,
        },
    )
    return VectorFieldProbe(
        NCSNppField(unet, u["time_scale"], u["undo_division"]),
        process=u["process"],
        sample_shape=(cfg.num_channels, cfg.image_size, cfg.image_size),
        parameterization=u["parameterization"],
        time_convention=u["time_convention"],
        data_range=u["data_range"],
        device=device,
        dtype=dtype,
        precision=options.get("precision"),
        info=info,
    )
