"""Latent diffusion: a diffusers pipeline whose UNet denoises an autoencoder's latents.

A folder with ``model_index.json`` naming a ``unet`` (an unconditional ``UNet2DModel``), a ``scheduler`` and
an autoencoder — ``vae`` (``AutoencoderKL``) or ``vqvae`` (``VQModel``, e.g. CompVis/ldm-celebahq-256) —
each in its subfolder (or at the root, as diffusers allows: :func:`~._diffusers.layout`).
The probe lives in latent space: ``sample_shape`` is the UNet's input shape and the units follow the
scheduler exactly as for pixel models (:mod:`conservcheck.adapters.diffusers_unet`).

Where the scaling lives: the UNet sees *scaled* latents z = scaling_factor · (E(image) − shift_factor),
with ``scaling_factor`` (and ``shift_factor``, None for most models) from the autoencoder's config, as the
pipelines do (they decode with image = D(z / scaling_factor + shift_factor)). A VQModel config saved before
the key existed (CompVis/ldm-celebahq-256's) means unscaled latents, 1.0, not diffusers' current default
0.18215 (:func:`latent_scaling`; ``scaling_factor_source`` in the report says which). The probe's coordinates are
these scaled latents; :meth:`LatentProbe.encode` maps images in [−1, 1] to clean scaled latents (the
posterior mode for AutoencoderKL; the pre-quantisation latents for VQModel, which quantises inside
``decode``), and :meth:`LatentProbe.decode` maps latents back to images. ``data_range`` is nominal
(−1, 1): scaled latents have roughly unit variance but no fixed bounds; images have ``image_range``.
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch
from torch import Tensor

from conservcheck.adapters._diffusers import (
    AUTOENCODERS,
    UNetField,
    check_options,
    check_unconditional,
    layout,
    load_component,
    model_config,
    prepare,
    read_json,
    read_scheduler_config,
    sample_shape,
    scheduler_units,
)
from conservcheck.adapters.weights import hash_files
from conservcheck.errors import ModelLoadError, UsageError
from conservcheck.probe import ProbeInfo, VectorFieldProbe

NAME = "latent"

IMAGE_RANGE = (-1.0, 1.0)
#: The scaling of a VQModel whose config.json has no ``scaling_factor`` key: configs written before diffusers
#: 0.13 had none, and LDMPipeline fed the UNet unscaled latents until diffusers 0.22 (diffusers issue #6725:
#: the current default 0.18215 breaks CompVis/ldm-celebahq-256).
LEGACY_VQ_SCALING = 1.0


def detect(path: pathlib.Path) -> bool:
    """A diffusers pipeline whose UNet works on the latents of an autoencoder (vae/ or vqvae/)."""
    lay = layout(pathlib.Path(path))
    return lay is not None and lay.autoencoder is not None


def latent_scaling(ae_config: dict[str, Any], cls_name: str, loaded: Any) -> tuple[float, str]:
    """(scaling_factor, where it came from) for an autoencoder config as saved on disk.

    The saved value when the key is present. Without it: 1.0 for a VQModel (see :data:`LEGACY_VQ_SCALING`),
    diffusers' default for an AutoencoderKL (0.18215, the constant Stable Diffusion's pipelines used before
    the key existed).
    """
    if "scaling_factor" in ae_config:
        return float(loaded), "config.json"
    if cls_name == "VQModel":
        return LEGACY_VQ_SCALING, (
            "absent from config.json (written before diffusers 0.13): 1.0, the unscaled latents LDMPipeline used "
            "until diffusers 0.22"
        )
    return float(loaded), f"absent from config.json: diffusers' default {float(loaded):g}"


class LatentProbe(VectorFieldProbe):
    """A probe in a latent space, with the autoencoder that maps images to and from it.

    ``encode(images)`` takes images [B, C, H, W] in ``image_range`` and returns clean scaled latents
    [B, *sample_shape] (the x0 of an audit); ``decode(latents)`` is its inverse up to the autoencoder's
    reconstruction error. Both run without gradients, ``batch_size`` images at a time.
    """

    def __init__(
        self,
        fn: Any,
        *,
        autoencoder: torch.nn.Module,
        kind: str,
        scaling_factor: float,
        shift_factor: float | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(fn, **kwargs)
        self.autoencoder = autoencoder
        self.kind = kind
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = None if shift_factor is None else float(shift_factor)
        self.image_range = IMAGE_RANGE

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """[C, H, W] of the images ``encode`` takes: each of the autoencoder's down blocks but the last
        halves the resolution (diffusers' Encoder), so H = h · 2^(blocks − 1) for latents [c, h, w]."""
        cfg = model_config(self.autoencoder)
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        _, h, w = self.sample_shape
        return int(cfg.in_channels), h * factor, w * factor

    def _chunks(self, x: Tensor, batch_size: int, fn: Any) -> Tensor:
        if batch_size < 1:
            raise UsageError(f"batch_size must be positive, got {batch_size}", "pass batch_size >= 1")
        with torch.no_grad():
            return torch.cat([fn(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])

    def encode(self, images: Tensor, batch_size: int = 16) -> Tensor:
        """Images in [−1, 1] → clean latents scaling_factor · (E(x) − shift_factor)."""
        ae = self.autoencoder
        shift = self.shift_factor or 0.0

        def one(x: Tensor) -> Tensor:
            x = x.to(device=self.device, dtype=self.dtype)
            # torch types a Module's attributes as Tensor | Module, not as diffusers' encode method
            encoded = ae.encode(x)  # type: ignore[operator]
            z: Tensor = encoded.latents if self.kind == "vq" else encoded.latent_dist.mode()
            return (z - shift) * self.scaling_factor

        return self._chunks(images, batch_size, one)

    def decode(self, latents: Tensor, batch_size: int = 16) -> Tensor:
        """Scaled latents → images D(z / scaling_factor + shift_factor), nominally in [−1, 1]."""
        shift = self.shift_factor or 0.0

        def one(z: Tensor) -> Tensor:
            z = z.to(device=self.device, dtype=self.dtype) / self.scaling_factor + shift
            # torch types a Module's attributes as Tensor | Module, not as diffusers' decode method
            images: Tensor = self.autoencoder.decode(z).sample  # type: ignore[operator]
            return images

        return self._chunks(latents, batch_size, one)


def load(
    path: pathlib.Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    **options: Any,
) -> LatentProbe:
    """A latent-space probe for a diffusers latent pipeline folder. Options: ``precision``, ``variant``."""
    import diffusers

    check_options(options)
    path = pathlib.Path(path)
    lay = layout(path)
    if lay is None or lay.autoencoder is None:
        raise ModelLoadError(
            f"{path} is not a latent diffusion pipeline folder",
            "expected model_index.json naming a unet, a scheduler and a vae or vqvae",
        )
    sched_cfg = read_scheduler_config(lay)
    units = scheduler_units(sched_cfg, str(lay.scheduler_config))
    check_unconditional(lay.unet_dir)
    ae_dir = lay.autoencoder_dir
    assert ae_dir is not None
    ae_cls_name = AUTOENCODERS[lay.autoencoder]
    ae_file = ae_dir / "config.json"
    ae_config = read_json(ae_file)
    if ae_config is None:
        raise ModelLoadError(
            f"{ae_file} {'is not a JSON object' if ae_file.is_file() else 'is missing'}",
            "download the model again, or restore the autoencoder's config.json",
        )
    found = ae_config.get("_class_name")
    if found != ae_cls_name:
        raise ModelLoadError(
            f"{ae_dir} holds a {found!r}, expected {ae_cls_name}", "re-save the autoencoder with save_pretrained"
        )

    variant = options.get("variant")
    unet, unet_w, loader = load_component(
        diffusers.UNet2DModel, lay.unet_dir, dtype=dtype, trust_remote_code=trust_remote_code, variant=variant
    )
    ae, ae_w, ae_loader = load_component(
        getattr(diffusers, ae_cls_name), ae_dir, dtype=dtype, trust_remote_code=trust_remote_code, variant=variant
    )
    unet = prepare(unet.to(device), dtype)
    ae = prepare(ae.to(device), dtype)
    unet_config = model_config(unet)
    shape = sample_shape(unet_config)
    channels = shape[0] if units.learned_variance and unet_config.out_channels == 2 * shape[0] else None
    scaling, scaling_source = latent_scaling(ae_config, ae_cls_name, model_config(ae).scaling_factor)
    shift = getattr(model_config(ae), "shift_factor", None)
    digest, per_file = hash_files(unet_w.files + ae_w.files, path)
    info = ProbeInfo(
        name=path.name,
        adapter=NAME,
        reference=str(path),
        weights_sha256=digest,
        trust_remote_code=bool(trust_remote_code),
        extra={
            "family": units.family,
            **units.extra,
            "latent": True,
            "autoencoder": ae_cls_name,
            "scaling_factor": scaling,
            "scaling_factor_source": scaling_source,
            "shift_factor": shift,
            "latent_coordinates": "z = scaling_factor * (E(image) - shift_factor)",
            "image_range": list(IMAGE_RANGE),
            "data_range": [-1.0, 1.0],
            "weights_files": per_file,
            "weights_format": unet_w.format if unet_w.format == ae_w.format else f"{unet_w.format}+{ae_w.format}",
            "weights_variant": unet_w.variant,
            "config_diffusers_version": (read_json(lay.unet_dir / "config.json") or {}).get("_diffusers_version"),
            "weights_loader": loader if loader == ae_loader else f"{loader}+{ae_loader}",
            "attention_processor": "AttnProcessor",
            "diffusers_version": diffusers.__version__,
        },
    )
    return LatentProbe(
        UNetField(unet, channels),
        autoencoder=ae,
        kind="vq" if ae_cls_name == "VQModel" else "kl",
        scaling_factor=scaling,
        shift_factor=shift,
        process=units.process,
        sample_shape=shape,
        parameterization=units.parameterization,
        time_convention=units.time_convention,
        data_range=(-1.0, 1.0),
        device=device,
        dtype=dtype,
        precision=options.get("precision"),
        info=info,
    )
