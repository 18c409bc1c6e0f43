"""``conservcheck fetch``: download what the adapters read of a hub model, for audits on machines without
network."""

from __future__ import annotations

import typer

from conservcheck.cli.console import log, logging_to_stderr


def fetch_cmd(
    model: str = typer.Argument(..., metavar="MODEL", help="Hub model: owner/name or owner/name@revision."),
    revision: str | None = typer.Option(
        None, "--revision", metavar="REV", help="Hub revision (branch, tag or commit) of MODEL. [default: main]"
    ),
    cache_dir: str | None = typer.Option(
        None,
        "--cache-dir",
        metavar="DIR",
        help="Hub cache folder to fill (the folder audit --cache-dir reads). [default: the Hugging Face cache]",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No logs."),
) -> None:
    """Download the files of a hub model that conservcheck reads, and print the snapshot folder.

    For machines without network: fetch where there is network, copy the cache folder, then audit there
    with HF_HUB_OFFLINE=1. Only what the adapters read is downloaded (one weights format, no ONNX or Flax
    exports); the commit, files and sizes go to stderr, the snapshot folder to stdout. With HF_HUB_OFFLINE=1
    it checks the cache instead of downloading. Exit codes: 0 done, 2 usage error or a model that cannot be
    fetched.
    """
    from conservcheck.adapters.resolve import fetch

    with logging_to_stderr(quiet):
        folder, adapter = fetch(model, revision=revision, cache_dir=cache_dir)
        log.info("%s: read by the %s adapter; load it offline with HF_HUB_OFFLINE=1", folder.name[:12], adapter)
    typer.echo(str(folder))
