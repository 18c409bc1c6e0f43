"""Model references: the string a user names a model by → a loaded :class:`VectorFieldProbe`.

Resolution order (the first rule that applies wins):

1. ``embedded:<name>`` — a model packaged with conservcheck (``conservcheck.adapters.embedded``).
2. ``module:factory`` — contains ``:`` and is not an existing path: a user's factory function
   (``conservcheck.adapters.custom.load_factory``).
3. an existing local file or folder.
4. a hub id ``owner/name`` (revision from ``owner/name@rev`` or the ``revision`` argument, default
   ``main``) — the files the adapters read downloaded through :mod:`conservcheck.adapters.hub` into the hub
   cache, giving a local folder.

For 3 and 4 the adapters' ``detect`` are asked in registry order (:mod:`conservcheck.adapters`) and the
first match's ``load`` builds the probe. The probe's ``info`` then records the reference, the resolved
revision (the commit hash of a hub snapshot, also for a local path inside the hub cache) and, from the
adapter, the SHA-256 of the weights file(s) actually loaded.
"""

from __future__ import annotations

import importlib
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from conservcheck import adapters
from conservcheck.adapters import hub
from conservcheck.errors import ModelLoadError, UsageError
from conservcheck.probe import VectorFieldProbe

EMBEDDED_PREFIX = "embedded:"


@dataclass(frozen=True)
class Resolved:
    """Where a reference points: ``kind`` is ``embedded``, ``factory``, ``local`` or ``hub``."""

    kind: str
    reference: str
    path: pathlib.Path | None = None
    spec: str | None = None
    repo_id: str | None = None
    revision: str | None = None


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~", "\\")) or "\\" in text or text.count("/") != 1


def resolve(
    reference: str,
    *,
    revision: str | None = None,
    cache_dir: str | pathlib.Path | None = None,
    endpoint: str | None = None,
    offline: bool | None = None,
    variant: str | None = None,
) -> Resolved:
    """Apply the resolution order to a reference; hub ids are fetched to a local snapshot folder (the files
    the adapters read, with weights ``variant``: :func:`hub.snapshot`).

    Raises :class:`UsageError` for a revision given twice or given for a non-hub reference, and
    :class:`ModelLoadError` for a path that does not exist or a hub failure (:func:`hub.explain`).
    """
    ref = str(reference).strip()
    if not ref:
        raise UsageError(
            "empty model reference",
            "name a local folder or file, a hub id owner/name, embedded:<name> or module:factory",
        )
    if ref.startswith(EMBEDDED_PREFIX):
        _no_revision(revision, ref)
        return Resolved("embedded", ref, spec=ref[len(EMBEDDED_PREFIX) :])
    path = pathlib.Path(ref).expanduser()
    if ":" in ref and not path.exists():
        _no_revision(revision, ref)
        return Resolved("factory", ref, spec=ref)
    if path.exists():
        _no_revision(revision, ref)
        repo_id, commit = hub.snapshot_of(path.resolve()) or (None, None)
        return Resolved("local", ref, path=path, repo_id=repo_id, revision=commit)
    repo_id, at_rev = hub.split_revision(ref)
    if at_rev is not None and revision is not None and at_rev != revision:
        raise UsageError(
            f"two revisions for {repo_id}: {at_rev!r} in the reference and {revision!r} given separately",
            "give the revision once",
        )
    if _looks_like_path(repo_id) or not hub.is_hub_id(repo_id):
        raise ModelLoadError(
            f"no file or folder {ref!r}, and it is not a hub id (owner/name)",
            "check the path, or name a hub model as owner/name[@revision]",
        )
    folder = hub.snapshot(repo_id, at_rev or revision, cache_dir, endpoint=endpoint, offline=offline, variant=variant)
    return Resolved("hub", ref, path=folder, repo_id=repo_id, revision=(hub.snapshot_of(folder) or (None, None))[1])


def fetch(
    reference: str,
    *,
    revision: str | None = None,
    cache_dir: str | pathlib.Path | None = None,
    endpoint: str | None = None,
    offline: bool | None = None,
    variant: str | None = None,
) -> tuple[pathlib.Path, str]:
    """Download the files of hub model ``owner/name[@rev]`` that the adapters read into the hub cache (for an
    air-gapped machine: copy the cache, then load with ``HF_HUB_OFFLINE=1``). Returns (snapshot folder, name
    of the adapter that will read it).

    Offline (``HF_HUB_OFFLINE=1``), checks that the cache holds them instead. Raises :class:`UsageError` for a
    reference that is not a hub id, :class:`ModelLoadError` for a hub failure (:func:`hub.explain`) or files
    that no adapter recognises.
    """
    ref = str(reference).strip()
    repo_id, at_rev = hub.split_revision(ref)
    if ref.startswith(EMBEDDED_PREFIX) or not hub.is_hub_id(repo_id):
        raise UsageError(
            f"{ref!r} is not a hub id: fetch downloads Hugging Face Hub models",
            "name the model as owner/name or owner/name@revision",
        )
    if at_rev is not None and revision is not None and at_rev != revision:
        raise UsageError(
            f"two revisions for {repo_id}: {at_rev!r} in the reference and {revision!r} given separately",
            "give the revision once",
        )
    folder = hub.snapshot(repo_id, at_rev or revision, cache_dir, endpoint=endpoint, offline=offline, variant=variant)
    chosen, broken = adapters.detect(folder)
    if chosen is None:
        skipped = f"; adapters that failed: {'; '.join(broken)}" if broken else ""
        raise ModelLoadError(
            f"no adapter recognises the files of {repo_id} in {folder}{skipped}",
            "conservcheck reads diffusers UNet pipelines, score_sde / EDM checkpoints and flow models; wrap "
            "anything else with a 'module:factory' reference",
        )
    return folder, str(getattr(chosen, "NAME", chosen.__name__))


def _no_revision(revision: str | None, ref: str) -> None:
    if revision is not None:
        raise UsageError(f"a revision was given for {ref!r}, which is not a hub id", "drop the revision")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _no_condition(condition: Mapping[str, Any], what: str, accepted: tuple[str, ...] = ()) -> None:
    """Refuse conditions a model does not take, naming the ones it does."""
    if not condition:
        return
    given = ", ".join(_flag(k) for k in condition)
    if accepted:
        raise UsageError(f"{what} takes {', '.join(map(_flag, accepted))}, not {given}", f"drop {given}")
    raise UsageError(f"{what} is unconditional: it takes no {given}", f"drop {given}")


def _import(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name == module:
            raise ModelLoadError(
                f"{what} are not available in this installation ({module} is missing)", "reinstall conservcheck"
            ) from err
        raise


def load_reference(
    reference: str,
    *,
    revision: str | None = None,
    cache_dir: str | pathlib.Path | None = None,
    endpoint: str | None = None,
    offline: bool | None = None,
    adapter: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    condition: Mapping[str, Any] | None = None,
    **options: Any,
) -> VectorFieldProbe:
    """A probe for a model reference (resolution order in the module docstring).

    Args:
        reference: ``embedded:<name>``, ``module:factory``, a local file or folder, or ``owner/name[@rev]``.
        revision: hub branch, tag or commit (hub ids only).
        cache_dir, endpoint, offline: hub cache folder, Hub mirror, and offline switch (default: the
            ``HF_HUB_OFFLINE`` environment variable).
        adapter: use this adapter by name instead of asking each adapter's ``detect``.
        device, dtype, trust_remote_code, options: passed to the adapter's ``load``.
        condition: the conditions of a conditional model (``prompt``, ``negative_prompt``,
            ``class_label``), passed to an adapter that lists them in its ``CONDITIONS`` (or to a factory
            that takes them as keywords); any other adapter refuses them.
    Returns:
        the probe; ``probe.info`` holds reference, revision, weights SHA-256 and the trust flag.
    """
    res = resolve(
        reference,
        revision=revision,
        cache_dir=cache_dir,
        endpoint=endpoint,
        offline=offline,
        variant=options.get("variant"),
    )
    condition = dict(condition or {})
    if res.kind == "embedded":
        _no_condition(condition, f"the embedded model {res.spec!r}")
        probe = _import("conservcheck.adapters.embedded", "embedded models").load(
            res.spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code, **options
        )
    elif res.kind == "factory":
        probe = _import("conservcheck.adapters.custom", "custom factories").load_factory(
            res.spec, device=device, dtype=dtype, **condition
        )
    else:
        assert res.path is not None
        if adapter is not None:
            chosen = adapters.get(adapter)
        else:
            chosen, broken = adapters.detect(res.path)
            if chosen is None:
                skipped = f"; adapters that failed: {'; '.join(broken)}" if broken else ""
                raise ModelLoadError(
                    f"no adapter recognises {res.path}{skipped}",
                    "expected a diffusers model folder, a score_sde / EDM checkpoint or a flow model; "
                    "wrap anything else with a 'module:factory' reference",
                )
        accepted = tuple(getattr(chosen, "CONDITIONS", ()))
        _no_condition(
            {k: v for k, v in condition.items() if k not in accepted},
            f"a {getattr(chosen, 'NAME', 'this')} model",
            accepted,
        )
        probe = chosen.load(
            res.path, device=device, dtype=dtype, trust_remote_code=trust_remote_code, **options, **condition
        )
    if not isinstance(probe, VectorFieldProbe):
        raise ModelLoadError(
            f"loading {reference!r} returned a {type(probe).__name__}, not a VectorFieldProbe",
            "the adapter or factory must return conservcheck.VectorFieldProbe",
        )
    info = probe.info
    info.reference = res.reference
    if res.revision is not None:
        info.revision = res.revision
    if res.repo_id is not None:
        info.name = res.repo_id
    info.trust_remote_code = bool(info.trust_remote_code or trust_remote_code)
    info.extra.setdefault("source", res.kind)
    return probe
