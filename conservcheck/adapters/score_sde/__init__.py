"""Song et al.'s score_sde_pytorch checkpoints, every released config, with our own NCSN++ / DDPM++ / DDPM.

A checkpoint ``checkpoint_*.pth`` is ``{"model", "ema", "optimizer", "step"}``. ``model`` is the state
dict of the network wrapped in ``DataParallel`` (keys ``module.sigmas`` and ``module.all_modules.{i}.*``);
``ema`` is ``{"decay", "num_updates", "shadow_params"}`` where ``shadow_params`` is a positional list over
the parameters with ``requires_grad``, in ``parameters()`` order — the Gaussian Fourier projection
``all_modules.0.W`` is fixed and not in it. Evaluation uses the EMA weights (the default here;
``weights="raw"`` uses the trained weights as they were at the save).

The network is rebuilt from the config by :mod:`conservcheck.networks` (NCSN++ with every ``progressive``
/ ``progressive_input`` setting, DDPM++, score_sde's DDPM; see :mod:`.network`), whose parameter names
and order are score_sde's, so the state dict loads as it is. :mod:`.convert` turns the high-resolution
NCSN++ into a diffusers ``UNet2DModel`` (the architecture of google/ncsnpp-*).

Units: what score_sde's ``get_score_fn`` does with each SDE (``sde_lib``):

* **VE, continuous** — σ(s) = σ_min (σ_max/σ_min)^s. The network is fed σ (its Fourier embedding takes
  log σ) and divides its output by σ (``scale_by_sigma``): the output is the score. Canonical time is σ
  (:class:`VEProcess`), data in [0, 1] (``centered=False``; the network maps it to [−1, 1] itself).
* **VE, discrete** (SMLD) — N levels σ_i geometric from σ_max (i = 0) to σ_min (i = N−1); the network is
  fed the level index i (positional embedding) and divides by σ_i: the output is the score at σ_i. Native
  time is k = N−1−i (:class:`SigmaLevels`, counted from the clean end); a σ between levels is evaluated at
  the nearest level, as score_sde's samplers round the index.
* **VP, continuous** — β(s) = β_min + s(β_max − β_min), fed 999·s, output ε-like: s_θ = −out/std(s) with
  std(s) = √(1 − e^{−∫₀ˢβ}). That is the OU process at t = ½∫₀ˢβ (:class:`VPSDETime`) with the
  ``epsilon`` parameterization; data in [−1, 1] (``centered=True``).
* **VP, discrete** (DDPM) — β_k = linspace(β_min/N, β_max/N, N), fed the index k, s_θ = −out/√(1 − ᾱ_k):
  the OU process observed at t_k = −½ log ᾱ_k (:class:`DiscreteSchedule`).
* **sub-VP** (continuous) — fed 999·s like VP, s_θ = −out/std(s) with std(s) = 1 − e^{−∫₀ˢβ} (no square
  root): :class:`SubVPProcess` at the same t = ½∫₀ˢβ.

The architecture and SDE come from a config: a preset name (:data:`PRESETS`: every config of
score_sde's ``configs/{ve,vp,subvp}``, and the released checkpoints' folder names) or a JSON/YAML file in
the layout of score_sde's ``ml_collections`` configs (``config.to_dict()`` written out works), passed as
``config=`` or found beside the checkpoint. A VE checkpoint's ``sigmas`` buffer is checked against the
config's σ_max and σ_min, and its length against ``num_scales``. Checkpoints are read with
``torch.load(weights_only=True)``; one that needs arbitrary unpickling is loaded only with
``trust_remote_code=True``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from conservcheck.adapters._diffusers import check_options
from conservcheck.adapters.score_sde.checkpoint import (
    apply_ema,
    check_sigmas,
    checkpoint_file,
    model_state,
    num_scales,
    read_checkpoint,
)
from conservcheck.adapters.score_sde.config import PRESETS, SDEConfig, find_config, read_config
from conservcheck.adapters.score_sde.network import architecture, build, load_weights, trainable
from conservcheck.adapters.weights import hash_files
from conservcheck.errors import ModelLoadError, UsageError
from conservcheck.parameterization import conversion
from conservcheck.probe import ProbeInfo, VectorFieldProbe
from conservcheck.process import (
    DiscreteSchedule,
    OUProcess,
    SigmaLevels,
    SubVPProcess,
    TimeConvention,
    VEProcess,
    VPSDETime,
)

NAME = "score_sde"
__all__ = ["NAME", "PRESETS", "ScoreSdeField", "detect", "load", "units"]

_OPTIONS = ("config", "weights", "precision")
# score_sde feeds continuous VP and sub-VP models t·999 ("the maximum value of time embedding is assumed to 999")
VP_TIME_SCALE = 999.0


def detect(path: pathlib.Path) -> bool:
    """A score_sde checkpoint file (``.pth``/``.pt``/``.ckpt`` whose pickle names ``all_modules.*``), or a
    folder holding exactly one."""
    try:
        return checkpoint_file(pathlib.Path(path)) is not None
    except ModelLoadError:
        return True


class ScoreSdeField(torch.nn.Module):
    """``fn(x, native_time)`` of a score_sde network: the label score_sde's ``get_score_fn`` feeds it.

    ``feed``: ``"sigma"`` (VE continuous: σ as is), ``"vp_time"`` (999·s), ``"index"`` (the DDPM index k
    as is) or ``"level"`` (VE discrete: the table index N−1−k, rounded to the nearest level).
    """

    def __init__(self, net: torch.nn.Module, feed: str, levels: int) -> None:
        super().__init__()
        self.net, self.feed, self.levels = net, feed, int(levels)
        self.eval()

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if self.feed == "vp_time":
            label = t * VP_TIME_SCALE
        elif self.feed == "level":
            label = (self.levels - 1 - t).round().clamp(0, self.levels - 1).long()
        else:
            label = t
        out: Tensor = self.net(x, label)
        return out


def units(cfg: SDEConfig, levels: int) -> dict[str, Any]:
    """Process, time convention, parameterization, label feed, data range and report fields of a config
    whose networks have ``levels`` noise scales."""
    data_range = (-1.0, 1.0) if cfg.centered else (0.0, 1.0)
    common = {"data_range": data_range}
    if cfg.ve and cfg.continuous:
        return dict(
            common,
            process=VEProcess(),
            time_convention=TimeConvention(),
            parameterization="score",
            feed="sigma",
            extra={
                "family": "score_sde_ve",
                "native_time": "sigma (noise standard deviation), fed to the network as is",
                "native_range": [cfg.sigma_min, cfg.sigma_max],
                "output": "score (the network divides by sigma: scale_by_sigma)",
                "conversion": conversion("score"),
            },
        )
    if cfg.ve:
        assert cfg.sigma_max is not None
        return dict(
            common,
            process=VEProcess(),
            time_convention=SigmaLevels(cfg.sigma_min, cfg.sigma_max, levels),
            parameterization="score",
            feed="level",
            extra={
                "family": "score_sde_ve_discrete",
                "native_time": f"noise level k of {levels}, sigma_k = sigma_min (sigma_max/sigma_min)^(k/"
                f"{levels - 1}); fed to the network as the table index {levels - 1} - k, rounded",
                "native_range": [0, levels - 1],
                "output": "score at sigma_k (the network divides by its table's sigma)",
                "conversion": conversion("score"),
            },
        )
    if not cfg.continuous:
        betas = torch.linspace(cfg.beta_min / levels, cfg.beta_max / levels, levels, dtype=torch.float64)
        return dict(
            common,
            process=OUProcess(),
            time_convention=DiscreteSchedule.from_betas(betas, name="linear"),
            parameterization="epsilon",
            feed="index",
            extra={
                "family": "score_sde_vp_discrete",
                "native_time": f"DDPM index k, beta_k = linspace({cfg.beta_min:g}/{levels}, {cfg.beta_max:g}/{levels}, "
                f"{levels}), fed to the network as is",
                "native_range": [0, levels - 1],
                "output": "epsilon-like",
                "conversion": conversion("epsilon", "ou", alpha="sqrt(alpha_bar_k)", sigma="sqrt(1 - alpha_bar_k)"),
            },
        )
    sub = cfg.subvp
    std = "1 - exp(-int_0^s beta)" if sub else "sqrt(1 - exp(-int_0^s beta))"
    return dict(
        common,
        process=SubVPProcess() if sub else OUProcess(),
        time_convention=VPSDETime(cfg.beta_min, cfg.beta_max),
        parameterization="epsilon",
        feed="vp_time",
        extra={
            "family": "score_sde_subvp" if sub else "score_sde_vp",
            "native_time": f"{'sub-' if sub else ''}VP-SDE time s in [0, 1], fed to the network as s*{VP_TIME_SCALE:g}",
            "native_range": [1e-5, 1.0],
            "output": "epsilon-like",
            "conversion": conversion("epsilon", sigma=std) + "; canonical time t = 0.5 int_0^s beta",
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
    """A probe for a score_sde checkpoint (a file, or a folder holding one).

    Options: ``config`` (preset name or JSON/YAML file; default: a config file beside the checkpoint),
    ``weights`` (``"ema"``, the default, or ``"raw"``), ``precision`` (see :mod:`conservcheck.precision`).
    """
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
            "pass config=<preset> (e.g. ve/cifar10_ncsnpp_deep_continuous, vp/cifar10_ddpmpp_continuous; "
            "the released folder names work) or put config.json beside the checkpoint",
        )
    cfg, cfg_source = read_config(source)
    ckpt, loader = read_checkpoint(file, trust_remote_code)
    state, ema, step = model_state(ckpt)
    sigmas = state.get("sigmas")
    check_sigmas(sigmas, cfg)
    levels = num_scales(sigmas, cfg)
    net = build(cfg, levels)
    if weights == "ema":
        state = apply_ema(state, ema, trainable(net))
    load_weights(net, state)
    net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
    u = units(cfg, levels)
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
            "continuous": cfg.continuous,
            "architecture": architecture(cfg),
            "num_scales": levels,
            "weights": weights,
            "ema_decay": float(ema["decay"])
            if weights == "ema" and isinstance(ema, Mapping) and "decay" in ema
            else None,
            "step": int(step) if step is not None else None,
            "weights_files": per_file,
            "weights_format": "pickle",
            "weights_loader": loader,
        },
    )
    return VectorFieldProbe(
        ScoreSdeField(net, u["feed"], levels),
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
