"""Models shipped inside the package, reached by name: ``embedded:digits`` and ``embedded:funnel``.

* ``digits`` — a DDPM ``UNet2DModel`` (ε-prediction, linear β 1e-4 → 0.02, T = 1000) trained on
  scikit-learn's 8×8 handwritten digits upsampled to 16×16, one channel, data in [−1, 1]
  (``examples/train_digits.py``). Saved as a diffusers ``DDPMPipeline`` folder and loaded through the
  diffusers adapter (:mod:`conservcheck.adapters.diffusers_unet`), so its units are those of any DDPM:
  OU process observed at t_k = −½ log ᾱ_k, s = −ε̂/√(1 − ᾱ_k).
* ``funnel`` — an MLP ε-predictor (:class:`~conservcheck.networks.funnel_mlp.FunnelNet`) trained by
  denoising score matching on Neal's funnel in 10 dimensions (v ~ N(0, 3²), x_i | v ~ N(0, e^v), i = 1…9)
  under the OU process, fed canonical OU time (``examples/train_funnel.py``). Its exact score is known
  (:class:`conservcheck.analytic.funnel.Funnel`, returned by :func:`reference_field`), so error norms and Stein
  values can be computed against the truth. Its ``data_range`` is nominal: funnel samples are unbounded.

The weights live in ``conservcheck/assets/<folder>`` and are found with :mod:`importlib.resources`, so
they work offline from a wheel or a source checkout. Embedded models are reached only by name:
:func:`detect` is false for every path.
"""

from __future__ import annotations

import importlib.resources
import json
import pathlib
from typing import Any

import torch

from conservcheck.adapters.weights import hash_files
from conservcheck.errors import ModelLoadError, UsageError
from conservcheck.parameterization import conversion
from conservcheck.probe import ProbeInfo, VectorFieldProbe
from conservcheck.process import OUProcess, TimeConvention

NAME = "embedded"
PREFIX = "embedded:"

#: name → asset folder under ``conservcheck/assets``.
MODELS = {"digits": "digits-ddpm", "funnel": "funnel-mlp"}
#: Nominal clean-data interval of the funnel model: v has standard deviation 3 and x_i = e^{v/2} z_i, so
#: |coordinates| beyond 10⁴ need v beyond ~6 standard deviations.
FUNNEL_DATA_RANGE = (-1.0e4, 1.0e4)
_OPTIONS = ("precision",)


def available() -> list[str]:
    """Names of the embedded models, e.g. ``["digits", "funnel"]``."""
    return sorted(MODELS)


def detect(path: pathlib.Path) -> bool:
    """Always False: embedded models are reached by name (``embedded:<name>``), never by path."""
    return False


def _name(name: str | pathlib.Path) -> str:
    key = str(name).strip()
    key = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    if key not in MODELS:
        raise ModelLoadError(f"no embedded model named {key!r}", f"use one of {', '.join(available())}")
    return key


def asset_folder(name: str) -> pathlib.Path:
    """The folder holding an embedded model's files (``conservcheck/assets/<folder>``)."""
    key = _name(name)
    # one name per joinpath: a zipfile.Path (a zipped install) takes several only from Python 3.11
    folder = importlib.resources.files("conservcheck").joinpath("assets").joinpath(MODELS[key])
    if not isinstance(folder, pathlib.Path) or not folder.is_dir():
        raise ModelLoadError(
            f"the files of the embedded model {key!r} are missing ({folder})",
            "reinstall conservcheck from a wheel or a source checkout that includes conservcheck/assets",
        )
    return folder


def reference_field(name: str) -> Any:
    """The exact field an embedded model was trained to match, or None when unknown.

    ``funnel`` → :class:`conservcheck.analytic.funnel.Funnel` (n = 9, scale 3, OU process), whose ``score``,
    ``log_prob`` and ``divergence`` are exact; ``digits`` → None.
    """
    if _name(name) != "funnel":
        return None
    from conservcheck.analytic.funnel import Funnel

    data = _funnel_config(asset_folder("funnel"))["data"]
    return Funnel(n=int(data["n"]), scale=float(data["scale"]), process=OUProcess())


def _funnel_config(folder: pathlib.Path) -> dict[str, Any]:
    try:
        config: dict[str, Any] = json.loads((folder / "config.json").read_text())
        return config
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read {folder / 'config.json'} ({err})", "reinstall conservcheck") from err


def _load_digits(device: torch.device | str, dtype: torch.dtype, options: dict[str, Any]) -> VectorFieldProbe:
    from conservcheck.adapters import diffusers_unet

    folder = asset_folder("digits")
    probe = diffusers_unet.load(folder, device=device, dtype=dtype, **options)
    probe.info.extra.update(loaded_by=diffusers_unet.NAME)
    return probe


def _load_funnel(device: torch.device | str, dtype: torch.dtype, options: dict[str, Any]) -> VectorFieldProbe:
    from safetensors.torch import load_file

    from conservcheck.networks.funnel_mlp import FunnelNet, FunnelNetConfig

    folder = asset_folder("funnel")
    config = _funnel_config(folder)
    weights = folder / "model.safetensors"
    model = FunnelNet(FunnelNetConfig.from_dict(config["architecture"]))
    try:
        model.load_state_dict(load_file(str(weights)))
    except (OSError, RuntimeError) as err:
        raise ModelLoadError(f"cannot load {weights} ({str(err).splitlines()[0]})", "reinstall conservcheck") from err
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    digest, per_file = hash_files([weights], folder)
    data = config["data"]
    info = ProbeInfo(
        name="funnel",
        adapter=NAME,
        weights_sha256=digest,
        extra={
            "family": "mlp",
            "native_time": "canonical OU time t",
            "output": "epsilon",
            "conversion": conversion("epsilon", sigma="sqrt(1 - exp(-2t))"),
            "data_range": list(FUNNEL_DATA_RANGE),
            "data_range_nominal": True,
            "weights_files": per_file,
            "weights_format": "safetensors",
            "exact_reference": {"kind": "neal_funnel", "n": int(data["n"]), "scale": float(data["scale"])},
        },
    )
    return VectorFieldProbe(
        model,
        process=OUProcess(),
        sample_shape=(int(config["architecture"]["dim"]),),
        parameterization="epsilon",
        time_convention=TimeConvention(),
        data_range=FUNNEL_DATA_RANGE,
        device=device,
        dtype=dtype,
        precision=options.get("precision"),
        info=info,
    )


def load(
    path: str | pathlib.Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    **options: Any,
) -> VectorFieldProbe:
    """A probe for the embedded model named ``path`` (``"digits"``, ``"funnel"``, or with ``embedded:``).

    Options: ``precision`` (forward-pass mode, see :mod:`conservcheck.precision`). ``trust_remote_code``
    is accepted for the adapter contract and has no effect: the embedded weights are safetensors.
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise UsageError(f"unknown adapter option(s) {', '.join(unknown)}", f"accepted: {', '.join(_OPTIONS)}")
    key = _name(path)
    probe = (_load_digits if key == "digits" else _load_funnel)(device, dtype, options)
    info = probe.info
    info.name, info.adapter, info.reference, info.revision = key, NAME, PREFIX + key, None
    info.trust_remote_code = False
    info.extra.update(embedded_model=key, asset=MODELS[key])
    return probe


__all__ = ["MODELS", "NAME", "asset_folder", "available", "detect", "load", "reference_field"]
