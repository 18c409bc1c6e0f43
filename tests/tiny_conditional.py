"""Tiny conditional pipelines built from the real classes and saved in their published layouts.

* a CLIP tokenizer written as the Hub ships it (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
  ``special_tokens_map.json``) from a 60-token vocabulary: lower-case letters, their word-final forms, two
  merges and the start/end tokens — no download;
* ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` of 2 layers and 32 (or 16) hidden units;
* Stable Diffusion 1.x / 2.x folders: ``UNet2DConditionModel`` (cross-attention to 32-d text states),
  ``AutoencoderKL`` (16×16 images ↔ 4×8×8 latents, scaling 0.5), the text encoder and tokenizer, and the
  scheduler as the SD 1.5 (PNDM, epsilon) and SD 2.1 (DDIM, v_prediction) repositories have it;
* a DiT folder: ``DiTTransformer2DModel`` (or its legacy ``Transformer2DModel`` name) with learned sigma
  (8 output channels for 4 latent ones) and 1000 classes + the null class, AutoencoderKL, DDIMScheduler;
* an SD3 folder: ``SD3Transformer2DModel``, two CLIP text encoders with projection (no T5, as the
  pipeline allows), FlowMatchEulerDiscreteScheduler with shift 3, AutoencoderKL with a shift factor.

Weights are random (seeded): the checks compare conversions, not images.
"""

from __future__ import annotations

import json
import pathlib
import string

import torch

LETTERS = string.ascii_lowercase
TEXT_DIM = 32
MAX_LENGTH = 16


def vocabulary() -> tuple[dict[str, int], list[str]]:
    vocab: dict[str, int] = {}
    for c in LETTERS:
        vocab[c] = len(vocab)
    for c in LETTERS:
        vocab[c + "</w>"] = len(vocab)
    merges = ["t h</w>", "a n"]
    vocab["th</w>"] = len(vocab)
    vocab["an"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def save_clip_tokenizer(folder: pathlib.Path) -> None:
    """The files of a CLIP tokenizer as the Stable Diffusion repositories publish them."""
    vocab, merges = vocabulary()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = {**special, "model_max_length": MAX_LENGTH, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def clip_config(hidden: int = TEXT_DIM, projection: int = TEXT_DIM, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    vocab, _ = vocabulary()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden + 5,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=projection,
        hidden_act=act,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )


def tiny_vae(seed: int = 2, latent_channels: int = 4, shift_factor: float | None = None):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kw = {} if shift_factor is None else {"shift_factor": shift_factor}
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.5,
        **kw,
    )


def tiny_cross_attention_unet(seed: int = 1, sd2: bool = False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=[2, 4] if sd2 else 2,
        use_linear_projection=sd2,
        upcast_attention=sd2,
        norm_num_groups=4,
    )


def _index(folder: pathlib.Path, cls: str, components: dict[str, list]) -> None:
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": cls, "_diffusers_version": "0.30.0", **components}, indent=1)
    )


def save_sd_pipeline(folder: pathlib.Path, version: str = "1", text_weights: str = "safetensors") -> pathlib.Path:
    """A Stable Diffusion 1.x (PNDM, epsilon, CLIP quick_gelu) or 2.x (DDIM, v_prediction, gelu text
    encoder, linear projections, per-block head dims) pipeline folder in the published layout."""
    from diffusers import DDIMScheduler, PNDMScheduler
    from transformers import CLIPTextModel

    sd2 = version == "2"
    tiny_cross_attention_unet(sd2=sd2).save_pretrained(folder / "unet")
    tiny_vae().save_pretrained(folder / "vae")
    torch.manual_seed(3)
    CLIPTextModel(clip_config(act="gelu" if sd2 else "quick_gelu")).save_pretrained(
        folder / "text_encoder", safe_serialization=text_weights == "safetensors"
    )
    save_clip_tokenizer(folder / "tokenizer")
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if sd2:
        sched = DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction")
    else:
        sched = PNDMScheduler(**common, skip_prk_steps=True, set_alpha_to_one=False, prediction_type="epsilon")
    sched.save_pretrained(folder / "scheduler")
    _index(
        folder,
        "StableDiffusionPipeline",
        {
            "feature_extractor": [None, None],
            "safety_checker": [None, None],
            "requires_safety_checker": False,
            "scheduler": ["diffusers", type(sched).__name__],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    return folder


def tiny_dit(seed: int = 4):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )


def save_dit_pipeline(folder: pathlib.Path, legacy_name: bool = False) -> pathlib.Path:
    """A DiT pipeline folder as facebook/DiT-XL-2-256 is laid out (transformer/, vae/, scheduler/), the
    transformer's config naming ``Transformer2DModel`` when ``legacy_name``."""
    from diffusers import DDIMScheduler

    tiny_dit().save_pretrained(folder / "transformer")
    if legacy_name:
        cfg_file = folder / "transformer" / "config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg.update(_class_name="Transformer2DModel", norm_type="ada_norm_zero")
        cfg_file.write_text(json.dumps(cfg))
    tiny_vae().save_pretrained(folder / "vae")
    DDIMScheduler(clip_sample=False).save_pretrained(folder / "scheduler")
    _index(
        folder,
        "DiTPipeline",
        {
            "scheduler": ["diffusers", "DDIMScheduler"],
            "transformer": ["diffusers", "Transformer2DModel" if legacy_name else "DiTTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    return folder


def tiny_sd3_transformer(seed: int = 5):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=8,
    )


def save_sd3_pipeline(folder: pathlib.Path) -> pathlib.Path:
    """An SD3-class folder: transformer/, two CLIP text encoders with projection and their tokenizers (no
    T5: text_encoder_3 null, as the pipeline allows), FlowMatchEulerDiscreteScheduler(shift=3), vae/."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModelWithProjection

    tiny_sd3_transformer().save_pretrained(folder / "transformer")
    tiny_vae(shift_factor=0.1).save_pretrained(folder / "vae")
    for seed, name in ((6, "text_encoder"), (7, "text_encoder_2")):
        torch.manual_seed(seed)
        CLIPTextModelWithProjection(clip_config(hidden=16, projection=16)).save_pretrained(folder / name)
    save_clip_tokenizer(folder / "tokenizer")
    save_clip_tokenizer(folder / "tokenizer_2")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    _index(
        folder,
        "StableDiffusion3Pipeline",
        {
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_3": [None, None],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "tokenizer_3": [None, None],
            "transformer": ["diffusers", "SD3Transformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    return folder


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|: the max relative error the checks report."""
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------------------------------
# The exact conditional control, as factories for `conservcheck audit tiny_conditional:<factory>`

GMM_MEANS = (
    ((1.0, 0.5, -0.5, 0.0), (0.2, -0.8, 0.6, 0.4)),
    ((-1.0, 0.0, 0.5, 0.5), (-0.4, 0.9, -0.2, -0.6)),
    ((0.0, -1.0, 0.0, 1.0), (0.7, 0.3, 0.8, -0.9)),
)


def conditional_gmm(class_label=None, dtype=torch.float64, device="cpu", curl: float = 0.0):
    """Three classes, each a two-component Gaussian mixture in 4-D (component std 0.4); ``curl`` adds the
    rotation λ K x to every conditional (not the unconditional) score."""
    from conservcheck.analytic.conditional import ConditionalGaussianMixture, conditional_probe

    mixture = ConditionalGaussianMixture(torch.tensor(GMM_MEANS), 0.4, curl=curl)
    return conditional_probe(mixture, class_label, dtype=dtype, device=device)


def curled_gmm(class_label=None, dtype=torch.float64, device="cpu"):
    """The non-conservative pair: the conditional scores plus 0.3 K x, the unconditional score exact."""
    return conditional_gmm(class_label, dtype, device, curl=0.3)
