"""Rebuild published Hugging Face repositories offline, with random weights, in a local hub cache.

Each repository is written as huggingface_hub itself caches it (``models--owner--name/blobs/<sha256>``,
``snapshots/<commit>/<file>`` links to the blobs, ``refs/main``), so ``HF_HUB_OFFLINE=1`` resolves the hub id
to it with huggingface_hub's own code. What is reproduced is what decides how a model is read: the file
names and their places (``model_index.json``, ``config.json``, ``scheduler_config.json`` and the weights at the
repository root for google/ddpm-* and google/ncsnpp-*; ``unet/``, ``vqvae/``, ``scheduler/`` for
CompVis/ldm-celebahq-256), the published ``config.json`` / ``scheduler_config.json`` values with the keys of
their era, and the weights as the 2022 conversions wrote them: pickled ``diffusion_pytorch_model.bin``
(``torch.save`` of a plain state dict) with diffusers' pre-0.15 attention names (``query``, ``key``, ``value``,
``proj_attn``) and, for the Fourier time embedding, the duplicate ``time_proj.W``. The weights are random
(seeded): the numbers mean nothing, the loading path is the real one. Every repository gets a README.md
saying so. Sources of the values: ``docs/checkpoints.md``.

Sizes: ``--size full`` builds the published architecture (google/ddpm-cifar10-32: 35.7M parameters,
google/ncsnpp-celebahq-256: 65.6M, CompVis/ldm-celebahq-256: 274M + 55M); ``--size reduced`` (the default)
keeps every key of the published configs and reduces the channel widths (``block_out_channels``, with
``norm_num_groups`` where the widths require); ``--size small`` also reduces ``sample_size`` to the smallest
input the levels allow (the test suite's size: every block type and level is still there). ``--weights
bin,safetensors`` adds the ``.safetensors`` copy later commits of such repositories carry.

    python examples/published_checkpoints.py --cache-dir /tmp/hub --size full google/ddpm-cifar10-32
    python examples/published_checkpoints.py --cache-dir /tmp/hub google/ncsnpp-celebahq-256
    HF_HUB_CACHE=/tmp/hub HF_HUB_OFFLINE=1 conservcheck audit google/ddpm-cifar10-32 --paths rotation

The cache folder must be given and must not be huggingface_hub's default cache: random weights under real
repository names must never be mistaken for the published models. ``--list`` prints the repositories known.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import os
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# ---------------------------------------------------------------------------------------------------------
# The published configurations

_DDPM_UNET = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "attention_head_dim": None,
    "center_input_sample": False,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "time_embedding_type": "positional",
}
DDPM_CIFAR10_UNET = {
    **_DDPM_UNET,
    "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "sample_size": 32,
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
DDPM_256_UNET = {
    **_DDPM_UNET,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "sample_size": 256,
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
}
_DDPM_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.1.1",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
}
DDPM_CIFAR10_SCHEDULER = {**_DDPM_SCHEDULER, "variance_type": "fixed_large"}
DDPM_256_SCHEDULER = {**_DDPM_SCHEDULER, "variance_type": "fixed_small"}
DDPM_INDEX = {
    "_class_name": "DDPMPipeline",
    "_diffusers_version": "0.1.1",
    "scheduler": ["diffusers", "DDPMScheduler"],
    "unet": ["diffusers", "UNet2DModel"],
}


def _ncsnpp_unet(channels: list[int], layers: int, size: int) -> dict[str, Any]:
    """score_sde's NCSN++ config (nf · ch_mult, num_res_blocks, attention at 16²) as diffusers converted it."""
    levels = [size // 2**i for i in range(len(channels))]
    down = ["AttnSkipDownBlock2D" if r == 16 else "SkipDownBlock2D" for r in levels]
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": "0.1.1",
        "act_fn": "silu",
        "attention_head_dim": None,
        "block_out_channels": channels,
        "center_input_sample": True,
        "down_block_types": down,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 3,
        "layers_per_block": layers,
        "mid_block_scale_factor": 1.41421356237,
        "norm_eps": 1e-06,
        "norm_num_groups": None,
        "out_channels": 3,
        "sample_size": size,
        "time_embedding_type": "fourier",
        "up_block_types": [b.replace("Down", "Up") for b in reversed(down)],
    }


def _ve_scheduler(sigma_max: float, snr: float) -> dict[str, Any]:
    return {
        "_class_name": "ScoreSdeVeScheduler",
        "_diffusers_version": "0.1.1",
        "correct_steps": 1,
        "num_train_timesteps": 2000,
        "sampling_eps": 1e-05,
        "sigma_max": sigma_max,
        "sigma_min": 0.01,
        "snr": snr,
    }


NCSNPP_INDEX = {
    "_class_name": "ScoreSdeVePipeline",
    "_diffusers_version": "0.1.1",
    "scheduler": ["diffusers", "ScoreSdeVeScheduler"],
    "unet": ["diffusers", "UNet2DModel"],
}

LDM_UNET = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "attention_head_dim": 32,
    "block_out_channels": [224, 448, 672, 896],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 64,
    "time_embedding_type": "positional",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
LDM_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.0.4",
    "beta_end": 0.0195,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.0015,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "trained_betas": None,
}
LDM_VQVAE = {
    "_class_name": "VQModel",
    "_diffusers_version": "0.1.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "in_channels": 3,
    "latent_channels": 3,
    "layers_per_block": 2,
    "num_vq_embeddings": 8192,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
}
LDM_INDEX = {
    "_class_name": "LDMPipeline",
    "_diffusers_version": "0.0.4",
    "scheduler": ["diffusers", "DDIMScheduler"],
    "unet": ["diffusers", "UNet2DModel"],
    "vqvae": ["diffusers", "VQModel"],
}


@dataclass(frozen=True)
class Component:
    """One model of a repository: its folder ("" for the root), class, published config, the config changes
    that reduce its widths, and those that also reduce its resolution (``small``)."""

    folder: str
    cls: str
    config: Mapping[str, Any]
    reduced: Mapping[str, Any] = field(default_factory=dict)
    small: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Repo:
    """A published repository: its model index, models, scheduler (folder and config) and pipeline class."""

    repo_id: str
    pipeline: str
    index: Mapping[str, Any]
    models: tuple[Component, ...]
    scheduler_folder: str
    scheduler: Mapping[str, Any]


def _ddpm(repo_id: str) -> Repo:
    small = "cifar10" in repo_id
    unet = DDPM_CIFAR10_UNET if small else DDPM_256_UNET
    reduced = (
        {"block_out_channels": [32, 64, 64, 64]}
        if small
        else {"block_out_channels": [8, 8, 16, 16, 32, 32], "norm_num_groups": 8}
    )
    sched = DDPM_CIFAR10_SCHEDULER if small else DDPM_256_SCHEDULER
    unet_c = Component("", "UNet2DModel", unet, reduced, {} if small else {"sample_size": 32})
    return Repo(repo_id, "DDPMPipeline", DDPM_INDEX, (unet_c,), "", sched)


def _ncsnpp(repo_id: str, unet: dict[str, Any], reduced: list[int], sigma_max: float, snr: float) -> Repo:
    # the smallest input the levels allow: one pixel at the coarsest level
    smallest = 2 ** (len(reduced) - 1)
    return Repo(
        repo_id,
        "ScoreSdeVePipeline",
        NCSNPP_INDEX,
        (Component("", "UNet2DModel", unet, {"block_out_channels": reduced}, {"sample_size": smallest}),),
        "",
        _ve_scheduler(sigma_max, snr),
    )


NCSNPP_256 = _ncsnpp_unet([128, 128, 256, 256, 256, 256, 256], 2, 256)
NCSNPP_1024 = _ncsnpp_unet([16, 32, 64, 128, 256, 512, 512, 512], 1, 1024)
NCSNPP_256_REDUCED = [8, 8, 16, 32, 32, 32, 32]
NCSNPP_1024_REDUCED = [4, 4, 8, 8, 16, 32, 32, 32]

REPOS: dict[str, Repo] = {
    r.repo_id: r
    for r in [
        *(
            _ddpm(f"google/ddpm-{ema}{name}")
            for name in ("cifar10-32", "cat-256", "church-256", "bedroom-256", "celebahq-256")
            for ema in ("", "ema-")
        ),
        _ncsnpp("google/ncsnpp-celebahq-256", NCSNPP_256, NCSNPP_256_REDUCED, 380.0, 0.075),
        _ncsnpp("google/ncsnpp-church-256", NCSNPP_256, NCSNPP_256_REDUCED, 380.0, 0.075),
        _ncsnpp("google/ncsnpp-ffhq-256", NCSNPP_256, NCSNPP_256_REDUCED, 348.0, 0.075),
        _ncsnpp("google/ncsnpp-ffhq-1024", NCSNPP_1024, NCSNPP_1024_REDUCED, 1348.0, 0.15),
        Repo(
            "CompVis/ldm-celebahq-256",
            "LDMPipeline",
            LDM_INDEX,
            (
                Component(
                    "unet", "UNet2DModel", LDM_UNET, {"block_out_channels": [32, 64, 64, 64]}, {"sample_size": 16}
                ),
                Component("vqvae", "VQModel", LDM_VQVAE, {"block_out_channels": [32, 32, 32]}, {"sample_size": 64}),
            ),
            "scheduler",
            LDM_SCHEDULER,
        ),
    ]
}

# ---------------------------------------------------------------------------------------------------------
# Weights as the 2022 conversions saved them


def _published_names(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict under the names diffusers wrote before 0.15: attention ``query``/``key``/``value``/
    ``proj_attn`` (renamed on load by ``ModelMixin._fix_state_dict_keys_on_load``), and the Fourier
    projection saved twice, as ``time_proj.weight`` and ``time_proj.W`` (one attribute pointing at the other)."""
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        for new, old in renames.items():
            if ".attentions." in name and new in name:
                name = name.replace(new, old)
        out[name] = tensor.detach().clone().contiguous()
    if "time_proj.weight" in out:
        out["time_proj.W"] = out["time_proj.weight"].clone()
    return out


def build_model(component: Component, size: str, seed: int) -> torch.nn.Module:
    """The component's diffusers model with seeded random weights (``size`` "full" or "reduced")."""
    import diffusers

    config = {k: v for k, v in component_config(component, size).items() if not k.startswith("_")}
    torch.manual_seed(seed)
    model = getattr(diffusers, component.cls)(**config)
    with torch.no_grad():  # nonzero everywhere, so no weight can hide behind a zero initialisation
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


SIZES = ("full", "reduced", "small")


def component_config(component: Component, size: str) -> dict[str, Any]:
    """The published config (``full``), with reduced widths (``reduced``), or with reduced widths and the
    smallest resolution its levels allow (``small``); every key is kept."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, not {size!r}")
    cfg = copy.deepcopy(dict(component.config))
    if size != "full":
        cfg.update(copy.deepcopy(dict(component.reduced)))
    if size == "small":
        cfg.update(copy.deepcopy(dict(component.small)))
    return cfg


def _weights_bytes(state: dict[str, torch.Tensor], fmt: str) -> bytes:
    if fmt == "bin":
        buf = io.BytesIO()
        torch.save(state, buf)
        return buf.getvalue()
    from safetensors.torch import save

    # later .safetensors copies of these repositories hold each tensor once
    return save({k: v for k, v in state.items() if k != "time_proj.W"})


def readme(repo_id: str, size: str) -> bytes:
    return (
        f"# {repo_id} (rebuilt offline, random weights)\n\nThe file layout and configuration of {repo_id} as "
        f"published, with seeded random weights ({size} widths), written by conservcheck's "
        "examples/published_checkpoints.py. Not the published model.\n"
    ).encode()


def repo_files(
    repo: Repo,
    *,
    size: str = "reduced",
    weights: Iterable[str] = ("bin",),
    seed: int = 0,
    parameters: dict[str, int] | None = None,
) -> dict[str, bytes]:
    """Every file of the rebuilt repository: path → bytes (each model's parameter count into ``parameters``)."""
    files: dict[str, bytes] = {"README.md": readme(repo.repo_id, size)}
    files["model_index.json"] = _json(repo.index)
    files[_join(repo.scheduler_folder, "scheduler_config.json")] = _json(repo.scheduler)
    for i, comp in enumerate(repo.models):
        files[_join(comp.folder, "config.json")] = _json(component_config(comp, size))
        model = build_model(comp, size, seed + i)
        if parameters is not None:
            parameters[f"{comp.folder or 'root'} {comp.cls}"] = sum(p.numel() for p in model.parameters())
        state = _published_names(model)
        for fmt in weights:
            files[_join(comp.folder, f"diffusion_pytorch_model.{fmt}")] = _weights_bytes(state, fmt)
    return files


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _json(obj: Mapping[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


# ---------------------------------------------------------------------------------------------------------
# The hub cache


def fake_commit(repo_id: str, tag: str = "") -> str:
    """A 40-hex commit hash, fixed per repository (and tag), that no published commit has."""
    return hashlib.sha1(f"conservcheck rebuilt {repo_id} {tag}".encode()).hexdigest()


def add_to_cache(
    cache_dir: str | Path,
    repo_id: str,
    files: Mapping[str, bytes] | Path,
    commit: str,
    refs: Iterable[str] = ("main",),
) -> Path:
    """Write files as huggingface_hub caches a download; returns the snapshot folder.

    ``files`` maps repository paths to bytes, or is a folder whose files are taken. Blobs are named by the
    SHA-256 of their bytes; snapshot entries are relative symbolic links to them (copies where the platform
    has none); each ref in ``refs`` names ``commit``.
    """
    if isinstance(files, Path):
        folder = files
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    blobs, snap = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        blob = blobs / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        dst = snap / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        try:
            os.symlink(os.path.relpath(blob, dst.parent), dst)
        except OSError:
            shutil.copyfile(blob, dst)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


def build(
    repo_id: str,
    cache_dir: str | Path,
    *,
    size: str = "reduced",
    weights: Iterable[str] = ("bin",),
    seed: int = 0,
    commit: str | None = None,
    parameters: dict[str, int] | None = None,
) -> Path:
    """Rebuild a known repository (:data:`REPOS`) in ``cache_dir``; returns its snapshot folder."""
    if repo_id not in REPOS:
        raise KeyError(f"unknown repository {repo_id!r}; known: {', '.join(REPOS)}")
    files = repo_files(REPOS[repo_id], size=size, weights=tuple(weights), seed=seed, parameters=parameters)
    return add_to_cache(cache_dir, repo_id, files, commit or fake_commit(repo_id, size))


def _default_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser().resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repos", nargs="*", metavar="REPO", help="hub ids to rebuild (see --list)")
    parser.add_argument("--cache-dir", help="hub cache folder to write (not huggingface_hub's default cache)")
    parser.add_argument("--size", choices=SIZES, default="reduced")
    parser.add_argument("--weights", default="bin", help="formats to write: bin, safetensors or bin,safetensors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="print the known repositories and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name in REPOS:
            print(name)
        return 0
    if not args.repos or not args.cache_dir:
        parser.error("give --cache-dir and at least one repository (see --list)")
    cache = Path(args.cache_dir).expanduser().resolve()
    if cache == _default_cache():
        parser.error(f"{cache} is huggingface_hub's default cache: random weights must not pose as published models")
    formats = [f.strip() for f in args.weights.split(",") if f.strip()]
    if not formats or any(f not in ("bin", "safetensors") for f in formats):
        parser.error("--weights takes bin, safetensors or bin,safetensors")
    for repo_id in args.repos:
        if repo_id not in REPOS:
            parser.error(f"unknown repository {repo_id!r} (see --list)")
        params: dict[str, int] = {}
        snap = build(repo_id, cache, size=args.size, weights=formats, seed=args.seed, parameters=params)
        counts = ", ".join(f"{k}: {v:,} parameters" for k, v in params.items())
        print(f"{repo_id}: {snap} ({counts})", file=sys.stderr)
        print(snap)
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["REPOS", "Repo", "add_to_cache", "build", "build_model", "fake_commit", "repo_files"]
