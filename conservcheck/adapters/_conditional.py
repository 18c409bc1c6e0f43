"""What the conditional-pipeline adapters share: text encoders, a lazily loaded autoencoder, differentiable
attention, and freeing what only loading needed.

Used by ``text_to_image`` (Stable Diffusion 1.x / 2.x), ``dit`` (class-conditional DiT) and ``sd3`` (flow
transformers); not an adapter itself. Text encoders need ``transformers`` — the ``text`` extra
(``pip install transformers``); without it, loading such a pipeline fails with one line saying so
and nothing else is affected. Every model library is imported lazily, inside the functions.

Memory: the text encoders are loaded, run once on every distinct prompt (and the negative or empty
prompt), and freed before the probe is returned — the probe keeps only the embeddings. The autoencoder is
read only when images must be encoded into latents (``--data`` with images) and freed by the audit once x0
is ready (:meth:`LazyLatentProbe.release`).
"""

from __future__ import annotations

import contextlib
import gc
import pathlib
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

import torch

from conservcheck.adapters._diffusers import AUTOENCODERS, _quiet_diffusers, load_component, read_json
from conservcheck.adapters.latent import LatentProbe
from conservcheck.adapters.weights import WeightsFiles, check_safetensors, find_weights
from conservcheck.conditioning import Conditioning, text_conditioning
from conservcheck.errors import ModelLoadError, UsageError, reason

TEXT_EXTRA_HINT = "pip install transformers (the text extra)"
TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")
TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast")


def require_transformers(what: str) -> Any:
    """``transformers``, or a one-line ModelLoadError naming the extra that provides it."""
    try:
        import transformers
    except ImportError:
        raise ModelLoadError(
            f"{what} needs the transformers library for its text encoder, which is not installed", TEXT_EXTRA_HINT
        ) from None
    return transformers


def _transformers_logging() -> ModuleType | None:
    """``transformers.utils.logging``, or None without transformers."""
    try:
        from transformers.utils import logging
    except ImportError:
        return None
    return logging


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """diffusers' and transformers' loggers and progress bars silenced while loading."""
    tlog = _transformers_logging()
    level = tlog.get_verbosity() if tlog is not None else None
    if tlog is not None:
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    try:
        with _quiet_diffusers():
            yield
    finally:
        if tlog is not None:
            tlog.set_verbosity(level)
            tlog.enable_progress_bar()


def free(*modules: Any) -> None:
    """Drop the references held here, collect, and return cached CUDA memory."""
    del modules
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def component_class(root: pathlib.Path, name: str, allowed: Sequence[str]) -> str:
    """The class ``model_index.json`` names for component ``name``, which must be one of ``allowed``."""
    entry = (read_json(root / "model_index.json") or {}).get(name)
    cls = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    if cls not in allowed:
        raise ModelLoadError(
            f"{root / 'model_index.json'} names {cls!r} for {name}, expected one of {', '.join(allowed)}",
            "restore the pipeline's model_index.json",
        )
    return str(cls)


def _text_weights(folder: pathlib.Path, variant: str | None) -> WeightsFiles:
    """transformers' weights files: ``model.safetensors`` first, else ``pytorch_model.bin`` (sharded too)."""
    try:
        weights = find_weights(folder, "model", variant)
        if weights.use_safetensors:
            return weights
    except ModelLoadError:
        pass
    return find_weights(folder, "pytorch_model", variant)


def load_text_encoder(
    root: pathlib.Path, name: str, *, device: Any, dtype: torch.dtype, variant: str | None
) -> tuple[torch.nn.Module, list[pathlib.Path]]:
    """A pipeline's text encoder ``name`` (``text_encoder``, ``text_encoder_2``, …) through transformers:
    safetensors when present (checked first), else ``.bin`` read with ``torch.load(weights_only=True)``;
    weights that leave parameters uninitialised are refused. Returns (encoder in eval mode, files read)."""
    transformers = require_transformers(f"the pipeline {root.name}")
    cls = getattr(transformers, component_class(root, name, TEXT_ENCODERS))
    folder = root / name
    weights = _text_weights(folder, variant)
    if weights.use_safetensors:
        for f in weights.files:
            check_safetensors(f)
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        with quiet_libraries():
            model, info = cls.from_pretrained(
                str(folder),
                use_safetensors=weights.use_safetensors,
                variant=variant,
                output_loading_info=True,
                **{dtype_kw: dtype},
            )
    except Exception as err:
        raise ModelLoadError(
            f"transformers could not load {cls.__name__} from {folder} ({reason(err)})",
            "check that the folder is a complete saved text encoder",
        ) from err
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise ModelLoadError(
            f"the weights in {folder} lack {len(missing)} parameters of its config.json (first: {missing[0]})",
            "restore the config.json saved with these weights",
        )
    return model.to(device).eval().requires_grad_(False), list(weights.files)


def load_tokenizer(root: pathlib.Path, name: str) -> tuple[Any, list[pathlib.Path]]:
    """A pipeline's tokenizer ``name`` (its files are hashed with the weights: they decide the embeddings)."""
    transformers = require_transformers(f"the pipeline {root.name}")
    cls = getattr(transformers, component_class(root, name, TOKENIZERS))
    folder = root / name
    try:
        with quiet_libraries():
            tok = cls.from_pretrained(str(folder))
    except Exception as err:
        raise ModelLoadError(
            f"transformers could not load the tokenizer {cls.__name__} from {folder} ({reason(err)})",
            "check that the folder holds the tokenizer's files (vocab.json and merges.txt, or tokenizer.json)",
        ) from err
    return tok, sorted(p for p in folder.iterdir() if p.is_file())


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Scaled-dot-product attention on its composite ``math`` kernel: forward-mode AD and double backward
    work through it (the fused CPU flash and CUDA memory-efficient kernels have neither); outputs agree
    with the fused kernels up to floating-point rounding."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


class LazyLatentProbe(LatentProbe):
    """A :class:`~conservcheck.adapters.latent.LatentProbe` whose autoencoder is read only when images are
    encoded or latents decoded, and freed by :meth:`release`; ``image_shape`` comes from its config."""

    def __init__(
        self, fn: Any, *, load_autoencoder: Callable[[], torch.nn.Module], ae_config: dict[str, Any], **kwargs: Any
    ):
        self._load_autoencoder = load_autoencoder
        self._ae_config = ae_config
        self._autoencoder: torch.nn.Module | None = None
        # None goes through the setter below: the autoencoder is read on first use
        super().__init__(fn, autoencoder=None, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def for_pipeline(
        cls,
        fn: Any,
        ae_config: dict[str, Any],
        load_autoencoder: Callable[[], torch.nn.Module],
        default_scale: float,
        **kwargs: Any,
    ) -> LazyLatentProbe:
        """The probe of a pipeline whose ``vae/`` is an AutoencoderKL over images in [−1, 1]: latents
        z = scaling_factor · (E(image) − shift_factor), the factors from its config (``default_scale`` where
        the config has none, as the pipeline does)."""
        return cls(
            fn,
            load_autoencoder=load_autoencoder,
            ae_config=ae_config,
            kind="kl",
            scaling_factor=float(ae_config.get("scaling_factor", default_scale)),
            shift_factor=ae_config.get("shift_factor"),
            data_range=(-1.0, 1.0),
            **kwargs,
        )

    @property
    def autoencoder(self) -> torch.nn.Module:
        if self._autoencoder is None:
            self._autoencoder = self._load_autoencoder()
        return self._autoencoder

    @autoencoder.setter
    def autoencoder(self, value: torch.nn.Module | None) -> None:
        self._autoencoder = value

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """[C, H, W] of the images ``encode`` takes (the autoencoder halves H and W per down block but the last)."""
        factor = 2 ** (len(self._ae_config.get("block_out_channels", [0])) - 1)
        _, h, w = self.sample_shape
        return int(self._ae_config.get("in_channels", 3)), h * factor, w * factor

    def release(self) -> None:
        """Free the autoencoder (read again if images are encoded later)."""
        if self._autoencoder is not None:
            self._autoencoder = None
            free()


def autoencoder(
    root: pathlib.Path, *, device: Any, dtype: torch.dtype, trust_remote_code: bool, variant: str | None
) -> tuple[dict[str, Any], Callable[[], torch.nn.Module]]:
    """The pipeline's ``vae/`` config (read now) and a loader of the AutoencoderKL itself (called lazily)."""
    from conservcheck.adapters._diffusers import prepare

    folder = root / "vae"
    config = read_json(folder / "config.json")
    if config is None or config.get("_class_name") != AUTOENCODERS["vae"]:
        found = None if config is None else config.get("_class_name")
        raise ModelLoadError(f"{folder} holds a {found!r}, expected AutoencoderKL", "restore the pipeline's vae/")

    def load() -> torch.nn.Module:
        import diffusers

        ae, _, _ = load_component(
            diffusers.AutoencoderKL, folder, dtype=dtype, trust_remote_code=trust_remote_code, variant=variant
        )
        return prepare(ae.to(device), dtype)

    return config, load


def denoiser_and_autoencoder(
    root: pathlib.Path,
    cls: Any,
    subfolder: str,
    *,
    device: Any,
    dtype: torch.dtype,
    trust_remote_code: bool,
    variant: str | None,
) -> tuple[torch.nn.Module, WeightsFiles, str, dict[str, Any], Callable[[], torch.nn.Module]]:
    """A latent pipeline's denoiser ``root/subfolder`` (class ``cls``), ready for the probe, with its weights
    files and loader, and the ``vae/`` config with the lazy loader of its AutoencoderKL (:func:`autoencoder`)."""
    from conservcheck.adapters._diffusers import prepare

    model, weights, loader = load_component(
        cls, root / subfolder, dtype=dtype, trust_remote_code=trust_remote_code, variant=variant
    )
    model = prepare(model.to(device), dtype)
    ae_config, load_ae = autoencoder(
        root, device=device, dtype=dtype, trust_remote_code=trust_remote_code, variant=variant
    )
    return model, weights, loader, ae_config, load_ae


def required_prompts(path: pathlib.Path, options: dict[str, Any]) -> tuple[list[str], str | None, Conditioning]:
    """A text-to-image pipeline's ``prompt`` option as a list (one line naming ``--prompt`` when it is missing),
    its ``negative_prompt`` and their :class:`~conservcheck.conditioning.Conditioning`."""
    prompt = options.get("prompt")
    if prompt is None:
        raise UsageError(
            f"{path.name} is a text-to-image model: it needs a prompt",
            "pass --prompt TEXT (repeat it for several; --prompt '' for the unconditional field)",
        )
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negative = options.get("negative_prompt")
    return prompts, negative, text_conditioning(prompts, negative)


def pipeline_scheduler(root: pathlib.Path) -> tuple[dict[str, Any], str]:
    """The pipeline's ``scheduler/scheduler_config.json`` and its path (for messages), or a one-line error."""
    file = root / "scheduler" / "scheduler_config.json"
    config = read_json(file)
    if config is None:
        raise ModelLoadError(f"{file} is missing or not a JSON object", "restore the pipeline's scheduler/")
    return config, str(file)


def latent_record(ae_config: dict[str, Any], default_scale: float) -> dict[str, Any]:
    """The report's record of a pipeline's latent space (AutoencoderKL coordinates)."""
    return {
        "latent": True,
        "autoencoder": "AutoencoderKL",
        "scaling_factor": float(ae_config.get("scaling_factor", default_scale)),
        "shift_factor": ae_config.get("shift_factor"),
        "latent_coordinates": "z = scaling_factor * (E(image) - shift_factor)",
    }


__all__ = [
    "LazyLatentProbe",
    "TEXT_EXTRA_HINT",
    "autoencoder",
    "component_class",
    "denoiser_and_autoencoder",
    "free",
    "latent_record",
    "load_text_encoder",
    "load_tokenizer",
    "math_attention",
    "pipeline_scheduler",
    "quiet_libraries",
    "required_prompts",
    "require_transformers",
]
