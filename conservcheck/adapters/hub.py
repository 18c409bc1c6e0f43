"""Hugging Face Hub access: a hub id and revision → a local snapshot folder, or a one-line error.

Downloads go through huggingface_hub's cache (``HF_HUB_CACHE`` / ``HF_HOME``, or ``cache_dir``), so a
model is fetched once and found again offline. Only the files the adapters read are fetched
(:func:`conservcheck.adapters.hub_files.plan`: one weights format per component, never both ``.bin`` and
``.safetensors``, no ONNX / Flax / TensorFlow exports, no images); before downloading, the commit, the files
and their sizes are logged (logger ``conservcheck``, on stderr in the CLI), and huggingface_hub draws its
progress bar when stderr is a terminal. The snapshot folder is
``<cache>/models--<owner>--<name>/snapshots/<commit hash>``: its name is the resolved revision, readable
without network (:func:`snapshot_of`). With ``HF_HUB_OFFLINE=1`` (read when :func:`snapshot` is called)
nothing touches the network, a branch or tag resolves through the cache's ``refs/<revision>`` file, and
where huggingface_hub cached the repository's file list the files of the same plan must all be present.

huggingface_hub (and diffusers, which re-raises hub errors as ``OSError`` with the original as
``__cause__``) signals every failure with an exception chain; :func:`explain` follows the chain and turns
it into a :class:`ModelLoadError` whose hint names the fix: repository not found, gated or disabled
repository, bad revision, a listed file missing, offline without a cached copy, network unreachable,
incomplete cached copy, Hub error.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from conservcheck.adapters import hub_files
from conservcheck.errors import ModelLoadError, error_chain, reason

log = logging.getLogger("conservcheck")

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")

#: Files no adapter reads (ONNX, Flax, TensorFlow, Core ML, OpenVINO exports): never downloaded, and not
#: required of an offline snapshot.
IGNORE_PATTERNS = [
    "*.onnx",
    "*.onnx_data",
    "*.msgpack",
    "*.h5",
    "*.tflite",
    "*.mlmodel",
    "*.mlpackage/*",
    "*.ot",
    "openvino_*",
]

_NETWORK_ERRORS = {"ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError", "ProxyError", "ReadTimeout"}
_TRUE = {"1", "on", "yes", "true"}


def is_hub_id(text: str) -> bool:
    """True for ``owner/name`` (letters, digits, ``._-``; one slash)."""
    return bool(HUB_ID.match(text)) and ".." not in text


def split_revision(reference: str) -> tuple[str, str | None]:
    """``"owner/name@rev"`` → (``"owner/name"``, ``"rev"``); without ``@`` the revision is None."""
    repo, sep, rev = reference.partition("@")
    return (repo, rev or None) if sep else (reference, None)


def offline_mode() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set now or was set when
    huggingface_hub was imported."""
    if any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The hub cache folder used for ``cache_dir`` (huggingface_hub's default when None)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_folder(repo_id: str, cache_dir: str | Path | None = None) -> Path:
    """``<cache>/models--owner--name``."""
    return cache_root(cache_dir) / ("models--" + repo_id.replace("/", "--"))


def cached_revisions(repo_id: str, cache_dir: str | Path | None = None) -> list[str]:
    """Branch/tag names (``refs/``) and commit hashes (``snapshots/``) cached for a repository."""
    folder = repo_folder(repo_id, cache_dir)
    refs = sorted(p.relative_to(folder / "refs").as_posix() for p in (folder / "refs").rglob("*") if p.is_file())
    snaps = sorted(p.name for p in (folder / "snapshots").glob("*") if p.is_dir())
    return refs + snaps


def snapshot_of(path: str | Path) -> tuple[str, str] | None:
    """(repo id, commit hash) of a folder or file inside a hub-cache snapshot
    (``.../models--owner--name/snapshots/<hash>/...``), else None."""
    parts = Path(path).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--") and COMMIT.match(parts[i + 1]):
            return parts[i - 1][len("models--") :].replace("--", "/", 1), parts[i + 1]
    return None


def snapshot(
    repo_id: str,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    *,
    endpoint: str | None = None,
    token: str | bool | None = None,
    offline: bool | None = None,
    variant: str | None = None,
) -> Path:
    """Local snapshot folder of a hub model repository at ``revision`` (default ``main``).

    Downloads the files of :func:`~conservcheck.adapters.hub_files.plan` (for weights ``variant``) that are
    not cached yet, unless offline (``offline`` None: :func:`offline_mode`), in which case only the cache is
    read. ``endpoint`` selects a Hub mirror (default ``HF_ENDPOINT``). Raises :class:`ModelLoadError` (see
    :func:`explain`).
    """
    from huggingface_hub import snapshot_download

    if offline is None:
        offline = offline_mode()
    cache = str(cache_dir) if cache_dir is not None else None
    try:
        with _quiet_hub():
            if offline:
                listing = _cached_listing(repo_id, revision, cache_dir)
                allow = None if listing is None else _patterns(hub_files.plan(listing, variant))
                return Path(
                    snapshot_download(
                        repo_id,
                        revision=revision,
                        cache_dir=cache,
                        local_files_only=True,
                        allow_patterns=allow,
                        ignore_patterns=IGNORE_PATTERNS,
                    )
                )
            commit, files = _remote_plan(repo_id, revision, cache_dir, endpoint, token, variant)
            folder = Path(
                snapshot_download(
                    repo_id,
                    revision=revision,
                    cache_dir=cache,
                    endpoint=endpoint,
                    token=token,
                    allow_patterns=_patterns(files),
                )
            )
    except ModelLoadError:
        raise
    except Exception as err:
        raise explain(err, repo_id, revision, cache_dir=cache_dir, endpoint=endpoint, offline=offline) from err
    if folder.name != commit:
        raise ModelLoadError(
            f"{repo_id} (revision {revision or 'main'}) moved from commit {commit[:12]} to {folder.name[:12]} "
            "during the download",
            f"run again, or pin a commit as {repo_id}@<commit hash>",
        )
    return folder


def _patterns(files: list[str]) -> list[str]:
    # huggingface_hub matches allow_patterns with fnmatch: escape the names' own wildcards
    return [glob.escape(f) for f in files]


def _cached_listing(repo_id: str, revision: str | None, cache_dir: str | Path | None) -> list[str] | None:
    """The repository's file list as huggingface_hub cached it at the last download (``trees/<commit>.json``,
    written by recent huggingface_hub versions), or None when there is none."""
    try:
        from huggingface_hub import get_cached_repo_tree
        from huggingface_hub.errors import CachedRepoTreeNotFoundError
    except ImportError:
        return None
    try:
        tree = get_cached_repo_tree(repo_id, revision=revision, cache_dir=cache_root(cache_dir))
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return None
    return [f.path for f in tree]


def _remote_plan(
    repo_id: str,
    revision: str | None,
    cache_dir: str | Path | None,
    endpoint: str | None,
    token: str | bool | None,
    variant: str | None,
) -> tuple[str, list[str]]:
    """(commit, files to fetch) from the Hub's listing of the repository; logs what is fetched and skipped."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    # "main" as snapshot_download resolves it (the bare /api/models/<id> answers for the default branch)
    info = api.model_info(repo_id, revision=revision or "main", files_metadata=True)
    commit = str(info.sha)
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    files = hub_files.plan(sizes, variant)
    snap = repo_folder(repo_id, cache_dir) / "snapshots" / commit
    todo = [f for f in files if not (snap / f).is_file()]
    skipped = sorted(set(sizes) - set(files))
    total = sum(sizes[f] or 0 for f in todo)
    listed = ", ".join(f"{f} {format_size(sizes[f])}" for f in sorted(todo, key=lambda f: -(sizes[f] or 0)))
    log.info(
        "%s at %s (%s): %s the %d files the adapters read (%s)%s%s",
        repo_id,
        commit[:12],
        revision or "main",
        f"downloading {len(todo)} of" if todo else "cached:",
        len(files),
        format_size(total) if todo else "nothing to download",
        f": {listed}" if todo else "",
        f"; not fetched: {len(skipped)} files ({', '.join(skipped[:6])}{', …' if len(skipped) > 6 else ''})"
        if skipped
        else "",
    )
    return commit, files


def format_size(n: int | None) -> str:
    """Bytes as ``12.3 MB`` (decimal units, as the Hub shows sizes); ``?`` when unknown."""
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """huggingface_hub's retry warnings off, and its progress bars too unless stderr is a terminal: a
    failure is explained in one line by :func:`explain`, and logs of batch jobs stay readable."""
    # The documented import path: huggingface_hub re-exports these lazily, unmarked as exports for type checkers.
    from huggingface_hub.utils import (  # type: ignore[attr-defined]
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    hub_log = logging.getLogger("huggingface_hub")
    level, bars_off = hub_log.level, are_progress_bars_disabled()
    hub_log.setLevel(logging.ERROR)
    if not sys.stderr.isatty():
        disable_progress_bars()
    try:
        yield
    finally:
        hub_log.setLevel(level)
        if not bars_off:
            enable_progress_bars()


def _is_network_error(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)) or bool(names & _NETWORK_ERRORS)


def explain(
    err: BaseException,
    repo_id: str,
    revision: str | None = None,
    *,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    offline: bool = False,
) -> ModelLoadError:
    """A one-line :class:`ModelLoadError` for a failed hub access, read from the exception chain."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        DisabledRepoError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain = error_chain(err)

    def find(kind: type | tuple[type, ...]) -> BaseException | None:
        return next((e for e in chain if isinstance(e, kind)), None)

    site = (endpoint or constants.ENDPOINT).rstrip("/")
    rev = revision or "main"
    cache = cache_root(cache_dir)
    if find(HFValidationError) is not None:
        return ModelLoadError(
            f"{repo_id!r} is not a valid hub id", "name a local file or folder, or a hub model as owner/name"
        )
    if find(GatedRepoError) is not None:
        return ModelLoadError(
            f"{repo_id} is a gated repository and this account has no access",
            f"accept the license at {site}/{repo_id} and log in (`hf auth login` or HF_TOKEN)",
        )
    if find(RevisionNotFoundError) is not None:
        return ModelLoadError(
            f"revision {rev!r} does not exist in {repo_id}",
            f"use a branch, tag or commit hash listed at {site}/{repo_id}/commits/main",
        )
    if find(DisabledRepoError) is not None:
        return ModelLoadError(
            f"access to {repo_id} has been disabled on the Hub ({site})", "use another model or a local copy"
        )
    if find(RemoteEntryNotFoundError) is not None:
        return ModelLoadError(
            f"the Hub ({site}) lists a file of {repo_id} (revision {rev}) that it cannot serve",
            "the repository changed during the download: run again, or pin a commit as owner/name@<commit hash>",
        )
    if find(RepositoryNotFoundError) is not None:
        return ModelLoadError(
            f"model repository {repo_id} was not found on the Hub ({site})",
            "check the spelling; for a private repository log in (`hf auth login` or HF_TOKEN)",
        )
    if find(IncompleteSnapshotError) is not None:
        return ModelLoadError(
            f"the cached copy of {repo_id} (revision {rev}) in {cache} is incomplete",
            "run once with network access to finish the download, or pass a local folder",
        )
    if offline or find(OfflineModeIsEnabled) is not None:
        cached = cached_revisions(repo_id, cache_dir)
        if cached:
            return ModelLoadError(
                f"revision {rev!r} of {repo_id} is not in the hub cache at {cache} (cached: {', '.join(cached)}) "
                "and HF_HUB_OFFLINE=1 forbids downloading",
                "run once with network access, pick a cached revision, or pass a local folder",
            )
        return ModelLoadError(
            f"{repo_id} is not in the hub cache at {cache} and HF_HUB_OFFLINE=1 forbids downloading",
            "run once with network access or pass a local folder",
        )
    unreachable = ModelLoadError(
        f"cannot reach the Hub ({site}) and {repo_id} (revision {rev}) is not in the hub cache at {cache}",
        "check the network connection, or pass a local folder, or use a cached copy with HF_HUB_OFFLINE=1",
    )
    if any(_is_network_error(e) for e in chain):
        return unreachable
    http = find(HfHubHTTPError)
    if http is not None:
        status = getattr(getattr(http, "response", None), "status_code", "?")
        return ModelLoadError(
            f"the Hub ({site}) answered HTTP {status} for {repo_id}", "try again later or pass a local folder"
        )
    if find(LocalEntryNotFoundError) is not None:
        return unreachable
    return ModelLoadError(
        f"could not fetch {repo_id} from the Hub ({reason(err)})",
        "check the hub id and the network, or pass a local folder",
    )
