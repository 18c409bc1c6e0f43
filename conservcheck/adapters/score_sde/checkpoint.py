"""score_sde checkpoint files: finding them, reading them safely, and the EMA weights they carry.

A checkpoint ``checkpoint_*.pth`` is ``{"model", "ema", "optimizer", "step"}``. ``model`` is the state
dict of an ``NCSNpp`` wrapped in ``DataParallel`` (keys ``module.all_modules.{i}.*`` and the buffer
``module.sigmas``); ``ema`` is ``{"decay", "num_updates", "shadow_params"}`` where ``shadow_params`` is a
positional list over the parameters with ``requires_grad``, in ``parameters()`` order — the Gaussian
Fourier projection ``all_modules.0.W`` is fixed and not in it.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from conservcheck.adapters.score_sde.config import SDEConfig
from conservcheck.adapters.weights import single_file
from conservcheck.errors import ModelLoadError
from conservcheck.safe_load import pickle_names, torch_load

SUFFIXES = (".pth", ".pt", ".ckpt")
_CONFIG_HINT = "check the config's name, nf, ch_mult, num_res_blocks, attn_resolutions and progressive settings"


def _is_checkpoint(file: pathlib.Path) -> bool:
    return file.is_file() and file.suffix.lower() in SUFFIXES and b"all_modules." in pickle_names(file)


def checkpoint_file(path: pathlib.Path) -> pathlib.Path | None:
    """The checkpoint a path names: the file itself, or the one score_sde checkpoint in a folder.

    Raises :class:`ModelLoadError` for a folder holding several.
    """
    return single_file(path, _is_checkpoint, "score_sde checkpoints")


def read_checkpoint(file: pathlib.Path, trust_remote_code: bool = False) -> tuple[Any, str]:
    """(checkpoint object, loader) — ``torch.load(weights_only=True)``, or ``weights_only=False`` only when
    the file needs it and ``trust_remote_code`` is true (:func:`conservcheck.safe_load.torch_load`)."""
    return torch_load(file, trust_remote_code)


def _strip(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k.removeprefix("module."): v for k, v in state.items()}


def model_state(ckpt: Any) -> tuple[dict[str, Tensor], dict[str, Any] | None, Any]:
    """(model state without ``module.``, EMA dict or None, step) of a checkpoint or a bare state dict."""
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("model"), Mapping):
        return _strip(ckpt["model"]), ckpt.get("ema"), ckpt.get("step")
    if isinstance(ckpt, Mapping) and any(str(k).removeprefix("module.").startswith("all_modules.") for k in ckpt):
        return _strip(ckpt), None, None
    raise ModelLoadError(
        "the file is not a score_sde checkpoint (no 'model' state dict)",
        "pass a checkpoint_*.pth written by score_sde's training loop",
    )


def apply_ema(state: Mapping[str, Tensor], ema: Any, trainable: list[str]) -> dict[str, Tensor]:
    """``state`` with the EMA shadow parameters in place of the ``trainable`` ones (their names in
    ``parameters()`` order; positional, like score_sde's ``ExponentialMovingAverage.copy_to``)."""
    shadow = ema.get("shadow_params") if isinstance(ema, Mapping) else None
    if shadow is None:
        raise ModelLoadError(
            "the checkpoint has no EMA weights ('ema.shadow_params')", "load the trained weights with weights='raw'"
        )
    if len(shadow) != len(trainable):
        raise ModelLoadError(
            f"the EMA holds {len(shadow)} tensors, the model has {len(trainable)} trainable parameters",
            "the checkpoint does not match the config; or load with weights='raw'",
        )
    out = dict(state)
    for key, value in zip(trainable, shadow):
        if key not in state:
            raise ModelLoadError(f"the checkpoint lacks {key}: it does not match the config", _CONFIG_HINT)
        if tuple(value.shape) != tuple(state[key].shape):
            raise ModelLoadError(
                f"EMA tensor for {key} has shape {tuple(value.shape)}, the model's is {tuple(state[key].shape)}",
                "the checkpoint does not match the config; or load with weights='raw'",
            )
        out[key] = value
    return out


def check_sigmas(sigmas: Tensor | None, cfg: SDEConfig) -> None:
    """Compare a VE checkpoint's ``sigmas`` buffer (σ_max … σ_min, geometric) with the config."""
    if sigmas is None or not cfg.ve or sigmas.numel() < 2:
        return
    hi, lo = float(sigmas.max()), float(sigmas.min())
    assert cfg.sigma_max is not None
    if not (math.isclose(hi, cfg.sigma_max, rel_tol=1e-4) and math.isclose(lo, cfg.sigma_min, rel_tol=1e-4)):
        raise ModelLoadError(
            f"the checkpoint was trained with sigma from {lo:g} to {hi:g}, the config says "
            f"{cfg.sigma_min:g} to {cfg.sigma_max:g}",
            "use the model's own config (sigma_max: 50 CIFAR-10, 348 CelebA-HQ/FFHQ-256, 378/380 LSUN, 1348 at 1024)",
        )


def num_scales(sigmas: Tensor | None, cfg: SDEConfig) -> int:
    """The number of noise scales N: the checkpoint's ``sigmas`` buffer has N entries (score_sde builds it
    from ``model.num_scales`` for every model); the config's value, when given, must agree."""
    n = int(sigmas.numel()) if sigmas is not None else None
    if n is not None and cfg.num_scales is not None and n != cfg.num_scales:
        raise ModelLoadError(
            f"the checkpoint has {n} noise scales, the config says model.num_scales = {cfg.num_scales}",
            "use the model's own config (1000: CIFAR-10 and the DDPM baselines; 2000: the LSUN, FFHQ and CelebA-HQ "
            "VE models)",
        )
    return n or cfg.num_scales or 1000
