"""What a user can get wrong when naming a model or data, through the command line: each case prints
exactly one line ``error: <problem> (<fix>)`` on stderr and exits with code 2; and pickles that need
code to load are refused unless ``--trust-remote-code`` is given, which the report then records.

Hub failures are produced by huggingface_hub's own response handling: it talks to a loopback HTTP
server that answers like the Hub (status code and ``X-Error-Code`` header). The command line has no
endpoint option; the server is reached the way ``HF_ENDPOINT`` reaches a mirror, through huggingface_hub's
``constants.ENDPOINT`` (which that variable sets at import). The messages here are the ones
docs/errors.md lists.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import threading
from http.server import ThreadingHTTPServer

import numpy as np
import pytest
import torch
from test_adapter_edm import EDMPrecond, Touch, _write_pickle
from test_adapter_score_sde import write_checkpoint
from test_networks_score_sde import NETS
from test_references import _HubErrors
from typer.testing import CliRunner

from conservcheck import OUProcess, VectorFieldProbe
from conservcheck.adapters._diffusers import SUPPORTED_SCHEDULERS
from conservcheck.adapters.resolve import load_reference
from conservcheck.cli.app import app
from conservcheck.errors import ModelLoadError
from conservcheck.safe_load import DAMAGED_HINT, TRUST_HINT

pytestmark = pytest.mark.usefixtures("single_thread")

runner = CliRunner()
QUICK = ["--samples", "2", "--points", "8", "--paths", "rotation", "--curl", "none", "--times", "0.5", "-q"]
COMMIT = "b" * 40


def flat_probe(device="cpu", dtype=torch.float64, **_) -> VectorFieldProbe:
    """s(x, t) = −x on 2-vectors with data range [−1, 1] (the target of the --data cases)."""
    return VectorFieldProbe(lambda x, t: -x, process=OUProcess(), sample_shape=(2,), device=device, dtype=dtype)


def fails(*args, cache) -> str:
    """Run ``conservcheck audit ARGS``; assert exit code 2 and one stderr line; return it without ``error: ``."""
    r = runner.invoke(app, ["audit", *map(str, args), *QUICK, "--cache-dir", str(cache)])
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    return lines[0][len("error: ") :]


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


@pytest.fixture
def model(ddpm_folder, tmp_path):
    """Factory: a fresh copy of the tiny DDPM pipeline folder, to damage."""

    def copy(name: str = "m"):
        return shutil.copytree(ddpm_folder(), tmp_path / name)

    return copy


# ---------------------------------------------------------------------------------------------------
# Hub references


class _Hub(_HubErrors):
    """tests/test_references.py's Hub answers, plus a 401 gated repository, a disabled one, and a
    repository whose listed file the Hub cannot serve."""

    def do_GET(self):  # noqa: N802
        if "/owner/gated401" in self.path:
            return self._answer(401, {"X-Error-Code": "GatedRepo"})
        if "/owner/disabled" in self.path:
            return self._answer(403, {"X-Error-Message": "Access to this resource is disabled."})
        if self.path.startswith("/api/models/owner/listed/revision/main"):
            info = {"id": "owner/listed", "sha": COMMIT, "siblings": [{"rfilename": "model_index.json"}]}
            return self._answer(200, {"Content-Type": "application/json"}, json.dumps(info).encode())
        if self.path.startswith(f"/api/models/owner/listed/tree/{COMMIT}"):
            tree = [{"type": "file", "path": "model_index.json", "size": 2, "oid": "0" * 40}]
            return self._answer(200, {"Content-Type": "application/json"}, json.dumps(tree).encode())
        if self.path.startswith("/owner/listed/resolve/"):
            return self._answer(404, {"X-Error-Code": "EntryNotFound"})
        return super().do_GET()

    do_HEAD = do_GET

    def _answer(self, code, headers, body=b""):
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)


@pytest.fixture
def hub_server(monkeypatch):
    """The loopback Hub's address (network access on for this test)."""
    import huggingface_hub.constants

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("huggingface_hub was imported with HF_HUB_OFFLINE set")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def hub(hub_server, monkeypatch):
    """The loopback Hub, set as huggingface_hub's endpoint for this test."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub_server)
    return hub_server


LOGIN = "(`hf auth login` or HF_TOKEN)"


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["owner/missing"],
            "model repository owner/missing was not found on the Hub ({ep}) "
            f"(check the spelling; for a private repository log in {LOGIN})",
        ),
        (
            ["owner/tiny@nope"],
            "revision 'nope' does not exist in owner/tiny "
            "(use a branch, tag or commit hash listed at {ep}/owner/tiny/commits/main)",
        ),
        (
            ["owner/tiny", "--revision", "nope"],
            "revision 'nope' does not exist in owner/tiny "
            "(use a branch, tag or commit hash listed at {ep}/owner/tiny/commits/main)",
        ),
        (
            ["owner/gated"],
            "owner/gated is a gated repository and this account has no access "
            f"(accept the license at {{ep}}/owner/gated and log in {LOGIN})",
        ),
        (
            ["owner/gated401"],
            "owner/gated401 is a gated repository and this account has no access "
            f"(accept the license at {{ep}}/owner/gated401 and log in {LOGIN})",
        ),
        (
            ["owner/disabled"],
            "access to owner/disabled has been disabled on the Hub ({ep}) (use another model or a local copy)",
        ),
        (
            ["owner/broken"],
            "the Hub ({ep}) answered HTTP 500 for owner/broken (try again later or pass a local folder)",
        ),
    ],
)
def test_hub_references(hub, cache, args, message):
    assert fails(*args, cache=cache) == message.format(ep=hub)


def test_listed_file_the_hub_cannot_serve(hub_server, cache):
    """File downloads take their address from a URL template huggingface_hub fixes at import (from
    HF_ENDPOINT), so this case, the one that downloads a file, passes the endpoint to load_reference."""
    with pytest.raises(ModelLoadError) as err:
        load_reference("owner/listed", cache_dir=cache, endpoint=hub_server)
    assert str(err.value) == (
        f"the Hub ({hub_server}) lists a file of owner/listed (revision main) that it cannot serve "
        "(the repository changed during the download: run again, or pin a commit as owner/name@<commit hash>)"
    )


def test_offline_without_a_cached_copy(monkeypatch, cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache.mkdir()
    assert fails("owner/tiny", cache=cache) == (
        f"owner/tiny is not in the hub cache at {cache} and HF_HUB_OFFLINE=1 forbids downloading "
        "(run once with network access or pass a local folder)"
    )


def test_unreachable_hub(monkeypatch, cache):
    import socket

    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("huggingface_hub was imported with HF_HUB_OFFLINE set")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    assert fails("owner/tiny", cache=cache) == (
        f"cannot reach the Hub ({endpoint}) and owner/tiny (revision main) is not in the hub cache at {cache} "
        "(check the network connection, or pass a local folder, or use a cached copy with HF_HUB_OFFLINE=1)"
    )


# ---------------------------------------------------------------------------------------------------
# Local references


def test_missing_path(cache):
    assert fails("./no/such/model", cache=cache) == (
        "no file or folder './no/such/model', and it is not a hub id (owner/name) "
        "(check the path, or name a hub model as owner/name[@revision])"
    )


def test_folder_that_is_no_model(tmp_path, cache):
    (tmp_path / "notes.txt").write_text("not a model")
    assert fails(tmp_path, cache=cache) == (
        f"no adapter recognises {tmp_path} (expected a diffusers model folder, a score_sde / EDM checkpoint or a "
        "flow model; wrap anything else with a 'module:factory' reference)"
    )


def _weights(folder):
    return folder / "unet" / "diffusion_pytorch_model.safetensors"


def test_truncated_safetensors(model, cache):
    folder = model()
    blob = _weights(folder).read_bytes()
    _weights(folder).write_bytes(blob[: len(blob) // 2])
    assert fails(folder, cache=cache) == (
        f"weights file {_weights(folder)} is damaged: truncated ({len(blob) // 2} of {len(blob)} "
        f"bytes) ({DAMAGED_HINT})"
    )


@pytest.mark.parametrize(
    "data, detail",
    [
        (b"", "0 bytes, shorter than a safetensors header"),
        (
            b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!",
            "its header is not a safetensors header (JSONDecodeError)",
        ),
        (b"\xff" * 8 + b"{}", "its header claims 18446744073709551615 bytes but the file has 10"),
    ],
)
def test_corrupt_safetensors(model, cache, data, detail):
    folder = model()
    _weights(folder).write_bytes(data)
    assert fails(folder, cache=cache) == f"weights file {_weights(folder)} is damaged: {detail} ({DAMAGED_HINT})"


def _edit(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
    return path


def test_unknown_scheduler(model, cache):
    folder = model()
    config = _edit(folder / "scheduler" / "scheduler_config.json", _class_name="FooScheduler")
    assert fails(folder, cache=cache) == (
        f"unsupported scheduler class 'FooScheduler' in {config} (supported schedulers: "
        f"{', '.join(SUPPORTED_SCHEDULERS)}; wrap other models with a 'module:factory' reference)"
    )


def test_scheduler_value_diffusers_rejects(model, cache):
    folder = model()
    config = _edit(folder / "scheduler" / "scheduler_config.json", beta_schedule="wiggly")
    assert fails(folder, cache=cache) == (
        f"diffusers cannot build DDPMScheduler from {config} (NotImplementedError: wiggly is not implemented for "
        "<class 'diffusers.schedulers.scheduling_ddpm.DDPMScheduler'>) "
        "(fix that value, or re-save the scheduler the model was trained with (save_pretrained))"
    )


def test_schedule_that_is_no_noise_schedule(model, cache):
    folder = model()
    config = _edit(folder / "scheduler" / "scheduler_config.json", beta_start=0.5, beta_end=1.5)
    assert fails(folder, cache=cache).startswith(f"the schedule in {config} is not a noise schedule (alpha_bar must")


def test_unreadable_scheduler_config(model, cache):
    folder = model()
    (folder / "scheduler" / "scheduler_config.json").write_text("{not json")
    assert fails(folder, cache=cache) == (
        f"{folder / 'scheduler' / 'scheduler_config.json'} is not a JSON object: the noise schedule decides the "
        "model's units (download the model again, or save the training scheduler there (save_pretrained))"
    )


def test_weights_that_do_not_fit_the_config(model, cache):
    folder = model("grown")
    _edit(
        folder / "unet" / "config.json",
        down_block_types=["AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    )
    assert fails(folder, cache=cache) == (
        f"the weights in {folder / 'unet'} lack 10 parameters of its config.json "
        "(first: down_blocks.0.attentions.0.group_norm.bias) "
        "(restore the config.json saved with these weights, or re-save the model with save_pretrained)"
    )
    folder = model("widened")
    _edit(folder / "unet" / "config.json", block_out_channels=[16, 32, 32, 32])
    assert fails(folder, cache=cache).startswith(
        f"the weights in {folder / 'unet'} do not fit its config.json (size mismatch for conv_in.weight: "
    )


def test_missing_weights(model, cache):
    folder = model()
    _weights(folder).unlink()
    assert fails(folder, cache=cache) == (
        f"no weights file diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin in {folder / 'unet'} "
        "(check that the download finished (or the variant name) and the folder is a saved diffusers model)"
    )


def test_damaged_pickle_weights(model, cache):
    folder = model()
    _weights(folder).unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"garbage" * 10)
    assert fails(folder, cache=cache) == (
        f"weights file {folder / 'unet' / 'diffusion_pytorch_model.bin'} is damaged: not a complete torch file "
        f"(UnpicklingError: Unsupported operand 103) ({DAMAGED_HINT})"
    )


# ---------------------------------------------------------------------------------------------------
# Untrusted code


def _pickled_unet(model, payload):
    """The tiny DDPM with its UNet weights saved as a .bin pickle of ``payload(state dict)``."""
    from safetensors.torch import load_file

    folder = model()
    state = load_file(str(_weights(folder)))
    _weights(folder).unlink()
    torch.save(payload(state), folder / "unet" / "diffusion_pytorch_model.bin")
    return folder


def test_pickle_that_runs_code_is_refused(model, tmp_path, cache):
    marker = tmp_path / "code-ran"
    folder = _pickled_unet(model, lambda state: {**state, "hook": Touch(marker)})
    assert fails(folder, cache=cache) == (
        f"diffusion_pytorch_model.bin in {folder / 'unet'} needs arbitrary unpickling (getattr), "
        f"which can run code ({TRUST_HINT})"
    )
    assert not marker.exists()


def test_trusted_pickle_loads_and_the_report_says_so(model, tmp_path, cache):
    folder = _pickled_unet(model, lambda state: collections.defaultdict(list, state))
    data = tmp_path / "x0.npy"
    np.save(data, np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)))
    assert "collections.defaultdict" in fails(folder, cache=cache)
    out = tmp_path / "report.json"
    r = runner.invoke(
        app,
        [
            "audit",
            str(folder),
            *QUICK,
            "--cache-dir",
            str(cache),
            "--data",
            str(data),
            "--trust-remote-code",
            "--json",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["options"]["trust_remote_code"] is True  # the flag as given
    assert report["model"]["trust_remote_code"] is True  # and as used by the loader
    assert report["model"]["weights_loader"] == "torch.load(weights_only=False)"


def test_score_sde_checkpoint_that_needs_code(tmp_path, cache):
    path, _, _ = write_checkpoint(
        tmp_path / "sde", NETS["ncsnpp_cifar10_ve"], extra={"args": argparse.Namespace(lr=1e-4)}
    )
    assert fails(path, cache=cache) == (
        f"{path.name} needs arbitrary unpickling (argparse.Namespace), which can run code ({TRUST_HINT})"
    )


def test_edm_network_pickle(tmp_path, cache):
    marker = tmp_path / "code-ran"
    path = _write_pickle(tmp_path / "net", {"ema": EDMPrecond(), "loss_fn": Touch(marker)})
    assert fails(path, cache=cache) == (
        f"{path.name} is a pickled network: loading it runs code from the file (the network source that "
        "torch_utils.persistence embeds) (pass trust_remote_code=True (CLI: --trust-remote-code) if you trust "
        "its source, with NVlabs/edm's repository on PYTHONPATH for its torch_utils and dnnlib)"
    )
    assert not marker.exists()


def test_data_file_that_needs_code(tmp_path, cache):
    marker = tmp_path / "code-ran"
    data = tmp_path / "x0.pt"
    torch.save({"x": torch.zeros(4, 2), "hook": Touch(marker)}, data)
    assert fails("test_errors:flat_probe", "--data", data, cache=cache) == (
        f"{data} holds a pickled getattr, and loading it would run code "
        "(save the samples as a plain tensor (torch.save(x)) or as .npy)"
    )
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# Bad data


HINT = "pass a folder of images, an .npy/.npz/.pt array, or a .parquet/.csv/.jsonl table (local or hf://)"


@pytest.mark.parametrize(
    "name, write, message",
    [
        (
            "few.npy",
            lambda p: np.save(p, np.zeros((1, 2))),
            "{p} holds 1 samples, the audit needs 2 (pass --samples 1 or more data)",
        ),
        (
            "shape.npy",
            lambda p: np.save(p, np.zeros((4, 3))),
            "{p} holds samples of shape (3,), the model expects (2,) (save the samples as [N, "
            "*sample_shape], [N, H, W, C] or [N, D] (arrays are never resized))",
        ),
        (
            "range.npy",
            lambda p: np.save(p, np.full((4, 2), 3.0)),
            "{p} values span [3, 3], outside the model's data range [-1, 1] "
            "(rescale the data to the model's range, or save 8-bit images (uint8))",
        ),
        ("nan.npy", lambda p: np.save(p, np.array([[0.0, np.nan]] * 4)), "{p} contains NaN or Inf (clean the data)"),
        ("cut.npy", lambda p: p.write_bytes(b"\x93NUMPY\x01\x00"), "cannot read array file {p}: "),
        (
            "two.npz",
            lambda p: np.savez(p, a=np.zeros((4, 2)), b=np.zeros((4, 2))),
            "{p} holds 2 arrays (a, b) (name one as two.npz#<key>)",
        ),
        ("x.txt", lambda p: p.write_text("1 2"), "cannot read '{p}': unknown data format .txt ({hint})"),
        ("images", lambda p: p.mkdir(), "no image files in {p} (the folder must hold png/jpg/... images)"),
    ],
)
def test_bad_data(tmp_path, cache, name, write, message):
    path = tmp_path / name
    write(path)
    got = fails("test_errors:flat_probe", "--data", path, cache=cache)
    expected = message.format(p=path, hint=HINT)
    assert got == expected if not expected.endswith(": ") else got.startswith(expected), got
