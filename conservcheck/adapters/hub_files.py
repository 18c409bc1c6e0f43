"""Which files of a Hugging Face Hub repository the adapters read: the download plan.

A pure function of the repository's file list (and the weights variant asked for), so the same choice is
made before a download (from the Hub's listing) and offline (from the listing huggingface_hub caches):

* **diffusers repositories** — a ``model_index.json`` or a model ``config.json`` at the root, or in ``unet/``
  / ``vae/`` / ``vqvae/``, with diffusers-named weights there: every configuration file (``*.json``), and
  for each of those components one set of weights, chosen as the loaders choose them
  (:func:`~conservcheck.adapters.weights.choose_weights`: safetensors before ``.bin``, the default weights
  or the one variant present, a shard index with its shards). Other components (text encoders, …) and
  single-file checkpoints kept beside the diffusers folders are not read by any adapter and not fetched.
* **other repositories** (score_sde ``.pth``, EDM ``.pkl``, …) — configuration files (``.json``,
  ``.yaml``, ``.yml``) and checkpoints (``.safetensors``, ``.bin``, ``.pth``, ``.pt``, ``.ckpt``,
  ``.pkl``), a ``.bin`` dropped when a ``.safetensors`` of the same name is beside it.

Never fetched: ONNX, Flax (``.msgpack``), TensorFlow, Core ML and OpenVINO exports, documentation, images.
"""

from __future__ import annotations

import posixpath
from collections import defaultdict
from collections.abc import Iterable

from conservcheck.adapters.weights import choose_weights
from conservcheck.errors import ModelLoadError

#: Folders of a diffusers repository whose weights the adapters read ("" is the root: flat layouts).
COMPONENTS = ("", "unet", "vae", "vqvae")
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".pkl")


def _split(path: str) -> tuple[str, str]:
    folder, name = posixpath.split(path)
    return folder, name


def is_diffusers_repo(files: Iterable[str]) -> bool:
    """True when one of :data:`COMPONENTS` holds a ``config.json`` and diffusers-named weights."""
    by_folder = _by_folder(files)
    return any("config.json" in by_folder.get(c, set()) and _has_weights(by_folder.get(c, set())) for c in COMPONENTS)


def _by_folder(files: Iterable[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for f in files:
        folder, name = _split(f)
        out[folder].add(name)
    return out


def _has_weights(names: set[str]) -> bool:
    try:
        return choose_weights(names) is not None
    except ModelLoadError:  # only several variants: still weights
        return True


def plan(files: Iterable[str], variant: str | None = None) -> list[str]:
    """The files of a repository (paths relative to its root, ``/``-separated) that the adapters read.

    Raises :class:`ModelLoadError` when a component has no weights of the requested variant, or only
    several variants and none was requested (naming the folder).
    """
    files = sorted(set(files))
    by_folder = _by_folder(files)
    if not is_diffusers_repo(files):
        chosen = [f for f in files if f.endswith(CONFIG_SUFFIXES)]
        checkpoints = [f for f in files if f.endswith(CHECKPOINT_SUFFIXES)]
        safetensors = {f[: -len(".safetensors")] for f in checkpoints if f.endswith(".safetensors")}
        chosen += [f for f in checkpoints if not (f.endswith(".bin") and f[: -len(".bin")] in safetensors)]
        return sorted(chosen)
    chosen = [f for f in files if f.endswith(".json")]
    for component in COMPONENTS:
        names = by_folder.get(component, set())
        if "config.json" not in names:
            continue
        try:
            choice = choose_weights(names, variant)
        except ModelLoadError as err:
            where = f"{component}/" if component else "the repository root"
            raise ModelLoadError(f"{err.message} in {where}", err.hint) from None
        if choice is not None:
            chosen += [posixpath.join(component, n) for n in choice.names]
    return sorted(set(chosen))


__all__ = ["CHECKPOINT_SUFFIXES", "COMPONENTS", "CONFIG_SUFFIXES", "is_diffusers_repo", "plan"]
