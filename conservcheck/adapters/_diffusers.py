"""What the diffusers-based adapters share: folder layouts, scheduler → units, loading and preparing a UNet.

Used by the ``diffusers``, ``latent``, ``flow``, ``score_sde`` and ``embedded`` adapters; not an adapter
itself. Importing it imports diffusers lazily (inside the functions that need it).
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from conservcheck.adapters.weights import WeightsFiles, check_safetensors, find_weights, hash_files
from conservcheck.errors import ModelLoadError, UsageError, error_chain, reason
from conservcheck.parameterization import conversion
from conservcheck.process import DiscreteSchedule, OUProcess, Process, TimeConvention, VEProcess
from conservcheck.safe_load import DAMAGED_HINT, TRUST_HINT, unsafe_global

DDPM_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler")
VE_SCHEDULERS = ("ScoreSdeVeScheduler",)
SUPPORTED_SCHEDULERS = DDPM_SCHEDULERS + VE_SCHEDULERS

PARAMETERIZATION = {"epsilon": "epsilon", "sample": "x0", "v_prediction": "v"}
OPTIONS = ("precision", "variant")


def read_json(path: pathlib.Path) -> dict[str, Any] | None:
    """A JSON object from a file, or None when the file is missing or not a JSON object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_flow_matching(config: dict[str, Any] | None) -> bool:
    # flow-matching schedulers belong to the ``flow`` family
    return config is not None and str(config.get("_class_name", "")).startswith("FlowMatch")


#: The pipeline components the adapters read: the denoising network and the autoencoders.
UNET = "unet"
AUTOENCODERS = {"vae": "AutoencoderKL", "vqvae": "VQModel"}


def component_dir(root: pathlib.Path, name: str) -> pathlib.Path:
    """Where a pipeline component lives: its subfolder when there is one, else the folder itself.

    This is diffusers' own rule (``load_sub_model``): the google/ddpm-* and google/ncsnpp-* repositories keep
    ``config.json``, ``scheduler_config.json`` and the weights at the root beside ``model_index.json``.
    """
    sub = root / name
    return sub if sub.is_dir() else root


@dataclass
class Layout:
    """Where a UNet's config/weights, its scheduler config and its autoencoder live inside a model folder.

    ``problem`` names a file that decides the layout but cannot be read (loading reports it).
    """

    root: pathlib.Path
    unet_dir: pathlib.Path
    scheduler_config: pathlib.Path | None
    autoencoder: str | None = None
    problem: str | None = None

    @property
    def autoencoder_dir(self) -> pathlib.Path | None:
        return None if self.autoencoder is None else component_dir(self.root, self.autoencoder)

    def check(self) -> None:
        """Raise :class:`ModelLoadError` for an unreadable layout file."""
        if self.problem:
            raise ModelLoadError(self.problem, "download the model again, or restore the file from the original")


def _scheduler_file(folder: pathlib.Path) -> pathlib.Path:
    return folder / "scheduler_config.json"


def layout(path: pathlib.Path) -> Layout | None:
    """The layout of a diffusers folder with a ``UNet2DModel``, or None for any other folder.

    * A pipeline (``model_index.json`` naming a ``unet``): each component (unet, scheduler, vae / vqvae) from
      its subfolder, or from the root when the subfolder is missing, as diffusers loads it. Which of the
      component's files exist does not matter here: loading names the one it cannot read.
    * Components saved one by one without ``model_index.json``: ``unet/config.json`` with ``scheduler/``.
    * A bare model folder: a root ``config.json`` of a ``UNet2DModel``, its scheduler config beside it or in
      ``scheduler/``.
    """
    if not path.is_dir():
        return None
    index_file = path / "model_index.json"
    if index_file.is_file():
        index = read_json(index_file)
        if index is None:
            # unreadable: the folders present decide the components, and loading reports the file
            ae = next((n for n in AUTOENCODERS if (path / n).is_dir()), None)
            return Layout(
                path,
                component_dir(path, UNET),
                _scheduler_file(component_dir(path, "scheduler")),
                ae,
                f"{index_file} is not a JSON object",
            )
        if UNET not in index:
            return None
        scheduler = _scheduler_file(component_dir(path, "scheduler")) if "scheduler" in index else None
        ae = next((n for n in AUTOENCODERS if n in index), None)
        return Layout(path, component_dir(path, UNET), scheduler, ae)
    if (path / UNET / "config.json").is_file():
        ae = next((n for n in AUTOENCODERS if (path / n / "config.json").is_file()), None)
        return Layout(path, path / UNET, _scheduler_file(path / "scheduler"), ae)
    cfg = read_json(path / "config.json")
    if not cfg or cfg.get("_class_name") != "UNet2DModel":
        return None
    for cand in (_scheduler_file(path), _scheduler_file(path / "scheduler")):
        if cand.is_file():
            return Layout(path, path, cand)
    return Layout(path, path, None)


def read_scheduler_config(lay: Layout) -> dict[str, Any]:
    """The scheduler config of a layout; :class:`ModelLoadError` naming the file when it is missing or not
    JSON (the noise schedule decides the model's units)."""
    lay.check()
    file = lay.scheduler_config
    if file is None:
        raise ModelLoadError(
            f"{lay.root} has no scheduler config: the noise schedule decides the model's units",
            "add the training scheduler's scheduler_config.json beside config.json or in scheduler/",
        )
    cfg = read_json(file)
    if cfg is None:
        what = "is not a JSON object" if file.is_file() else "is missing"
        raise ModelLoadError(
            f"{file} {what}: the noise schedule decides the model's units",
            "download the model again, or save the training scheduler there (save_pretrained)",
        )
    return cfg


# ---------------------------------------------------------------------------------------------------
# Scheduler → units


@dataclass
class Units:
    """What a scheduler config says about the UNet's units."""

    process: Process
    time_convention: TimeConvention
    parameterization: str
    family: str
    learned_variance: bool
    extra: dict[str, Any] = field(default_factory=dict)


def _scheduler(name: str, config: dict[str, Any], source: str) -> Any:
    """diffusers' scheduler ``name`` built from ``config``; a value diffusers rejects is a ModelLoadError."""
    import diffusers

    try:
        with _quiet_diffusers():
            return getattr(diffusers, name).from_config(config)
    except Exception as err:
        raise ModelLoadError(
            f"diffusers cannot build {name} from {source} ({reason(err)})",
            "fix that value, or re-save the scheduler the model was trained with (save_pretrained)",
        ) from err


def scheduler_units(config: dict[str, Any], source: str = "the scheduler config") -> Units:
    """Process, time convention and parameterization implied by a diffusers scheduler config.

    The schedule is taken from the scheduler's own ``alphas_cumprod`` (built by diffusers from the
    config: ``beta_schedule``, ``trained_betas``, ...), so every schedule diffusers knows is covered.
    Raises :class:`ModelLoadError` for an unsupported scheduler class or prediction type.
    """
    name = str(config.get("_class_name"))
    if name in VE_SCHEDULERS:
        sched = _scheduler(name, config, source)
        smin, smax = float(sched.config.sigma_min), float(sched.config.sigma_max)
        return Units(
            VEProcess(),
            TimeConvention(),
            "score",
            "ncsnpp_ve",
            False,
            {
                "scheduler": name,
                "native_time": "sigma (noise standard deviation), float tensor [B]",
                "native_range": [smin, smax],
                "sigma_max": smax,
                "sigma_max_source": "scheduler config",
                "output": "score (the UNet divides by sigma)",
                "conversion": conversion("score"),
            },
        )
    config, legacy = legacy_scheduler_keys(config, source)
    if name not in DDPM_SCHEDULERS:
        raise ModelLoadError(
            f"unsupported scheduler class {name!r} in {source}",
            f"supported schedulers: {', '.join(SUPPORTED_SCHEDULERS)}; wrap other models with a "
            "'module:factory' reference",
        )
    sched = _scheduler(name, config, source)
    pred = str(sched.config.prediction_type)
    if pred not in PARAMETERIZATION:
        raise ModelLoadError(
            f"unsupported prediction_type {pred!r} in {source}", "supported: epsilon, sample, v_prediction"
        )
    alphas_cumprod = torch.as_tensor(sched.alphas_cumprod, dtype=torch.float64).flatten()
    ab = alphas_cumprod
    if ab.numel() < 2 or not bool(((ab >= 0) & (ab <= 1)).all()) or not bool((ab[1:] < ab[:-1]).all()):
        raise ModelLoadError(
            f"the schedule in {source} is not a noise schedule (alpha_bar must decrease strictly within (0, 1] "
            f"over at least 2 steps; it has {ab.numel()} steps)",
            "check num_train_timesteps, beta_start, beta_end, beta_schedule and trained_betas",
        )
    if not bool(alphas_cumprod[-1] > 0):
        raise ModelLoadError(
            f"the schedule in {source} reaches alpha_bar = 0 (zero terminal SNR)",
            "use the checkpoint with its training schedule without rescale_betas_zero_snr",
        )
    schedule_name = "trained_betas" if sched.config.trained_betas is not None else str(sched.config.beta_schedule)
    param = PARAMETERIZATION[pred]
    variance = str(getattr(sched.config, "variance_type", None) or "")
    return Units(
        OUProcess(),
        DiscreteSchedule(alphas_cumprod, name=schedule_name),
        param,
        "ddpm",
        variance in ("learned", "learned_range"),
        {
            "scheduler": name,
            "beta_schedule": schedule_name,
            "num_train_timesteps": int(alphas_cumprod.numel()),
            "prediction_type": pred,
            "native_time": "DDPM index k (alpha_bar_k = prod_{i<=k} (1 - beta_i)), float tensor [B]",
            "native_range": [0, int(alphas_cumprod.numel()) - 1],
            "output": param,
            "conversion": conversion(param, "ou", alpha="sqrt(alpha_bar_k)", sigma="sqrt(1 - alpha_bar_k)"),
            **({"legacy_config_keys": legacy} if legacy else {}),
        },
    )


def legacy_scheduler_keys(config: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A scheduler config with the keys diffusers has since removed translated: (config, what was read).

    ``predict_epsilon`` (diffusers 0.7–0.12; replaced by ``prediction_type`` in 0.10 and no longer read) —
    false meant the network predicts x0. Current diffusers ignores the key and would assume epsilon, so it
    is mapped here; a config that also names a different ``prediction_type`` is refused.
    """
    if "predict_epsilon" not in config:
        return config, {}
    old = config["predict_epsilon"]
    if not isinstance(old, bool):
        raise ModelLoadError(f"predict_epsilon in {source} is {old!r}, not true or false", "fix the value")
    mapped = "epsilon" if old else "sample"
    given = config.get("prediction_type")
    if given is not None and given != mapped:
        raise ModelLoadError(
            f"{source} says predict_epsilon={str(old).lower()} (prediction_type {mapped!r}) and prediction_type "
            f"{given!r}",
            "delete the key that does not describe how the model was trained",
        )
    out = {k: v for k, v in config.items() if k != "predict_epsilon"}
    out["prediction_type"] = mapped
    return out, {"predict_epsilon": f"{str(old).lower()} -> prediction_type {mapped}"}


# ---------------------------------------------------------------------------------------------------
# Loading and hygiene


def _contiguous_inputs(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.contiguous() if isinstance(a, Tensor) else a for a in args)


def prepare(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Make a diffusers model safe to differentiate: eval mode, frozen parameters, classic attention.

    Sets ``AttnProcessor`` (bmm + softmax: forward-mode AD and double backward work) on every
    ``Attention`` module, turns off float32 up-casting of attention in float64 models, and adds a
    forward-pre-hook making GroupNorm inputs contiguous (forward-mode AD fails otherwise). Outputs are
    unchanged up to the floating-point rounding of the attention kernel.
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor

    model.eval()
    model.requires_grad_(False)
    for mod in model.modules():
        if isinstance(mod, Attention):
            mod.set_processor(AttnProcessor())
            if dtype == torch.float64:
                mod.upcast_softmax = False
                mod.upcast_attention = False
        elif isinstance(mod, torch.nn.GroupNorm) and not getattr(mod, "_conservcheck_contiguous", False):
            mod.register_forward_pre_hook(_contiguous_inputs)
            # torch types assignments to a Module's attributes as Tensor | Module; a plain flag is fine
            mod._conservcheck_contiguous = True  # type: ignore[assignment]
    return model


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' logger while loading: what it would warn about is raised here as one line."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def _load_failure(cls: Any, folder: pathlib.Path, weights: WeightsFiles, err: BaseException) -> ModelLoadError:
    """The one-line error for a failed ``from_pretrained``: damaged weights, weights that do not fit the
    config, or diffusers' own complaint."""
    chain = error_chain(err)
    for e in chain:
        text = str(e)
        if "Error(s) in loading state_dict" in text or "size mismatch" in text:
            detail = next((ln.strip() for ln in text.splitlines()[1:] if ln.strip()), text.splitlines()[0])
            return ModelLoadError(
                f"the weights in {folder} do not fit its config.json ({detail[:200]})",
                "restore the config.json saved with these weights, or re-save the model with save_pretrained",
            )
        if "Unable to load weights from checkpoint file" in text:
            return ModelLoadError(
                f"weights file {weights.files[0]} is damaged: not a complete torch file ({reason(chain[-1])})",
                DAMAGED_HINT,
            )
    return ModelLoadError(
        f"diffusers could not load {cls.__name__} from {folder} ({reason(err)})",
        "check that the folder is a complete saved diffusers model of that class",
    )


def load_component(
    cls: Any,
    folder: pathlib.Path,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    variant: str | None = None,
) -> tuple[torch.nn.Module, WeightsFiles, str]:
    """Load a diffusers model class from a saved folder: (model, weights files, loader used).

    safetensors when present (checked for truncation first); otherwise pickled ``.bin`` weights through
    diffusers, which reads them with ``torch.load(weights_only=True)``. A pickle that needs arbitrary
    unpickling is refused unless ``trust_remote_code`` is true, and is then read with
    ``torch.load(weights_only=False)`` into a model built from the folder's config. Weights that leave
    parameters of the config uninitialised are refused (diffusers would fill them with random values).
    """
    weights = find_weights(folder, variant=variant)
    variant = weights.variant
    if weights.use_safetensors:
        for f in weights.files:
            check_safetensors(f)
    with _quiet_diffusers():
        try:
            model, loading = cls.from_pretrained(
                str(folder),
                use_safetensors=weights.use_safetensors,
                variant=variant,
                torch_dtype=dtype,
                low_cpu_mem_usage=False,
                output_loading_info=True,
            )
            loader = "safetensors" if weights.use_safetensors else "torch.load(weights_only=True)"
        except Exception as err:
            needed = None if weights.use_safetensors else unsafe_global(err)
            if needed is None:
                raise _load_failure(cls, folder, weights, err) from err
            if not trust_remote_code:
                raise ModelLoadError(
                    f"{weights.files[0].name} in {folder} needs arbitrary unpickling ({needed}), which can run code",
                    TRUST_HINT,
                ) from err
            model, loading, loader = _load_trusted(cls, folder, weights, dtype), {}, "torch.load(weights_only=False)"
    missing = sorted(loading.get("missing_keys", []))
    if missing:
        raise ModelLoadError(
            f"the weights in {folder} lack {len(missing)} parameters of its config.json (first: {missing[0]})",
            "restore the config.json saved with these weights, or re-save the model with save_pretrained",
        )
    return model, weights, loader


def _load_trusted(cls: Any, folder: pathlib.Path, weights: WeightsFiles, dtype: torch.dtype) -> torch.nn.Module:
    """``torch.load(weights_only=False)`` of every weights file into a model built from the config."""
    model: torch.nn.Module = cls.from_config(cls.load_config(str(folder)))
    state: dict[str, Tensor] = {}
    for f in weights.files:
        try:
            state.update(torch.load(f, map_location="cpu", weights_only=False))
        except Exception as err:
            raise ModelLoadError(f"cannot unpickle {f} ({reason(err)})", DAMAGED_HINT) from err
    # attention weights saved before diffusers 0.15 (query/key/value/proj_attn), renamed as from_pretrained does
    fix_keys = getattr(model, "_fix_state_dict_keys_on_load", None)
    if fix_keys is not None:
        fix_keys(state)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ModelLoadError(
            f"the weights in {folder} do not fit its config.json ({reason(err)})",
            "re-save the model with save_pretrained",
        ) from err
    return model.to(dtype)


class UNetField(torch.nn.Module):
    """``fn(x, native_time)`` for a ``UNet2DModel``: its ``sample`` output, without the variance channels
    of a model that also predicts its variance (``variance_type`` learned / learned_range)."""

    def __init__(self, unet: torch.nn.Module, channels: int | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.channels = channels
        self.eval()

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        out: Tensor = self.unet(x, t, return_dict=False)[0]
        return out if self.channels is None else out[:, : self.channels]


def check_unconditional(unet_dir: pathlib.Path) -> None:
    """Raise :class:`ModelLoadError` unless ``unet_dir`` holds an unconditional ``UNet2DModel``: a text- or
    class-conditional network has no single vector field without a choice of condition."""
    file = unet_dir / "config.json"
    cfg = read_json(file)
    if cfg is None:
        raise ModelLoadError(
            f"{file} {'is not a JSON object' if file.is_file() else 'is missing'}: the UNet's architecture is "
            "unknown without it",
            "download the model again, or restore the config.json saved with the weights",
        )
    if cfg.get("_class_name") != "UNet2DModel":
        raise ModelLoadError(
            f"{unet_dir} holds a {cfg.get('_class_name')!r}, not an unconditional UNet2DModel",
            "conditional (e.g. text-to-image) networks need a fixed condition: wrap them with a "
            "'module:factory' reference",
        )
    if cfg.get("num_class_embeds") or cfg.get("class_embed_type"):
        raise ModelLoadError(
            f"{unet_dir} holds a class-conditional UNet2DModel",
            "fix a class label in a wrapper and load it with a 'module:factory' reference",
        )


def model_config(model: torch.nn.Module) -> Any:
    """A diffusers model's ``config``, the FrozenDict of its constructor arguments read by attribute (torch
    types an unknown attribute of a ``Module`` as ``Tensor | Module``)."""
    return model.config


def sample_shape(config: Any) -> tuple[int, int, int]:
    """(C, H, W) of one UNet input from its config (``sample_size`` int or pair)."""
    size, channels = config.sample_size, config.in_channels
    hw = [size, size] if isinstance(size, int) else list(size) if isinstance(size, (list, tuple)) else None
    shape = [channels, *hw] if hw is not None else []
    if len(shape) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ModelLoadError(
            f"the UNet config has sample_size {size!r} and in_channels {channels!r}: not an image shape",
            "sample_size must be a positive integer or [height, width] and in_channels a positive integer; "
            "restore the config.json saved with the weights",
        )
    return (channels, shape[1], shape[2])


def check_options(options: dict[str, Any], accepted: tuple[str, ...] = OPTIONS) -> None:
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UsageError(f"unknown adapter option(s) {', '.join(unknown)}", f"accepted: {', '.join(accepted)}")


@dataclass
class LoadedUNet:
    """A folder's UNet2DModel ready for Jacobian products, with its provenance for :class:`ProbeInfo`."""

    unet: torch.nn.Module
    weights: WeightsFiles
    loader: str
    sha256: str
    files: dict[str, str]
    saved_with: str | None = None

    @property
    def data_range(self) -> tuple[float, float]:
        """[0, 1] for NCSN++-style UNets that centre their input inside, else [−1, 1]."""
        return (0.0, 1.0) if model_config(self.unet).center_input_sample else (-1.0, 1.0)

    def provenance(self) -> dict[str, Any]:
        """The ``ProbeInfo.extra`` entries every diffusers-folder adapter records."""
        import diffusers

        return {
            "weights_files": self.files,
            "weights_format": self.weights.format,
            "weights_variant": self.weights.variant,
            "weights_loader": self.loader,
            "config_diffusers_version": self.saved_with,
            "attention_processor": "AttnProcessor",
            "diffusers_version": diffusers.__version__,
        }


def load_unet(
    lay: Layout, *, device: torch.device | str, dtype: torch.dtype, trust_remote_code: bool, variant: str | None
) -> LoadedUNet:
    """The unconditional UNet2DModel of a folder layout, loaded safely, prepared and hashed."""
    import diffusers

    check_unconditional(lay.unet_dir)
    unet, weights, loader = load_component(
        diffusers.UNet2DModel, lay.unet_dir, dtype=dtype, trust_remote_code=trust_remote_code, variant=variant
    )
    digest, per_file = hash_files(weights.files, lay.root)
    saved_with = (read_json(lay.unet_dir / "config.json") or {}).get("_diffusers_version")
    return LoadedUNet(prepare(unet.to(device), dtype), weights, loader, digest, per_file, saved_with)
