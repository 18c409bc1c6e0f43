"""Class-conditional latent DiT pipelines (Peebles & Xie 2023; diffusers' ``DiTPipeline``).

A folder as facebook/DiT-XL-2-256 publishes it: ``model_index.json``, ``transformer/``
(``DiTTransformer2DModel``, or ``Transformer2DModel`` with ``norm_type: ada_norm_zero`` in older
conversions), ``vae/`` (``AutoencoderKL``) and ``scheduler/`` (DDPM family). The probe lives in the
latent space (scaled latents, as :mod:`conservcheck.adapters.latent`'s), the DDPM index k is fed as a float
tensor [B], and units follow the scheduler (DiT predicts ε).

*Learned sigma*: a DiT with ``out_channels = 2 C`` predicts ε in its first C channels and its variance in
the other C; the probe uses the first C, as the pipeline does (``torch.split(noise_pred, C)``).

The condition is the class label y ∈ {0, …, N − 1} (``num_embeds_ada_norm`` = N classes); the
unconditional input is the null class N that classifier-free training drops labels to (1000 for the
ImageNet models, the label the pipeline pairs with every sample). ``class_label``: one label, a list
(sample i gets label i mod K) or ``"random"`` (a seeded draw per sample). The field at guidance scale w
is the pipeline's ε_∅ + w (ε_y − ε_∅) (:mod:`conservcheck.conditioning`).
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch
from torch import Tensor

from conservcheck.adapters._conditional import (
    LazyLatentProbe,
    denoiser_and_autoencoder,
    latent_record,
    pipeline_scheduler,
)
from conservcheck.adapters._diffusers import (
    check_options,
    model_config,
    read_json,
    scheduler_units,
)
from conservcheck.adapters.weights import hash_files
from conservcheck.conditioning import ConditionalField, class_conditioning
from conservcheck.errors import ModelLoadError
from conservcheck.probe import ProbeInfo

NAME = "dit"
CONDITIONS = ("class_label",)
_OPTIONS = ("precision", "variant", *CONDITIONS)
CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")


def _config(path: pathlib.Path) -> dict[str, Any] | None:
    return read_json(path / "transformer" / "config.json")


def detect(path: pathlib.Path) -> bool:
    """A pipeline folder whose ``transformer/`` is a class-conditional DiT (adaLN-Zero, class embeddings)."""
    path = pathlib.Path(path)
    if not (path.is_dir() and (path / "model_index.json").is_file()):
        return False
    cfg = _config(path) or {}
    if cfg.get("_class_name") == "DiTTransformer2DModel":
        return True
    return cfg.get("_class_name") == "Transformer2DModel" and cfg.get("norm_type") == "ada_norm_zero"


class LabelledTransformer(torch.nn.Module):
    """``network(x, k, class_labels)``: the DiT's ε channels."""

    def __init__(self, transformer: torch.nn.Module, channels: int | None) -> None:
        super().__init__()
        self.transformer = transformer
        self.channels = channels

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor) -> Tensor:
        out: Tensor = self.transformer(x, timestep=t, class_labels=class_labels, return_dict=False)[0]
        return out if self.channels is None else out[:, : self.channels]


def load(
    path: pathlib.Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    **options: Any,
) -> LazyLatentProbe:
    """A conditional latent probe for a DiT pipeline folder.

    Options: ``class_label`` (a label, a list of labels or ``"random"``), ``precision``, ``variant``.
    """
    import diffusers

    check_options(options, _OPTIONS)
    path = pathlib.Path(path)
    if not detect(path):
        raise ModelLoadError(
            f"{path} is not a DiT pipeline folder",
            "expected model_index.json, transformer/ (DiTTransformer2DModel), vae/ and scheduler/",
        )
    cfg = _config(path) or {}
    n_classes = cfg.get("num_embeds_ada_norm")
    if not isinstance(n_classes, int) or n_classes < 1:
        raise ModelLoadError(
            f"{path / 'transformer'} has no class embedding (num_embeds_ada_norm = {n_classes!r})",
            "restore the transformer's config.json",
        )
    conditioning, labels = class_conditioning(options.get("class_label"), n_classes, n_classes, "the null class")
    units = scheduler_units(*pipeline_scheduler(path))
    variant = options.get("variant")
    model, weights, loader, ae_config, load_ae = denoiser_and_autoencoder(
        path,
        diffusers.DiTTransformer2DModel,
        "transformer",
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        variant=variant,
    )
    config = model_config(model)
    c, size = int(config.in_channels), int(config.sample_size)
    out = int(config.out_channels or c)
    channels = c if out == 2 * c else None
    digest, per_file = hash_files(weights.files, path)
    field = ConditionalField(
        LabelledTransformer(model, channels),
        {"class_labels": labels},
        {"class_labels": torch.tensor([n_classes])},
        conditioning,
    )
    info = ProbeInfo(
        name=path.name,
        adapter=NAME,
        reference=str(path),
        weights_sha256=digest,
        trust_remote_code=bool(trust_remote_code),
        extra={
            "family": "dit",
            **units.extra,
            **latent_record(ae_config, 0.18215),
            "learned_sigma": channels is not None,
            "output": "eps: the first C of 2C channels" if channels is not None else units.extra.get("output"),
            "condition_input": f"class_labels [B] in 0..{n_classes - 1}; null class {n_classes}",
            "guidance": "eps_uncond + w (eps_cond - eps_uncond), one doubled batch",
            "weights_files": per_file,
            "weights_format": weights.format,
            "weights_loader": loader,
            "attention_processor": "AttnProcessor",
            "diffusers_version": diffusers.__version__,
        },
    )
    return LazyLatentProbe.for_pipeline(
        field,
        ae_config,
        load_ae,
        0.18215,
        process=units.process,
        sample_shape=(c, size, size),
        parameterization=units.parameterization,
        time_convention=units.time_convention,
        device=device,
        dtype=dtype,
        precision=options.get("precision"),
        info=info,
    )


__all__ = ["CONDITIONS", "NAME", "detect", "load"]
