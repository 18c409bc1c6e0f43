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
    nonlinearity: str = "swish"
    normalization: str = "GroupNorm"
    attention_type: str = "ddpm"

    @property
    def ve(self) -> bool:
        return self.sde == "vesde"

    @property
    def scaled_by_sigma(self) -> bool:
        """``model.scale_by_sigma``; score_sde sets it for VE and clears it for VP configs."""
        return self.ve if self.scale_by_sigma is None else bool(self.scale_by_sigma)

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

_HIGHRES = {"model": {"nf": 128, "ch_mult": (1, 1, 2, 2, 2, 2, 2), "num_res_blocks": 2}, "data": {"image_size": 256}}
_MEGA = {
    "model": {"nf": 16, "ch_mult": (1, 2, 4, 8, 16, 32, 32, 32), "num_res_blocks": 1, "sigma_max": 1348.0},
    "data": {"image_size": 1024},
}
_CIFAR_NCSNPP = {
    "data": {"image_size": 32},
    "model": {"ch_mult": (1, 2, 2, 2), "num_res_blocks": 4, "progressive": "none", "progressive_input": "residual"},
}
_CIFAR_DDPMPP = {
    "training": {"sde": "vpsde"},
    "data": {"image_size": 32, "centered": True},
    "model": {
        "ch_mult": (1, 2, 2, 2),
        "num_res_blocks": 4,
        "progressive": "none",
        "progressive_input": "none",
        "fir": False,
        "embedding_type": "positional",
        "scale_by_sigma": False,
    },
}


def _merge(*parts: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for section, values in part.items():
            out.setdefault(section, {}).update(values)
    return out


def _ve(sigma_max: float) -> dict[str, Any]:
    return {"training": {"sde": "vesde"}, "model": {"sigma_max": sigma_max}}


#: The released score_sde continuous-time configs (``configs/<sde>/<name>.py``), in config-file layout.
PRESETS: dict[str, dict[str, Any]] = {
    "ve/celebahq_256_ncsnpp_continuous": _merge(_HIGHRES, _ve(348.0)),
    "ve/ffhq_256_ncsnpp_continuous": _merge(_HIGHRES, _ve(348.0)),
    "ve/church_ncsnpp_continuous": _merge(_HIGHRES, _ve(380.0)),
    "ve/bedroom_ncsnpp_continuous": _merge(_HIGHRES, _ve(378.0)),
    "ve/celebahq_ncsnpp_continuous": _merge(_MEGA, _ve(1348.0)),
    "ve/ffhq_ncsnpp_continuous": _merge(_MEGA, _ve(1348.0)),
    "ve/cifar10_ncsnpp_continuous": _merge(_CIFAR_NCSNPP, _ve(50.0)),
    "ve/cifar10_ncsnpp_deep_continuous": _merge(_CIFAR_NCSNPP, _ve(50.0), {"model": {"num_res_blocks": 8}}),
    "vp/cifar10_ddpmpp_continuous": _CIFAR_DDPMPP,
    "vp/cifar10_ddpmpp_deep_continuous": _merge(_CIFAR_DDPMPP, {"model": {"num_res_blocks": 8}}),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def _preset(name: str) -> dict[str, Any]:
    key = name.strip().removesuffix(".py")
    if key in PRESETS:
        return copy.deepcopy(PRESETS[key])
    matches = [p for p in PRESETS if p.split("/", 1)[1] == key]
    if len(matches) == 1:
        return copy.deepcopy(PRESETS[matches[0]])
    raise UsageError(
        f"score_sde config {name!r} is neither a file nor a preset",
        f"name a JSON/YAML config file or one of {', '.join(preset_names())}",
    )


_INTS = ("image_size", "num_res_blocks", "num_channels", "nf")
_FLOATS = ("sigma_min", "sigma_max", "beta_min", "beta_max")
_BOOLS = ("continuous", "centered", "fir", "conditional", "skip_rescale", "scale_by_sigma")
_OPTIONAL = ("sigma_max", "scale_by_sigma")


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
