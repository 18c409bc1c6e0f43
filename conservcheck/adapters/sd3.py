"""Flow-matching text-to-image transformers: Stable Diffusion 3 / 3.5-class pipelines.

A folder as the SD3 repositories publish it: ``model_index.json``, ``transformer/``
(``SD3Transformer2DModel``), ``scheduler/`` (``FlowMatchEulerDiscreteScheduler``), ``vae/``
(``AutoencoderKL`` with a ``shift_factor``), two CLIP text encoders with projection (``text_encoder/``,
``text_encoder_2/``) and their tokenizers, and optionally a T5 encoder (``text_encoder_3/``,
``tokenizer_3/``; without it the pipeline feeds zeros in its place, and so does the probe).

Units are those of :mod:`conservcheck.adapters.flow`: the scheduler noises as x_σ = (1 − σ) x0 + σ ε and
feeds the transformer ``timestep = σ · num_train_timesteps``; the transformer predicts the velocity
v̂ ≈ ε − x0, so with canonical flow time t = σ, ε̂ = x + (1 − t) v̂ and s = −ε̂/t. ``shift`` (3.0 for SD3)
and dynamic shifting only choose which σ a sampler visits, not this map. Coordinates are the scaled
latents z = scaling_factor · (E(image) − shift_factor).

The condition is the prompt: each prompt (and the negative or empty prompt) is encoded once with
diffusers' own ``StableDiffusion3Pipeline.encode_prompt`` — the CLIP penultimate hidden states
concatenated along features, zero-padded to the joint dimension and followed by the T5 states (or zeros),
plus the pooled CLIP projections — and the text encoders are freed. The field at guidance scale w is the
pipeline's v_∅ + w (v_c − v_∅) in score units. The transformer keeps its own (joint) attention
processors and runs scaled-dot-product attention on the composite ``math`` kernel, through which forward-
mode AD and double backward work.
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch
from torch import Tensor

from conservcheck.adapters._conditional import (
    LazyLatentProbe,
    autoencoder,
    free,
    latent_record,
    load_text_encoder,
    load_tokenizer,
    math_attention,
    pipeline_scheduler,
    quiet_libraries,
    require_transformers,
    required_prompts,
)
from conservcheck.adapters._diffusers import check_options, load_component, model_config, read_json
from conservcheck.adapters.flow import AffineTime, scheduler_time_scale
from conservcheck.adapters.weights import hash_files
from conservcheck.conditioning import ConditionalField
from conservcheck.errors import ModelLoadError
from conservcheck.parameterization import conversion
from conservcheck.probe import ProbeInfo
from conservcheck.process import FlowProcess

NAME = "sd3"
CONDITIONS = ("prompt", "negative_prompt")
_OPTIONS = ("precision", "variant", "max_sequence_length", *CONDITIONS)
TRANSFORMER_CLASS = "SD3Transformer2DModel"
MAX_SEQUENCE_LENGTH = 256


def detect(path: pathlib.Path) -> bool:
    """A pipeline folder whose ``transformer/`` is an SD3Transformer2DModel."""
    path = pathlib.Path(path)
    if not (path.is_dir() and (path / "model_index.json").is_file()):
        return False
    return (read_json(path / "transformer" / "config.json") or {}).get("_class_name") == TRANSFORMER_CLASS


class JointTransformer(torch.nn.Module):
    """``network(x, timestep, encoder_hidden_states, pooled_projections)``: the transformer's velocity."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor, pooled_projections: Tensor) -> Tensor:
        with math_attention():
            velocity: Tensor = self.transformer(
                hidden_states=x,
                timestep=t,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                return_dict=False,
            )[0]
        return velocity


def encode_prompts(
    path: pathlib.Path,
    transformer: torch.nn.Module,
    prompts: list[str],
    negative_prompt: str | None,
    *,
    device: Any,
    dtype: torch.dtype,
    variant: str | None,
    max_sequence_length: int,
) -> tuple[dict[str, Tensor], dict[str, Tensor], list[pathlib.Path]]:
    """(condition inputs [K, …], unconditional inputs [1, …], files read) through
    ``StableDiffusion3Pipeline.encode_prompt``; each distinct prompt is encoded once."""
    require_transformers(f"the SD3 pipeline {path.name}")
    with quiet_libraries():
        from diffusers import StableDiffusion3Pipeline

    parts: dict[str, Any] = {}
    files: list[pathlib.Path] = []
    for suffix in ("", "_2", "_3"):
        if suffix == "_3" and not (path / "text_encoder_3").is_dir():
            parts["text_encoder_3"] = parts["tokenizer_3"] = None
            continue
        parts[f"text_encoder{suffix}"], enc_files = load_text_encoder(
            path, f"text_encoder{suffix}", device=device, dtype=dtype, variant=variant
        )
        parts[f"tokenizer{suffix}"], tok_files = load_tokenizer(path, f"tokenizer{suffix}")
        files += enc_files + tok_files
    # mypy resolves diffusers' top-level pipeline names to the untyped placeholders it defines for a missing
    # torch or transformers; the object is the real pipeline
    pipe: Any = StableDiffusion3Pipeline(  # type: ignore[no-untyped-call]
        transformer=transformer, scheduler=None, vae=None, **parts
    )
    distinct = list(dict.fromkeys(prompts))
    with torch.no_grad(), quiet_libraries():
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt=distinct,
            prompt_2=None,
            prompt_3=None,
            device=torch.device(device),
            do_classifier_free_guidance=True,
            negative_prompt=[negative_prompt or ""] * len(distinct),
            max_sequence_length=max_sequence_length,
        )
    pick = [distinct.index(p) for p in prompts]
    conditions = {"encoder_hidden_states": cond[pick].to(dtype), "pooled_projections": pooled[pick].to(dtype)}
    null = {"encoder_hidden_states": uncond[:1].to(dtype).clone(), "pooled_projections": uncond_pooled[:1].to(dtype)}
    del pipe, parts
    free()
    return conditions, null, files


def load(
    path: pathlib.Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    **options: Any,
) -> LazyLatentProbe:
    """A conditional latent probe for an SD3-class pipeline folder.

    Options: ``prompt`` (a text or a list of texts), ``negative_prompt``, ``max_sequence_length`` (T5
    tokens, default 256 as the pipeline), ``precision``, ``variant``.
    """
    import diffusers

    check_options(options, _OPTIONS)
    path = pathlib.Path(path)
    if not detect(path):
        raise ModelLoadError(
            f"{path} is not an SD3-class pipeline folder",
            "expected model_index.json, transformer/ (SD3Transformer2DModel), scheduler/, vae/ and text encoders",
        )
    prompts, negative, conditioning = required_prompts(path, options)
    sched_cfg, sched_file = pipeline_scheduler(path)
    scale = scheduler_time_scale(sched_cfg, sched_file)
    variant = options.get("variant")
    model, weights, loader = load_component(
        diffusers.SD3Transformer2DModel,
        path / "transformer",
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        variant=variant,
    )
    # diffusers leaves an SD3 transformer asked for float64 in float32: the dtype is set here.
    with quiet_libraries():
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    ae_config, load_ae = autoencoder(
        path, device=device, dtype=dtype, trust_remote_code=trust_remote_code, variant=variant
    )
    conditions, null, text_files = encode_prompts(
        path,
        model,
        prompts,
        negative,
        device=device,
        dtype=dtype,
        variant=variant,
        max_sequence_length=int(options.get("max_sequence_length") or MAX_SEQUENCE_LENGTH),
    )
    config = model_config(model)
    c, size = int(config.in_channels), int(config.sample_size)
    digest, per_file = hash_files(list(weights.files) + text_files, path)
    field = ConditionalField(JointTransformer(model), conditions, null, conditioning)
    info = ProbeInfo(
        name=path.name,
        adapter=NAME,
        reference=str(path),
        weights_sha256=digest,
        trust_remote_code=bool(trust_remote_code),
        extra={
            "family": "flow",
            "scheduler": sched_cfg.get("_class_name"),
            "native_time": f"timestep = sigma * {scale:g}, float tensor [B] (t = sigma)",
            "native_range": [0.0, scale],
            "shift": sched_cfg.get("shift", 1.0),
            "use_dynamic_shifting": bool(sched_cfg.get("use_dynamic_shifting", False)),
            "output": "velocity eps - x0",
            "conversion": conversion("velocity", "flow"),
            **latent_record(ae_config, 1.0),
            "text_encoders": [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if (path / n).is_dir()],
            "text_embedding_shape": list(conditions["encoder_hidden_states"].shape[1:]),
            "condition_input": "encoder_hidden_states and pooled_projections (encode_prompt)",
            "guidance": "v_uncond + w (v_cond - v_uncond), one doubled batch",
            "weights_files": per_file,
            "weights_format": weights.format,
            "weights_loader": loader,
            "attention_processor": "the transformer's own, on the math SDPA kernel",
            "diffusers_version": diffusers.__version__,
        },
    )
    return LazyLatentProbe.for_pipeline(
        field,
        ae_config,
        load_ae,
        1.0,
        process=FlowProcess(),
        sample_shape=(c, size, size),
        parameterization="velocity",
        time_convention=AffineTime(scale),
        device=device,
        dtype=dtype,
        precision=options.get("precision"),
        info=info,
    )


__all__ = ["CONDITIONS", "NAME", "detect", "load"]
