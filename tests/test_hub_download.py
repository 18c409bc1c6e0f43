"""Downloads from the Hub, with huggingface_hub's own download code against a loopback server that answers
as the Hub does: the files the adapters read and nothing else, their sizes logged, the resolved commit
recorded, ``conservcheck fetch`` for air-gapped machines, and then ``HF_HUB_OFFLINE=1`` served from the cache
huggingface_hub wrote (its cached file list included).

The server implements the four endpoints a snapshot download uses — ``/api/models/<id>/revision/<rev>``
(repository info with file sizes), ``/api/models/<id>/tree/<rev>`` (the recursive file list),
``HEAD``/``GET /<id>/resolve/<rev>/<path>`` (file metadata: ``X-Repo-Commit``, ``ETag``, ``Content-Length``;
then the bytes) — and records every file it serves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest
import torch
from conftest import published_checkpoints

from conservcheck import ModelLoadError, UsageError
from conservcheck.adapters import hub, hub_files
from conservcheck.adapters.resolve import fetch, load_reference

pytestmark = pytest.mark.usefixtures("single_thread")

PC = published_checkpoints()


class FakeHub:
    """Repositories served over HTTP: ``add(repo_id, files, commit)`` (files: path → bytes); ``served``
    lists the files downloaded (GET on resolve)."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.served: list[str] = []
        hub_state = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code, body=b"", headers=None):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, obj):
                self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

            def do_GET(self):  # noqa: N802
                path = unquote(urlparse(self.path).path)
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/.*)?)?", path)
                if m:
                    repo = hub_state.repos.get(m.group(1))
                    if repo is None:
                        return self._send(404, headers={"X-Error-Code": "RepoNotFound"})
                    rev = m.group(3) or "main"
                    commit = repo["refs"].get(rev, rev)
                    files = repo["commits"].get(commit)
                    if files is None:
                        return self._send(404, headers={"X-Error-Code": "RevisionNotFound"})
                    if m.group(2) != "tree":
                        siblings = [{"rfilename": f, "size": len(b)} for f, b in sorted(files.items())]
                        return self._json({"id": m.group(1), "sha": commit, "siblings": siblings, "private": False})
                    tree = [
                        {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                        for f, b in sorted(files.items())
                    ]
                    return self._json(tree)
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if m and m.group(1) in hub_state.repos:
                    repo = hub_state.repos[m.group(1)]
                    commit = repo["refs"].get(m.group(2), m.group(2))
                    data = repo["commits"].get(commit, {}).get(m.group(3))
                    if data is None:
                        return self._send(404, headers={"X-Error-Code": "EntryNotFound"})
                    if self.command == "GET":
                        hub_state.served.append(m.group(3))
                    etag = f'"{hashlib.sha256(data).hexdigest()}"'
                    return self._send(200, data, {"X-Repo-Commit": commit, "ETag": etag})
                return self._send(404, headers={"X-Error-Code": "RepoNotFound"})

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, repo_id: str, files: dict[str, bytes], commit: str, ref: str = "main") -> None:
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}})
        repo["commits"][commit] = dict(files)
        repo["refs"][ref] = commit

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub.constants

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("huggingface_hub was imported with HF_HUB_OFFLINE set")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    server = FakeHub()
    # the CLI has no endpoint flag: HF_ENDPOINT, which huggingface_hub reads into these when imported
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.endpoint)
    template = huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE
    monkeypatch.setattr(
        huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + template[template.index("/{") :]
    )
    yield server
    server.close()


def _published(repo_id: str, weights=("bin",)) -> dict[str, bytes]:
    """A published repository's files, with the exports and extras such repositories carry besides."""
    files = PC.repo_files(PC.REPOS[repo_id], size="small", weights=weights)
    files[".gitattributes"] = b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    files["images/generated_image_0.png"] = b"\x89PNG not really"
    files["diffusion_flax_model.msgpack"] = b"flax weights"
    files["unet.onnx"] = b"onnx export"
    return files


COMMIT = "d" * 40
COMMIT2 = "e" * 40


def test_download_fetches_what_the_adapter_reads_and_logs_sizes(fake_hub, tmp_path, caplog):
    repo_id = "google/ddpm-cifar10-32"
    files = _published(repo_id, weights=("bin", "safetensors"))
    fake_hub.add(repo_id, files, COMMIT)
    cache = tmp_path / "hub"
    with caplog.at_level(logging.INFO, logger="conservcheck"):
        probe = load_reference(repo_id, cache_dir=cache, endpoint=fake_hub.endpoint)
    expected = ["config.json", "diffusion_pytorch_model.safetensors", "model_index.json", "scheduler_config.json"]
    assert sorted(fake_hub.served) == expected  # never the .bin beside the .safetensors, Flax, ONNX, images
    assert probe.info.revision == COMMIT and probe.info.extra["weights_format"] == "safetensors"
    size = len(files["diffusion_pytorch_model.safetensors"])
    message = caplog.text
    assert f"{repo_id} at {COMMIT[:12]} (main): downloading 4 of the 4 files the adapters read" in message
    assert f"diffusion_pytorch_model.safetensors {hub.format_size(size)}" in message
    assert "not fetched: 6 files (.gitattributes, README.md, diffusion_flax_model.msgpack" in message

    # cached now: a second load downloads nothing
    fake_hub.served.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="conservcheck"):
        load_reference(repo_id, cache_dir=cache, endpoint=fake_hub.endpoint)
    assert fake_hub.served == [] and "cached: the 4 files the adapters read (nothing to download)" in caplog.text


def test_offline_after_download_is_served_from_the_cache(fake_hub, tmp_path, monkeypatch):
    """huggingface_hub caches the repository's whole file list; offline, the planned files must be there
    (not the files left out on purpose), and the commit and weights are those downloaded."""
    repo_id = "google/ncsnpp-celebahq-256"
    fake_hub.add(repo_id, _published(repo_id), COMMIT)
    cache = tmp_path / "hub"
    online = load_reference(repo_id, cache_dir=cache, endpoint=fake_hub.endpoint)
    fake_hub.close()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    probe = load_reference(repo_id, cache_dir=cache)
    assert probe.info.revision == COMMIT and probe.info.weights_sha256 == online.info.weights_sha256
    assert probe.info.extra["sigma_max"] == 348.0
    # a planned file lost from the cache: huggingface_hub's completeness check names the copy incomplete
    snap = hub.repo_folder(repo_id, cache) / "snapshots" / COMMIT
    (snap / "diffusion_pytorch_model.bin").unlink()
    with pytest.raises(ModelLoadError, match=f"the cached copy of {repo_id} .* is incomplete"):
        load_reference(repo_id, cache_dir=cache)


def test_variant_download(fake_hub, tmp_path):
    """variant="fp16" fetches the fp16 weights only; without a variant, the default weights only."""
    from diffusers import DDPMPipeline, DDPMScheduler

    folder = tmp_path / "saved"
    unet = PC.build_model(PC.REPOS["google/ddpm-cifar10-32"].models[0], "small", 0)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    pipe.save_pretrained(folder)
    pipe.unet.to(torch.float16)
    pipe.save_pretrained(folder, variant="fp16")
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    fake_hub.add("someone/ddpm-variants", files, COMMIT)
    load_reference("someone/ddpm-variants", cache_dir=tmp_path / "a", endpoint=fake_hub.endpoint, variant="fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fake_hub.served
    assert "unet/diffusion_pytorch_model.safetensors" not in fake_hub.served
    fake_hub.served.clear()
    load_reference("someone/ddpm-variants", cache_dir=tmp_path / "b", endpoint=fake_hub.endpoint)
    assert [f for f in fake_hub.served if "diffusion_pytorch_model" in f] == [
        "unet/diffusion_pytorch_model.safetensors"
    ]


def test_fetch_command_then_offline_audit(fake_hub, tmp_path, monkeypatch):
    """``conservcheck fetch`` prints the snapshot folder (stdout) and what it fetched (stderr); the cache it
    fills serves an audit with HF_HUB_OFFLINE=1 and no network."""
    from typer.testing import CliRunner

    from conservcheck.cli.app import app

    repo_id = "CompVis/ldm-celebahq-256"
    fake_hub.add(repo_id, _published(repo_id), COMMIT)
    fake_hub.add(repo_id, _published(repo_id), COMMIT2, ref="v2")
    cache = tmp_path / "hub"
    result = CliRunner().invoke(app, ["fetch", repo_id, "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    snap = hub.repo_folder(repo_id, cache) / "snapshots" / COMMIT
    assert result.stdout.strip() == str(snap)
    assert "downloading 6 of the 6 files the adapters read" in result.stderr
    assert "read by the latent adapter" in result.stderr
    assert sorted(fake_hub.served) == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.bin",
        "vqvae/config.json",
        "vqvae/diffusion_pytorch_model.bin",
    ]
    result = CliRunner().invoke(app, ["fetch", f"{repo_id}@v2", "--cache-dir", str(cache), "-q"])
    assert result.exit_code == 0 and result.stdout.strip().endswith(COMMIT2) and result.stderr == ""

    fake_hub.close()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["fetch", repo_id, "--cache-dir", str(cache)])
    assert result.exit_code == 0 and result.stdout.strip() == str(snap)
    out = tmp_path / "report.json"
    args = ["audit", repo_id, "--cache-dir", str(cache), "--paths", "rotation", "--curl", "none", "--samples", "1"]
    args += ["--points", "4", "--sampler-steps", "2", "--time-indices", "500", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["model"]["revision"] == COMMIT


@pytest.mark.parametrize(
    "args,message",
    [
        (["fetch", "embedded:digits"], "'embedded:digits' is not a hub id"),
        (["fetch", "./model"], "'./model' is not a hub id"),
        (["fetch", "owner/name@v1", "--revision", "v2"], "two revisions for owner/name"),
        (["fetch", "owner/missing"], "model repository owner/missing was not found on the Hub"),
    ],
)
def test_fetch_errors_are_one_line(fake_hub, tmp_path, args, message):
    from typer.testing import CliRunner

    from conservcheck.cli.app import app

    result = CliRunner().invoke(app, [*args, "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_fetch_offline_without_a_cached_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="owner/name is not in the hub cache"):
        fetch("owner/name", cache_dir=tmp_path)
    with pytest.raises(UsageError, match="not a hub id"):
        fetch("a/b/c", cache_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------------
# The download plan on published file lists


@pytest.mark.parametrize(
    "listing,expected",
    [
        # google/ddpm-cifar10-32 after a safetensors copy was added, with Flax weights and images beside
        (
            [
                ".gitattributes",
                "README.md",
                "config.json",
                "diffusion_flax_model.msgpack",
                "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.safetensors",
                "images/generated_image_0.png",
                "model_index.json",
                "scheduler_config.json",
            ],
            ["config.json", "diffusion_pytorch_model.safetensors", "model_index.json", "scheduler_config.json"],
        ),
        # a pipeline with subfolders, a text encoder no adapter reads, and a single-file checkpoint at the root
        (
            [
                "model_index.json",
                "scheduler/scheduler_config.json",
                "text_encoder/config.json",
                "text_encoder/model.safetensors",
                "unet/config.json",
                "unet/diffusion_pytorch_model.bin",
                "unet/diffusion_pytorch_model.fp16.safetensors",
                "unet/diffusion_pytorch_model.safetensors",
                "unet/diffusion_pytorch_model.onnx",
                "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors",
                "v1-5-pruned.ckpt",
            ],
            [
                "model_index.json",
                "scheduler/scheduler_config.json",
                "text_encoder/config.json",
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors",
                "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors",
            ],
        ),
        # sharded weights: the index and the shards named like it
        (
            [
                "unet/config.json",
                "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
                "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
                "unet/diffusion_pytorch_model.safetensors.index.json",
                "unet/diffusion_pytorch_model-00001-of-00002.bin",
                "unet/diffusion_pytorch_model.bin.index.json",
                "model_index.json",
            ],
            [
                "model_index.json",
                "unet/config.json",
                "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
                "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
                "unet/diffusion_pytorch_model.bin.index.json",
                "unet/diffusion_pytorch_model.safetensors.index.json",
            ],
        ),
        # an original-repository checkpoint (score_sde): configs and checkpoints, not the docs
        (
            ["README.md", "checkpoint_48.pth", "config.yaml", "samples.png", "ema.bin", "ema.safetensors"],
            ["checkpoint_48.pth", "config.yaml", "ema.safetensors"],
        ),
    ],
)
def test_plan(listing, expected):
    assert hub_files.plan(listing) == expected


def test_plan_variants():
    listing = ["unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors", "model_index.json"]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in hub_files.plan(listing)
    two = [*listing, "unet/diffusion_pytorch_model.ema.safetensors"]
    with pytest.raises(ModelLoadError, match="only the variants ema, fp16 in unet/"):
        hub_files.plan(two)
    assert "unet/diffusion_pytorch_model.ema.safetensors" in hub_files.plan(two, variant="ema")
