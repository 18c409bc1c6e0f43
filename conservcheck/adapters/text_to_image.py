"""Latent text-to-image UNet pipelines: Stable Diffusion 1.x / 2.x and their fine-tunes.

A pipeline folder as published on the Hub (e.g. the Stable Diffusion 1.5 and 2.1 repositories):
``model_index.json``, ``unet/`` (``UNet2DConditionModel``), ``text_encoder/`` (``CLIPTextModel``),
``tokenizer/`` (``CLIPTokenizer``: ``vocab.json``, ``merges.txt``), ``scheduler/`` and ``vae/``
(``AutoencoderKL``); ``safety_checker/`` and ``feature_extractor/`` are ignored. The probe lives in the
UNet's latent space, like :mod:`conservcheck.adapters.latent`'s: coordinates are the scaled latents
z = scaling_factor · E(image), and the units follow the scheduler exactly as for pixel models (DDPM index
k fed as a float tensor [B]; ``epsilon`` — SD 1.x — or ``v_prediction`` — SD 2.x 768 — becomes the
epsilon or v parameterization on the OU process observed at t_k = −½ log ᾱ_k).

The condition is the prompt: each prompt (and the negative prompt, or the empty prompt, the
unconditional input) is encoded once, with diffusers' own ``StableDiffusionPipeline.encode_prompt``,
into the CLIP hidden states the UNet attends to (``encoder_hidden_states`` [1, 77, d]); the text encoder
is then freed. The field at guidance scale w is the pipeline's ε_∅ + w (ε_c − ε_∅) in score units
(:mod:`conservcheck.conditioning`). SDXL-class pipelines (a second text encoder, added time ids) and UNets
with class or image embeddings are refused with a one-line reason.

The UNet gets the diffusers adapter's hygiene (classic attention, frozen, contiguous GroupNorm inputs).
Provenance: ``weights_sha256`` covers the UNet, the text encoder and the tokenizer's files — everything
that decides the field; the autoencoder, read only to encode ``--data`` images, is not part of it.
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch
from torch import Tensor

from conservcheck.adapters._conditional import (
    LazyLatentProbe,
    denoiser_and_autoencoder,
    free,
    latent_record,
    load_text_encoder,
    load_tokenizer,
    pipeline_scheduler,
    quiet_libraries,
    require_transformers,
    required_prompts,
)
from conservcheck.adapters._diffusers import (
    check_options,
    model_config,
    read_json,
    scheduler_units,
)
from conservcheck.adapters.weights import hash_files
from conservcheck.conditioning import ConditionalField
from conservcheck.errors import ModelLoadError
from conservcheck.probe import ProbeInfo

NAME = "text_to_image"
CONDITIONS = ("prompt", "negative_prompt")
_OPTIONS = ("precision", "variant", *CONDITIONS)
UNET_CLASS = "UNet2DConditionModel"


def detect(path: pathlib.Path) -> bool:
    """A diffusers pipeline folder whose ``unet/`` holds a UNet2DConditionModel beside a text encoder."""
    path = pathlib.Path(path)
    if not (path.is_dir() and (path / "model_index.json").is_file() and (path / "text_encoder").is_dir()):
        return False
    return (read_json(path / "unet" / "config.json") or {}).get("_class_name") == UNET_CLASS


class CrossAttentionUNet(torch.nn.Module):
    """``network(x, k, encoder_hidden_states)``: the UNet's ``sample`` output (its first C channels when it
    also predicts a variance)."""

    def __init__(self, unet: torch.nn.Module, channels: int | None) -> None:
        super().__init__()
        self.unet = unet
        self.channels = channels

    def forward(self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor) -> Tensor:
        out: Tensor = self.unet(x, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        return out if self.channels is None else out[:, : self.channels]


def _refuse_unsupported(path: pathlib.Path, unet_cfg: dict[str, Any]) -> None:
    if (path / "text_encoder_2").is_dir() or unet_cfg.get("addition_embed_type"):
        raise ModelLoadError(
            f"{path} is an SDXL-class pipeline (a second text encoder, added time and text embeddings)",
            "such pipelines are not supported yet; wrap the UNet with a 'module:factory' reference",
        )
    for key in ("class_embed_type", "num_class_embeds", "encoder_hid_dim_type"):
        if unet_cfg.get(key):
            raise ModelLoadError(
                f"{path / 'unet'} takes more than a prompt ({key} = {unet_cfg[key]!r})",
                "wrap the UNet with its extra inputs fixed in a 'module:factory' reference",
            )


def encode_prompts(
    path: pathlib.Path,
    prompts: list[str],
    negative_prompt: str | None,
    *,
    device: Any,
    dtype: torch.dtype,
    variant: str | None,
) -> tuple[Tensor, Tensor, list[pathlib.Path]]:
    """(prompt embeddings [K, L, d], unconditional embedding [1, L, d], files read) through
    ``StableDiffusionPipeline.encode_prompt``; each distinct prompt is encoded once."""
    require_transformers(f"the text-to-image pipeline {path.name}")
    with quiet_libraries():
        from diffusers import StableDiffusionPipeline

    encoder, enc_files = load_text_encoder(path, "text_encoder", device=device, dtype=dtype, variant=variant)
    tokenizer, tok_files = load_tokenizer(path, "tokenizer")
    distinct = list(dict.fromkeys(prompts))
    # mypy resolves diffusers' top-level pipeline names to the untyped placeholders it defines for a missing
    # torch or transformers; the object is the real pipeline
    pipe: Any = StableDiffusionPipeline(  # type: ignore[no-untyped-call]
        vae=None,
        text_encoder=encoder,
        tokenizer=tokenizer,
        unet=None,
        scheduler=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with torch.no_grad(), quiet_libraries():
        cond, uncond = pipe.encode_prompt(
            distinct, torch.device(device), 1, True, negative_prompt=[negative_prompt or ""] * len(distinct)
        )
    rows = torch.stack([cond[distinct.index(p)] for p in prompts]).to(dtype)
    null = uncond[:1].to(dtype).clone()
    del pipe, encoder, tokenizer
    free()
    return rows, null, enc_files + tok_files


def load(
    path: pathlib.Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    **options: Any,
) -> LazyLatentProbe:
    """A conditional latent probe for a text-to-image UNet pipeline folder.

    Options: ``prompt`` (a text or a list of texts, sample i getting prompt i mod K), ``negative_prompt``
    (the unconditional input; default the empty prompt), ``precision``, ``variant``.
    """
    import diffusers

    check_options(options, _OPTIONS)
    path = pathlib.Path(path)
    if not detect(path):
        raise ModelLoadError(
            f"{path} is not a text-to-image UNet pipeline folder",
            "expected model_index.json, unet/ (UNet2DConditionModel), text_encoder/, tokenizer/, scheduler/, vae/",
        )
    prompts, negative, conditioning = required_prompts(path, options)
    unet_cfg = read_json(path / "unet" / "config.json") or {}
    _refuse_unsupported(path, unet_cfg)
    units = scheduler_units(*pipeline_scheduler(path))
    variant = options.get("variant")
    unet, unet_w, loader, ae_config, load_ae = denoiser_and_autoencoder(
        path,
        diffusers.UNet2DConditionModel,
        "unet",
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        variant=variant,
    )
    embeddings, null, text_files = encode_prompts(path, prompts, negative, device=device, dtype=dtype, variant=variant)
    config = model_config(unet)
    c = int(config.in_channels)
    size = config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    channels = c if int(config.out_channels) == 2 * c else None
    digest, per_file = hash_files(list(unet_w.files) + text_files, path)
    field = ConditionalField(
        CrossAttentionUNet(unet, channels),
        {"encoder_hidden_states": embeddings},
        {"encoder_hidden_states": null},
        conditioning,
    )
    info = ProbeInfo(
        name=path.name,
        adapter=NAME,
        reference=str(path),
        weights_sha256=digest,
        trust_remote_code=bool(trust_remote_code),
        extra={
            "family": "text_to_image",
            **units.extra,
            **latent_record(ae_config, 0.18215),
            "text_encoder": (read_json(path / "model_index.json") or {}).get("text_encoder", [None, None])[1],
            "text_embedding_shape": list(embeddings.shape[1:]),
            "condition_input": "encoder_hidden_states: the prompt's CLIP hidden states (encode_prompt)",
            "guidance": "eps_uncond + w (eps_cond - eps_uncond), one doubled batch",
            "weights_files": per_file,
            "weights_format": unet_w.format,
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
        sample_shape=(c, int(h), int(w)),
        parameterization=units.parameterization,
        time_convention=units.time_convention,
        device=device,
        dtype=dtype,
        precision=options.get("precision"),
        info=info,
    )


__all__ = ["CONDITIONS", "NAME", "detect", "encode_prompts", "load"]
