"""score_sde configs: the released presets and score_sde's own ``ml_collections`` layout read from a file.

The architecture and SDE of a checkpoint come from a config: a preset name (:data:`PRESETS`, the released
configs) or a JSON/YAML file in the layout of score_sde's ``ml_collections`` configs (``training.sde``,
``data.image_size``, ``model.ch_mult``, ...; ``config.to_dict()`` written out works), passed as ``config=``
or found beside the checkpoint (:func:`find_config`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from conservcheck.errors import ModelLoadError, UsageError, reason

CONFIG_NAMES = ("config.json", "config.yaml", "config.yml")


@dataclass(frozen=True)
class SDEConfig:
    """The fields of a score_sde config that decide the architecture and the units.

    Names follow score_sde's config (``training.sde``, ``data.centered``, ``model.nf``, ...).
    """

    sde: str
    image_size: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    continuous: bool = True
    num_channels: int = 3
    centered: bool = False
    sigma_min: float = 0.01
    sigma_max: float | None = None
    beta_min: float = 0.1
    beta_max: float = 20.0
    num_scales: int | None = None
    name: str = "ncsnpp"
    nf: int = 128
    attn_resolutions: tuple[int, ...] = (16,)
    resblock_type: str = "biggan"
    progressive: str = "output_skip"
    progressive_input: str = "input_skip"
    progressive_combine: str = "sum"
    fir: bool = True
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    embedding_type: str = "fourier"
    conditional: bool = True
    skip_rescale: bool = True
    scale_by_sigma: bool | None = None
    resamp_with_conv: bool = True
    nonlinearity: str = "swish"
    normalization: str = "GroupNorm"
    attention_type: str = "ddpm"

    @property
    def ve(self) -> bool:
        return self.sde.lower() == "vesde"

    @property
    def scaled_by_sigma(self) -> bool:
        """``model.scale_by_sigma``; score_sde sets it for VE and clears it for VP configs."""
        return self.ve if self.scale_by_sigma is None else bool(self.scale_by_sigma)

    @property
    def subvp(self) -> bool:
        return self.sde.lower() == "subvpsde"

    @property
    def time_embedding(self) -> str:
        """The embedding the network really uses: score_sde's DDPM always embeds the label with sinusoids
        (its configs keep the default ``embedding_type="fourier"``, which it ignores)."""
        return "positional" if self.name.lower() == "ddpm" else self.embedding_type.lower()

    @property
    def resolutions(self) -> list[int]:
        return [self.image_size // 2**i for i in range(len(self.ch_mult))]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


_SECTION = {
    "sde": "training",
    "continuous": "training",
    "image_size": "data",
    "num_channels": "data",
    "centered": "data",
}
_REQUIRED = ("sde", "image_size", "ch_mult", "num_res_blocks")
_TUPLES = ("ch_mult", "attn_resolutions", "fir_kernel")


def _merge(*parts: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for section, values in part.items():
            out.setdefault(section, {}).update(values)
    return out


def _sde(sde: str, continuous: bool = True, **model: Any) -> dict[str, Any]:
    return {"training": {"sde": sde, "continuous": continuous}, "model": model}


# score_sde's configs/default_{cifar10,lsun,celeba}_configs.py (the fields that matter here)
_CIFAR10 = {
    "data": {"image_size": 32, "centered": False},
    "model": {"sigma_max": 50.0, "num_scales": 1000, "embedding_type": "fourier"},
}
_LSUN = {"data": {"image_size": 256}, "model": {"sigma_max": 378.0, "num_scales": 2000}}
_CELEBA = {"data": {"image_size": 64}, "model": {"sigma_max": 90.0, "num_scales": 1000}}
# the model sections of configs/<sde>/*.py
_NCSNPP_HIGHRES = {"model": {"nf": 128, "ch_mult": (1, 1, 2, 2, 2, 2, 2), "num_res_blocks": 2, "scale_by_sigma": True}}
_NCSNPP_1024 = {
    "data": {"image_size": 1024},
    "model": {
        "nf": 16,
        "ch_mult": (1, 2, 4, 8, 16, 32, 32, 32),
        "num_res_blocks": 1,
        "sigma_max": 1348.0,
        "num_scales": 2000,
        "scale_by_sigma": True,
    },
}
_NCSNPP = {
    "model": {"ch_mult": (1, 2, 2, 2), "num_res_blocks": 4, "progressive": "none", "progressive_input": "residual"}
}
_DDPMPP = {
    "model": {
        "ch_mult": (1, 2, 2, 2),
        "num_res_blocks": 4,
        "progressive": "none",
        "progressive_input": "none",
        "fir": False,
    }
}
_DDPM = {"model": {"name": "ddpm", "ch_mult": (1, 2, 2, 2), "num_res_blocks": 2}}
_DDPM_256 = {"model": {"name": "ddpm", "ch_mult": (1, 1, 2, 2, 4, 4), "num_res_blocks": 2, "num_scales": 1000}}
_POSITIONAL = {"model": {"embedding_type": "positional"}}
_DEEP = {"model": {"num_res_blocks": 8}}
# VP / sub-VP: data in [-1, 1], the network's output is not divided by sigma
_VP = {"data": {"centered": True}, "model": {"scale_by_sigma": False}}
_VE = {"model": {"scale_by_sigma": True}}

#: Every config of score_sde_pytorch's ``configs/{ve,vp,subvp}`` (``configs/<sde>/<name>.py``) in
#: config-file layout: NCSN++, NCSN++ deep, DDPM++, DDPM++ deep and the DDPM baselines, continuous and
#: discrete; each equals that config's ``to_dict()`` read by :func:`config_from_dict`. (NCSN / NCSNv2
#: configs use other architectures and are not here.)
PRESETS: dict[str, dict[str, Any]] = {
    "ve/cifar10_ncsnpp": _merge(_CIFAR10, _NCSNPP, _VE, _POSITIONAL, _sde("vesde", False)),
    "ve/cifar10_ncsnpp_continuous": _merge(_CIFAR10, _NCSNPP, _VE, _sde("vesde")),
    "ve/cifar10_ncsnpp_deep_continuous": _merge(_CIFAR10, _NCSNPP, _VE, _DEEP, _sde("vesde")),
    "ve/cifar10_ddpm": _merge(_CIFAR10, _DDPM, _VE, _sde("vesde", False)),
    "ve/celeba_ncsnpp": _merge(_CELEBA, _NCSNPP, _VE, _POSITIONAL, _sde("vesde", False)),
    "ve/bedroom_ncsnpp_continuous": _merge(_LSUN, _NCSNPP_HIGHRES, _sde("vesde")),
    "ve/church_ncsnpp_continuous": _merge(_LSUN, _NCSNPP_HIGHRES, _sde("vesde", sigma_max=380.0)),
    "ve/celebahq_256_ncsnpp_continuous": _merge(_LSUN, _NCSNPP_HIGHRES, _sde("vesde", sigma_max=348.0)),
    "ve/ffhq_256_ncsnpp_continuous": _merge(_LSUN, _NCSNPP_HIGHRES, _sde("vesde", sigma_max=348.0)),
    "ve/celebahq_ncsnpp_continuous": _merge(_NCSNPP_1024, _sde("vesde")),
    "ve/ffhq_ncsnpp_continuous": _merge(_NCSNPP_1024, _sde("vesde")),
    "vp/cifar10_ddpmpp": _merge(_CIFAR10, _DDPMPP, _VP, _POSITIONAL, _sde("vpsde", False)),
    "vp/cifar10_ddpmpp_continuous": _merge(_CIFAR10, _DDPMPP, _VP, _POSITIONAL, _sde("vpsde")),
    "vp/cifar10_ddpmpp_deep_continuous": _merge(_CIFAR10, _DDPMPP, _VP, _POSITIONAL, _DEEP, _sde("vpsde")),
    "vp/cifar10_ncsnpp": _merge(_CIFAR10, _NCSNPP, _VP, _POSITIONAL, _sde("vpsde", False)),
    "vp/cifar10_ncsnpp_continuous": _merge(_CIFAR10, _NCSNPP, _VP, _POSITIONAL, _sde("vpsde")),
    "vp/cifar10_ncsnpp_deep_continuous": _merge(_CIFAR10, _NCSNPP, _VP, _POSITIONAL, _DEEP, _sde("vpsde")),
    "vp/ddpm/cifar10": _merge(_CIFAR10, _DDPM, _VP, _sde("vpsde", False)),
    "vp/ddpm/cifar10_continuous": _merge(_CIFAR10, _DDPM, _VP, _sde("vpsde")),
    "vp/ddpm/bedroom": _merge(_LSUN, _DDPM_256, _VP, _sde("vpsde", False)),
    "vp/ddpm/church": _merge(_LSUN, _DDPM_256, _VP, _sde("vpsde", False)),
    "vp/ddpm/celebahq": _merge(_LSUN, _DDPM_256, _VP, _sde("vpsde", False)),
    "subvp/cifar10_ddpm_continuous": _merge(_CIFAR10, _DDPM, _VP, _sde("subvpsde")),
    "subvp/cifar10_ddpmpp_continuous": _merge(_CIFAR10, _DDPMPP, _VP, _POSITIONAL, _sde("subvpsde")),
    "subvp/cifar10_ddpmpp_deep_continuous": _merge(_CIFAR10, _DDPMPP, _VP, _POSITIONAL, _DEEP, _sde("subvpsde")),
    "subvp/cifar10_ncsnpp_continuous": _merge(_CIFAR10, _NCSNPP, _VP, _POSITIONAL, _sde("subvpsde")),
    "subvp/cifar10_ncsnpp_deep_continuous": _merge(_CIFAR10, _NCSNPP, _VP, _POSITIONAL, _DEEP, _sde("subvpsde")),
}

#: The released checkpoints' folder names (score_sde's README) that differ from their config's path.
ALIASES = {
    "vp/cifar10_ddpm": "vp/ddpm/cifar10",
    "vp/cifar10_ddpm_continuous": "vp/ddpm/cifar10_continuous",
    "ve/ffhq_1024_ncsnpp_continuous": "ve/ffhq_ncsnpp_continuous",
}

#: The checkpoints score_sde_pytorch's README publishes (Google Drive folders), by folder name.
RELEASED = (
    "ve/cifar10_ncsnpp",
    "ve/cifar10_ncsnpp_continuous",
    "ve/cifar10_ncsnpp_deep_continuous",
    "vp/cifar10_ddpm",
    "vp/cifar10_ddpm_continuous",
    "vp/cifar10_ddpmpp",
    "vp/cifar10_ddpmpp_continuous",
    "vp/cifar10_ddpmpp_deep_continuous",
    "subvp/cifar10_ddpm_continuous",
    "subvp/cifar10_ddpmpp_continuous",
    "subvp/cifar10_ddpmpp_deep_continuous",
    "ve/bedroom_ncsnpp_continuous",
    "ve/church_ncsnpp_continuous",
    "ve/ffhq_1024_ncsnpp_continuous",
    "ve/ffhq_256_ncsnpp_continuous",
    "ve/celebahq_256_ncsnpp_continuous",
)


def preset_names() -> list[str]:
    return sorted(PRESETS)


def _preset(name: str) -> dict[str, Any]:
    key = name.strip().removesuffix(".py").removeprefix("configs/")
    key = ALIASES.get(key, key)
    if key in PRESETS:
        return copy.deepcopy(PRESETS[key])
    matches = sorted({ALIASES.get(p, p) for p in [*PRESETS, *ALIASES] if p.rsplit("/", 1)[-1] == key})
    if len(matches) == 1:
        return copy.deepcopy(PRESETS[matches[0]])
    if matches:
        raise UsageError(f"score_sde config {name!r} is ambiguous", f"name one of {', '.join(matches)}")
    raise UsageError(
        f"score_sde config {name!r} is neither a file nor a preset",
        f"name a JSON/YAML config file or one of {', '.join(preset_names())}",
    )


_INTS = ("image_size", "num_res_blocks", "num_channels", "nf", "num_scales")
_FLOATS = ("sigma_min", "sigma_max", "beta_min", "beta_max")
_BOOLS = ("continuous", "centered", "fir", "conditional", "skip_rescale", "scale_by_sigma", "resamp_with_conv")
_OPTIONAL = ("sigma_max", "scale_by_sigma", "num_scales")


def _value(name: str, v: Any, source: str) -> Any:
    """A config value checked against its field's type (a wrong one is a one-line ModelLoadError)."""
    if v is None and name in _OPTIONAL:
        return None

    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if name in _TUPLES:
        ok = isinstance(v, (list, tuple)) and all(is_int(i) and i > 0 for i in v) and (name != "ch_mult" or len(v) > 0)
        want = "a list of positive integers"
    elif name in _INTS:
        ok, want = is_int(v) and v > 0, "a positive integer"
    elif name in _FLOATS:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        want = "a positive number"
    elif name in _BOOLS:
        ok, want = isinstance(v, bool), "true or false"
    else:
        ok, want = isinstance(v, str), "a string"
    if not ok:
        raise ModelLoadError(
            f"{source} has {_SECTION.get(name, 'model')}.{name} = {v!r}, expected {want}",
            "fix the value (the released configs: " + ", ".join(preset_names()) + ")",
        )
    return tuple(v) if name in _TUPLES else v


def config_from_dict(data: Mapping[str, Any], source: str = "config") -> SDEConfig:
    """An :class:`SDEConfig` from a nested dict in score_sde's layout (``training``/``data``/``model``).

    A top-level ``"preset"`` names a preset the file's values override; other sections (``optim``,
    ``sampling``, ...) and unknown keys are ignored, so a dump of a full score_sde config loads.
    """
    if not isinstance(data, Mapping):
        raise ModelLoadError(
            f"{source} is not a mapping of sections", 'write {"training": {...}, "data": {...}, "model": {...}}'
        )
    nested = _merge(
        _preset(str(data["preset"])) if "preset" in data else {},
        {k: v for k, v in data.items() if isinstance(v, Mapping)},
    )
    names = {f.name for f in dataclasses.fields(SDEConfig)}
    values: dict[str, Any] = {}
    for name in names:
        section = nested.get(_SECTION.get(name, "model"), {})
        if name in section:
            values[name] = _value(name, section[name], source)
    missing = [f"{_SECTION.get(n, 'model')}.{n}" for n in _REQUIRED if n not in values]
    if missing:
        raise ModelLoadError(
            f"{source} lacks {', '.join(missing)}",
            f'add them, or start from a preset with "preset": one of {", ".join(preset_names())}',
        )
    return SDEConfig(**values)


def read_config(source: str | pathlib.Path) -> tuple[SDEConfig, str]:
    """(config, description) from a preset name or a JSON/YAML file."""
    path = pathlib.Path(source).expanduser()
    if not path.is_file():
        return config_from_dict(_preset(str(source)), f"preset {source}"), f"preset:{str(source).removesuffix('.py')}"
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:
        raise ModelLoadError(f"cannot parse {path} ({reason(err)})", "write the config as JSON or YAML") from err
    return config_from_dict(data, str(path)), str(path)


def find_config(checkpoint: pathlib.Path) -> pathlib.Path | None:
    """A config beside the checkpoint: ``<stem>.json``/``.yaml``/``.yml``, else ``config.json``/``.yaml``/``.yml``."""
    names = [f"{checkpoint.stem}{ext}" for ext in (".json", ".yaml", ".yml")] + list(CONFIG_NAMES)
    return next((checkpoint.parent / n for n in names if (checkpoint.parent / n).is_file()), None)
