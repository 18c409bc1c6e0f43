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

import copy
import dataclasses
import json
import math
import pathlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from ..errors import ModelLoadError, UsageError
from ..probe import ProbeInfo, VectorFieldProbe
from ..process import OUProcess, TimeConvention, VEProcess, VPSDETime, expand_like
from . import hash_files, pickle_names, single_file, torch_load
from .diffusers_unet import check_options, prepare

NAME = "score_sde"

SUFFIXES = (".pth", ".pt", ".ckpt")
CONFIG_NAMES = ("config.json", "config.yaml", "config.yml")
_OPTIONS = ("config", "weights", "precision")
# score_sde feeds continuous VP models t·999 ("the maximum value of time embedding is assumed to 999")
VP_TIME_SCALE = 999.0
# how much of a legacy (non-zip) torch file to scan for parameter names in detect()

# ---------------------------------------------------------------------------------------------------
# Configs


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


_SECTION = {"sde": "training", "continuous": "training", "image_size": "data", "num_channels": "data", "centered": "data"}
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
        "ch_mult": (1, 2, 2, 2), "num_res_blocks": 4, "progressive": "none", "progressive_input": "none",
        "fir": False, "embedding_type": "positional", "scale_by_sigma": False,
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
        raise ModelLoadError(f"{source} is not a mapping of sections", "write {\"training\": {...}, \"data\": {...}, \"model\": {...}}")
    nested = _merge(_preset(str(data["preset"])) if "preset" in data else {}, {k: v for k, v in data.items() if isinstance(v, Mapping)})
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
            f"add them, or start from a preset with \"preset\": one of {', '.join(preset_names())}",
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
        raise ModelLoadError(f"cannot parse {path} ({type(err).__name__}: {err})", "write the config as JSON or YAML") from err
    return config_from_dict(data, str(path)), str(path)


def find_config(checkpoint: pathlib.Path) -> pathlib.Path | None:
    """A config beside the checkpoint: ``<stem>.json``/``.yaml``/``.yml``, else ``config.json``/``.yaml``/``.yml``."""
    names = [f"{checkpoint.stem}{ext}" for ext in (".json", ".yaml", ".yml")] + list(CONFIG_NAMES)
    return next((checkpoint.parent / n for n in names if (checkpoint.parent / n).is_file()), None)


def check_convertible(cfg: SDEConfig) -> None:
    """Raise :class:`ModelLoadError` unless ``cfg`` describes an NCSN++ that ``UNet2DModel`` reproduces exactly."""
    wanted = {
        "name": "ncsnpp", "resblock_type": "biggan", "progressive": "output_skip", "progressive_input": "input_skip",
        "progressive_combine": "sum", "fir": True, "fir_kernel": (1, 3, 3, 1), "conditional": True,
        "skip_rescale": True, "nonlinearity": "swish", "normalization": "GroupNorm", "attention_type": "ddpm",
        "num_channels": 3, "continuous": True,
    }
    for key, value in wanted.items():
        got = getattr(cfg, key)
        if (got.lower() if isinstance(got, str) else got) != (value.lower() if isinstance(value, str) else value):
            raise ModelLoadError(
                f"score_sde model with {key}={got!r} has no diffusers UNet2DModel equivalent (needs {value!r})",
                "convertible: the NCSN++ configs with output_skip/input_skip (CelebA-HQ, FFHQ, LSUN); wrap others "
                "with a 'module:factory' reference around score_sde's own model",
            )
    if cfg.sde not in ("vesde", "vpsde"):
        raise ModelLoadError(
            f"score_sde sde {cfg.sde!r} is not supported",
            "subVP marginals are not the OU process's (std = 1 - exp(-int beta)); wrap it with a 'module:factory' reference",
        )
    if cfg.ch_mult[0] != 1:
        raise ModelLoadError(f"ch_mult starting with {cfg.ch_mult[0]} has no UNet2DModel equivalent", "UNet2DModel needs ch_mult[0] = 1")
    if cfg.image_size % 2 ** (len(cfg.ch_mult) - 1):
        raise ModelLoadError(
            f"image_size {cfg.image_size} is not divisible by 2^{len(cfg.ch_mult) - 1}",
            "check data.image_size and model.ch_mult",
        )
    if cfg.embedding_type not in ("fourier", "positional"):
        raise ModelLoadError(f"unknown embedding_type {cfg.embedding_type!r}", "use fourier or positional")
    if cfg.embedding_type == "positional" and (cfg.ve or cfg.scaled_by_sigma):
        raise ModelLoadError(
            "a positional time embedding with VE or scale_by_sigma indexes a discrete sigma table",
            "only continuously trained models are supported: VE with embedding_type fourier",
        )
    if cfg.ve and not cfg.sigma_max:
        raise ModelLoadError(
            "the config has no model.sigma_max for a VE model",
            "add it (50 CIFAR-10, 348 CelebA-HQ/FFHQ-256, 1348 at 1024)",
        )


# ---------------------------------------------------------------------------------------------------
# Architecture and key map


def unet_kwargs(cfg: SDEConfig) -> dict[str, Any]:
    """``UNet2DModel`` constructor arguments reproducing the NCSN++ of ``cfg``."""
    attn = [r in cfg.attn_resolutions for r in cfg.resolutions]
    return dict(
        sample_size=cfg.image_size,
        in_channels=cfg.num_channels,
        out_channels=cfg.num_channels,
        center_input_sample=not cfg.centered,
        time_embedding_type=cfg.embedding_type,
        flip_sin_to_cos=False,
        freq_shift=1,
        down_block_types=tuple("AttnSkipDownBlock2D" if a else "SkipDownBlock2D" for a in attn),
        up_block_types=tuple("AttnSkipUpBlock2D" if a else "SkipUpBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(cfg.nf * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        mid_block_scale_factor=math.sqrt(2.0),
        act_fn="silu",
        attention_head_dim=None,
        norm_num_groups=None,
        norm_eps=1e-6,
        dropout=0.0,
    )


def build_unet(cfg: SDEConfig) -> torch.nn.Module:
    """A ``UNet2DModel`` with the NCSN++ architecture of ``cfg`` (random weights).

    Every GroupNorm is set to NCSN++'s min(C/4, 32) groups; the setting lives on the modules, not in the
    diffusers config, so the model must not be saved with ``save_pretrained`` and reloaded.
    """
    from diffusers import UNet2DModel

    try:
        unet = UNet2DModel(**unet_kwargs(cfg))
    except ValueError as err:
        # AttnSkipUpBlock2D builds its resnets' GroupNorms with 32 groups whatever their width
        raise ModelLoadError(
            f"diffusers cannot build this NCSN++ as a UNet2DModel ({err})",
            "attention levels need channel counts (and those of the next finer level) divisible by 32, as in the released configs",
        ) from err
    for mod in unet.modules():
        if isinstance(mod, torch.nn.GroupNorm):
            mod.num_groups = min(mod.num_channels // 4, 32)
    return unet


# NCSN++ submodule → diffusers submodule, in NCSN++ registration order (which is parameters() order)
_RESNET = (
    ("GroupNorm_0", "norm1"), ("Conv_0", "conv1"), ("Dense_0", "time_emb_proj"),
    ("GroupNorm_1", "norm2"), ("Conv_1", "conv2"), ("Conv_2", "conv_shortcut"),
)
_ATTN = (("GroupNorm_0", "group_norm"), ("NIN_0", "to_q"), ("NIN_1", "to_k"), ("NIN_2", "to_v"), ("NIN_3", "to_out.0"))
_WB = (("weight", "weight", False), ("bias", "bias", False))
# NIN stores W as [in, out] and computes x W + b; nn.Linear stores [out, in]
_NIN = (("W", "weight", True), ("b", "bias", False))


def _params(kind: str) -> list[tuple[str, str, bool]]:
    """(NCSN++ parameter suffix, diffusers parameter suffix, transpose) of one NCSN++ module kind."""
    if kind == "fourier":
        return [("W", "weight", False)]
    if kind == "module":
        return list(_WB)
    if kind == "combine":
        return [(f"Conv_0.{o}", d, t) for o, d, t in _WB]
    if kind == "resnet":
        return [(f"{om}.{o}", f"{dm}.{d}", t) for om, dm in _RESNET for o, d, t in _WB]
    return [(f"{om}.{o}", f"{dm}.{d}", t) for om, dm in _ATTN for o, d, t in (_NIN if om.startswith("NIN") else _WB)]


def module_plan(cfg: SDEConfig) -> list[tuple[str, str]]:
    """``all_modules[i]`` of score_sde's ``NCSNpp`` as (kind, diffusers prefix), following ``NCSNpp.__init__``
    of the released code (the parameter-free FIR resampling of the image pyramids is not in the list).

    Kinds: ``fourier`` (Gaussian Fourier projection), ``module`` (Linear / Conv / GroupNorm), ``combine``
    (input-skip 1×1 conv), ``resnet`` (``ResnetBlockBigGANpp``), ``attn`` (``AttnBlockpp``).
    """
    levels = len(cfg.ch_mult)
    attn = [r in cfg.attn_resolutions for r in cfg.resolutions]
    plan: list[tuple[str, str]] = []
    if cfg.embedding_type == "fourier":
        plan.append(("fourier", "time_proj"))
    plan += [("module", "time_embedding.linear_1"), ("module", "time_embedding.linear_2"), ("module", "conv_in")]
    for i in range(levels):
        for j in range(cfg.num_res_blocks):
            plan.append(("resnet", f"down_blocks.{i}.resnets.{j}"))
            if attn[i]:
                plan.append(("attn", f"down_blocks.{i}.attentions.{j}"))
        if i != levels - 1:
            plan += [("resnet", f"down_blocks.{i}.resnet_down"), ("combine", f"down_blocks.{i}.skip_conv")]
    plan += [("resnet", "mid_block.resnets.0"), ("attn", "mid_block.attentions.0"), ("resnet", "mid_block.resnets.1")]
    for b, i in enumerate(reversed(range(levels))):
        plan += [("resnet", f"up_blocks.{b}.resnets.{j}") for j in range(cfg.num_res_blocks + 1)]
        if attn[i]:
            plan.append(("attn", f"up_blocks.{b}.attentions.0"))
        # the output-skip head of the finest level is UNet2DModel's output head
        norm, conv = ("conv_norm_out", "conv_out") if i == 0 else (f"up_blocks.{b}.skip_norm", f"up_blocks.{b}.skip_conv")
        plan += [("module", norm), ("module", conv)]
        if i != 0:
            plan.append(("resnet", f"up_blocks.{b}.resnet_up"))
    return plan


@dataclass(frozen=True)
class KeyPair:
    """One parameter: its NCSN++ name (without ``module.``), its diffusers name, and whether to transpose."""

    original: str
    diffusers: str
    transpose: bool = False
    trainable: bool = True


def key_map(cfg: SDEConfig, diffusers_keys: Iterable[str]) -> list[KeyPair]:
    """NCSN++ ↔ diffusers parameter names, in NCSN++ ``parameters()`` order.

    ``diffusers_keys`` are the state-dict keys of :func:`build_unet`'s model; a shortcut convolution
    (``Conv_2``) is mapped only where the block has one. Raises :class:`ModelLoadError` when the two
    architectures do not cover each other exactly.
    """
    keys = set(diffusers_keys)
    pairs: list[KeyPair] = []
    for index, (kind, prefix) in enumerate(module_plan(cfg)):
        for orig, diff, transpose in _params(kind):
            d = f"{prefix}.{diff}"
            if d in keys:
                pairs.append(KeyPair(f"all_modules.{index}.{orig}", d, transpose, kind != "fourier"))
    uncovered = sorted(keys - {p.diffusers for p in pairs})
    if uncovered:
        raise ModelLoadError(
            f"the NCSN++ key map does not cover {len(uncovered)} UNet2DModel parameters (first: {uncovered[0]})",
            "this diffusers version builds Skip blocks differently; use the version named in the install requirements",
        )
    return pairs


def to_diffusers(state: Mapping[str, Tensor], pairs: list[KeyPair]) -> dict[str, Tensor]:
    """An NCSN++ state dict (no ``module.`` prefix) renamed to diffusers keys; every parameter must match."""
    wanted = {p.original for p in pairs}
    extra = sorted(k for k in state if k not in wanted and k != "sigmas")
    missing = sorted(wanted - set(state))
    if extra or missing:
        what = f"lacks {missing[0]}" if missing else f"has parameters the config does not build (first: {extra[0]})"
        raise ModelLoadError(
            f"the checkpoint {what}: it does not match the config",
            "check the config's ch_mult, num_res_blocks, attn_resolutions and image_size",
        )
    return {p.diffusers: (state[p.original].t() if p.transpose else state[p.original]) for p in pairs}


def to_original(state: Mapping[str, Tensor], pairs: list[KeyPair]) -> OrderedDict[str, Tensor]:
    """Inverse of :func:`to_diffusers`: diffusers keys → NCSN++ keys, in NCSN++ parameter order."""
    return OrderedDict((p.original, state[p.diffusers].t() if p.transpose else state[p.diffusers]) for p in pairs)


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def _is_checkpoint(file: pathlib.Path) -> bool:
    return file.is_file() and file.suffix.lower() in SUFFIXES and b"all_modules." in pickle_names(file)


def checkpoint_file(path: pathlib.Path) -> pathlib.Path | None:
    """The checkpoint a path names: the file itself, or the one score_sde checkpoint in a folder.

    Raises :class:`ModelLoadError` for a folder holding several.
    """
    return single_file(path, _is_checkpoint, "score_sde checkpoints")


def detect(path: pathlib.Path) -> bool:
    """A score_sde checkpoint file (``.pth``/``.pt``/``.ckpt`` whose pickle names ``all_modules.*``), or a
    folder holding exactly one."""
    try:
        return checkpoint_file(pathlib.Path(path)) is not None
    except ModelLoadError:
        return True


def read_checkpoint(file: pathlib.Path, trust_remote_code: bool = False) -> tuple[Any, str]:
    """(checkpoint object, loader) — ``torch.load(weights_only=True)``, or ``weights_only=False`` only when
    the file needs it and ``trust_remote_code`` is true (:func:`conservcheck.adapters.torch_load`)."""
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


def apply_ema(state: Mapping[str, Tensor], ema: Any, pairs: list[KeyPair]) -> dict[str, Tensor]:
    """``state`` with the EMA shadow parameters in place of the trainable ones (positional, like
    score_sde's ``ExponentialMovingAverage.copy_to``)."""
    shadow = ema.get("shadow_params") if isinstance(ema, Mapping) else None
    if shadow is None:
        raise ModelLoadError("the checkpoint has no EMA weights ('ema.shadow_params')", "load the trained weights with weights='raw'")
    trainable = [p.original for p in pairs if p.trainable]
    if len(shadow) != len(trainable):
        raise ModelLoadError(
            f"the EMA holds {len(shadow)} tensors, the model has {len(trainable)} trainable parameters",
            "the checkpoint does not match the config; or load with weights='raw'",
        )
    out = dict(state)
    for key, value in zip(trainable, shadow):
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
            f"the checkpoint was trained with sigma from {lo:g} to {hi:g}, the config says {cfg.sigma_min:g} to {cfg.sigma_max:g}",
            "use the model's own config (sigma_max: 50 CIFAR-10, 348 CelebA-HQ/FFHQ-256, 378/380 LSUN, 1348 at 1024)",
        )


# ---------------------------------------------------------------------------------------------------
# Probe


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
            process=VEProcess(), time_convention=TimeConvention(), parameterization="score", data_range=data_range,
            time_scale=1.0, undo_division=fourier and not cfg.scaled_by_sigma,
            extra={
                "family": "score_sde_ve",
                "native_time": "sigma (noise standard deviation), fed to the network as is",
                "native_range": [cfg.sigma_min, cfg.sigma_max],
                "output": "score (the network divides by sigma: scale_by_sigma)",
                "conversion": "s = out",
            },
        )
    return dict(
        process=OUProcess(), time_convention=VPSDETime(cfg.beta_min, cfg.beta_max), parameterization="epsilon",
        data_range=data_range, time_scale=VP_TIME_SCALE, undo_division=fourier and not cfg.scaled_by_sigma,
        extra={
            "family": "score_sde_vp",
            "native_time": f"VP-SDE time s in [0, 1], fed to the network as s*{VP_TIME_SCALE:g}",
            "native_range": [1e-5, 1.0],
            "output": "epsilon-like",
            "conversion": "s = -out / sqrt(1 - exp(-int_0^s beta)); OU time t = 0.5 int_0^s beta",
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
        raise UsageError(f"unknown weights choice {options['weights']!r}", "use weights='ema' (default) or weights='raw'")
    path = pathlib.Path(path)
    file = checkpoint_file(path)
    if file is None:
        raise ModelLoadError(f"{path} is not a score_sde checkpoint", "pass a checkpoint_*.pth written by score_sde's training loop")
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
            "ema_decay": float(ema["decay"]) if weights == "ema" and isinstance(ema, Mapping) and "decay" in ema else None,
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
