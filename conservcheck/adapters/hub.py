"""Hugging Face Hub access: a hub id and revision → a local snapshot folder, or a one-line error.

Downloads go through huggingface_hub's cache (``HF_HUB_CACHE`` / ``HF_HOME``, or ``cache_dir``), so a
model is fetched once and found again offline. The snapshot folder is
``<cache>/models--<owner>--<name>/snapshots/<commit hash>``: its name is the resolved revision, readable
without network (:func:`snapshot_of`). With ``HF_HUB_OFFLINE=1`` (read when :func:`snapshot` is called)
nothing touches the network and a branch or tag resolves through the cache's ``refs/<revision>`` file.

huggingface_hub (and diffusers, which re-raises hub errors as ``OSError`` with the original as
``__cause__``) signals every failure with an exception chain; :func:`explain` follows the chain and turns
it into a :class:`ModelLoadError` whose hint names the fix: repository not found, gated or disabled
repository, bad revision, a listed file missing, offline without a cached copy, network unreachable,
incomplete cached copy, Hub error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from conservcheck.errors import ModelLoadError, error_chain, reason

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")

#: Files no adapter reads (ONNX, Flax, TensorFlow, Core ML exports): never downloaded.
IGNORE_PATTERNS = ["*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.tflite", "*.mlmodel", "*.mlpackage/*", "*.ot"]

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
) -> Path:
    """Local snapshot folder of a hub model repository at ``revision`` (default ``main``).

    Downloads missing files into the cache unless offline (``offline`` None: :func:`offline_mode`), in
    which case only the cache is read. ``endpoint`` selects a Hub mirror (default ``HF_ENDPOINT``).
    Raises :class:`ModelLoadError` (see :func:`explain`).
    """
    from huggingface_hub import snapshot_download

    if offline is None:
        offline = offline_mode()
    try:
        with _quiet_hub():
            folder = snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=str(cache_dir) if cache_dir is not None else None,
                endpoint=endpoint,
                token=token,
                local_files_only=offline,
                ignore_patterns=IGNORE_PATTERNS,
            )
    except Exception as err:
        raise explain(err, repo_id, revision, cache_dir=cache_dir, endpoint=endpoint, offline=offline) from err
    return Path(folder)


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """huggingface_hub's retry warnings off, and its progress bars too unless stderr is a terminal: a
    failure is explained in one line by :func:`explain`, and logs of batch jobs stay readable."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

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
