"""Reference resolution, hub access and the adapter registry, with the real huggingface_hub code.

This machine cannot reach the Hub. Cache hits and revision resolution run offline (HF_HUB_OFFLINE=1)
against a hub-cache layout written into a tmp folder. Repository-not-found, gated and bad-revision
errors are triggered for real: huggingface_hub talks to a loopback HTTP server that answers as the Hub
does (status code plus its ``X-Error-Code`` header), so huggingface_hub raises its own exception classes
from its own response handling; network-unreachable uses a closed loopback port.
"""

import hashlib
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from conservcheck import ModelLoadError, UsageError, VectorFieldProbe, adapters
from conservcheck.adapters import hub
from conservcheck.adapters.resolve import load_reference, resolve

pytestmark = pytest.mark.usefixtures("single_thread")

COMMIT_A = "a" * 40
COMMIT_B = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def online(monkeypatch):
    import huggingface_hub.constants

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("huggingface_hub was imported with HF_HUB_OFFLINE set")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


@pytest.fixture
def cached(ddpm_folder, hub_cache):
    """owner/tiny cached at two commits: main → A (linear schedule), tag v1 → B (cosine schedule)."""
    hub_cache("owner/tiny", ddpm_folder("linear"), COMMIT_A, refs=("main",))
    return hub_cache("owner/tiny", ddpm_folder("squaredcos_cap_v2"), COMMIT_B, refs=("v1",))


def _one_line(err):
    assert "\n" not in str(err) and err.hint, str(err)
    return str(err)


# ---------------------------------------------------------------------------------------------------
# Local references


def test_local_folder(ddpm_folder):
    folder = ddpm_folder()
    probe = load_reference(str(folder))
    assert probe.info.adapter == "diffusers" and probe.info.reference == str(folder)
    assert probe.info.revision is None and probe.info.extra["source"] == "local"
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert probe.info.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_local_folder_inside_the_hub_cache_records_its_commit(cached):
    folder = cached / "models--owner--tiny" / "snapshots" / COMMIT_B
    info = load_reference(str(folder)).info
    assert info.revision == COMMIT_B and info.name == "owner/tiny" and info.extra["source"] == "local"


def test_missing_path_and_unrecognised_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="no file or folder"):
        load_reference(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no file or folder"):
        load_reference("just-a-name")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match="no adapter recognises") as err:
        load_reference(str(tmp_path))
    _one_line(err.value)


def test_revision_for_a_local_path_is_a_usage_error(ddpm_folder):
    with pytest.raises(UsageError, match="not a hub id"):
        load_reference(str(ddpm_folder()), revision="main")


def test_prefixed_references_are_dispatched_before_paths():
    assert resolve("embedded:digits16").kind == "embedded"
    assert resolve("embedded:digits16").spec == "digits16"
    res = resolve("mypkg.models:make_probe")
    assert res.kind == "factory" and res.spec == "mypkg.models:make_probe"


def test_adapter_can_be_forced(ddpm_folder):
    assert load_reference(str(ddpm_folder()), adapter="diffusers").info.adapter == "diffusers"
    with pytest.raises(ModelLoadError, match="no adapter named"):
        load_reference(str(ddpm_folder()), adapter="nope")


# ---------------------------------------------------------------------------------------------------
# Hub cache, offline


def test_offline_cache_hit_records_commit_and_weights_hash(cached, offline):
    probe = load_reference("owner/tiny", cache_dir=cached)
    snap = cached / "models--owner--tiny" / "snapshots" / COMMIT_A
    assert probe.info.revision == COMMIT_A and probe.info.name == "owner/tiny"
    assert probe.info.reference == "owner/tiny" and probe.info.extra["source"] == "hub"
    blob = (snap / "unet" / "diffusion_pytorch_model.safetensors").resolve()
    assert probe.info.weights_sha256 == blob.name == hashlib.sha256(blob.read_bytes()).hexdigest()
    assert probe.time_convention.name == "linear"


@pytest.mark.parametrize(
    "ref,kw",
    [
        ("owner/tiny", {"revision": "v1"}),
        ("owner/tiny@v1", {}),
        ("owner/tiny", {"revision": COMMIT_B}),
        (f"owner/tiny@{COMMIT_B}", {}),
    ],
)
def test_offline_revision_resolution(cached, offline, ref, kw):
    probe = load_reference(ref, cache_dir=cached, **kw)
    assert probe.info.revision == COMMIT_B and probe.time_convention.name == "squaredcos_cap_v2"


def test_two_revisions_is_a_usage_error(cached, offline):
    with pytest.raises(UsageError, match="two revisions"):
        load_reference("owner/tiny@v1", revision="main", cache_dir=cached)


def test_offline_miss(cached, offline):
    with pytest.raises(ModelLoadError) as err:
        load_reference("owner/absent", cache_dir=cached)
    msg = _one_line(err.value)
    assert "owner/absent is not in the hub cache" in msg and "HF_HUB_OFFLINE=1" in msg
    assert err.value.hint == "run once with network access or pass a local folder"


def test_offline_uncached_revision_lists_the_cached_ones(cached, offline):
    with pytest.raises(ModelLoadError) as err:
        load_reference("owner/tiny", revision="v2", cache_dir=cached)
    msg = _one_line(err.value)
    assert "revision 'v2' of owner/tiny" in msg and f"cached: main, v1, {COMMIT_B}, {COMMIT_A}" in msg


@pytest.mark.slow
def test_offline_env_var_at_interpreter_start(cached):
    """HF_HUB_OFFLINE=1 set before huggingface_hub is imported (the usual way) works the same."""
    code = textwrap.dedent(f"""
        from conservcheck.adapters.resolve import load_reference
        print(load_reference("owner/tiny@v1", cache_dir={str(cached)!r}).info.revision)
    """)
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(cached)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == COMMIT_B, out.stderr[-2000:]


def test_diffusers_wrapped_errors_are_explained(tmp_path):
    """diffusers re-raises hub errors as OSError with the original as the cause; the chain is followed."""
    from diffusers import UNet2DModel

    with pytest.raises(OSError) as raised:
        UNet2DModel.from_pretrained("owner/missing", cache_dir=tmp_path, local_files_only=True)
    err = hub.explain(raised.value, "owner/missing", cache_dir=tmp_path, offline=True)
    assert "owner/missing is not in the hub cache" in _one_line(err)


# ---------------------------------------------------------------------------------------------------
# Hub errors, triggered through huggingface_hub's own HTTP handling


class _HubErrors(BaseHTTPRequestHandler):
    """Answers like the Hub's API for three failures; anything else is a 500."""

    def do_GET(self):  # noqa: N802
        if "/owner/missing" in self.path:
            code, error = 404, "RepoNotFound"
        elif "/owner/gated" in self.path:
            code, error = 403, "GatedRepo"
        elif "/revision/nope" in self.path:
            code, error = 404, "RevisionNotFound"
        else:
            code, error = 500, None
        self.send_response(code)
        if error:
            self.send_header("X-Error-Code", error)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub(online):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HubErrors)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "ref,kw,message,hint",
    [
        ("owner/missing", {}, "model repository owner/missing was not found on the Hub", "check the spelling"),
        ("owner/gated", {}, "owner/gated is a gated repository", "accept the license at {ep}/owner/gated and log in"),
        (
            "owner/tiny",
            {"revision": "nope"},
            "revision 'nope' does not exist in owner/tiny",
            "{ep}/owner/tiny/commits/main",
        ),
        ("owner/broken", {}, "answered HTTP 500 for owner/broken", "try again later"),
    ],
)
def test_hub_errors(fake_hub, tmp_path, ref, kw, message, hint):
    with pytest.raises(ModelLoadError) as err:
        load_reference(ref, cache_dir=tmp_path, endpoint=fake_hub, **kw)
    assert message in _one_line(err.value)
    assert hint.format(ep=fake_hub) in err.value.hint


def test_unreachable_network(online, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ModelLoadError) as err:
        load_reference("owner/tiny", cache_dir=tmp_path, endpoint=f"http://127.0.0.1:{port}")
    assert "cannot reach the Hub" in _one_line(err.value) and "check the network connection" in err.value.hint


# ---------------------------------------------------------------------------------------------------
# Registry


def test_builtin_order():
    names = [e.name for e in adapters.registered()]
    # text_to_image before latent: a Stable Diffusion folder also has the unet/, scheduler/ and vae/ latent looks for
    assert names[:9] == ["embedded", "diffusers", "text_to_image", "dit", "sd3", "latent", "score_sde", "edm", "flow"]


def test_broken_third_party_adapter_does_not_break_the_others(tmp_path, monkeypatch, ddpm_folder):
    site = tmp_path / "site"
    dist = site / "ccthird-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ccthird\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[conservcheck.adapters]\naaa_broken = ccthird_broken\nzzz_good = ccthird_good\ndiffusers = ccthird_good\n"
    )
    (site / "ccthird_broken.py").write_text("raise ImportError('missing dependency')\n")
    (site / "ccthird_good.py").write_text(
        textwrap.dedent("""
        import torch
        from conservcheck import VectorFieldProbe
        NAME = "good"
        def detect(path):
            return (path / "good.txt").is_file()
        def load(path, *, device="cpu", dtype=torch.float32, trust_remote_code=False, **options):
            return VectorFieldProbe(lambda x, t: -x, sample_shape=(2,), device=device, dtype=dtype)
    """)
    )
    monkeypatch.syspath_prepend(str(site))
    for mod in ("ccthird_broken", "ccthird_good"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    entries = {e.name: e for e in adapters.registered()}
    assert entries["diffusers"].target == "conservcheck.adapters.diffusers_unet"  # built-ins cannot be shadowed
    assert [n for n in entries if n in ("aaa_broken", "zzz_good")] == ["aaa_broken", "zzz_good"]
    model = tmp_path / "model"
    model.mkdir()
    (model / "good.txt").write_text("")
    with pytest.warns(RuntimeWarning, match="aaa_broken"):
        probe = load_reference(str(model))
    assert isinstance(probe, VectorFieldProbe) and probe.info.reference == str(model)
    assert torch.equal(probe.score(torch.ones(1, 2), 0.5), -torch.ones(1, 2))
    assert load_reference(str(ddpm_folder())).info.adapter == "diffusers"
