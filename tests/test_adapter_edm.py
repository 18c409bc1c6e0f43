"""EDM denoisers: the four preconditionings against the exact Gaussian score, and pickle loading.

Oracle: data N(0, σ_d² I) with σ_d = 0.8 (≠ 1, and ≠ EDM's σ_data = 0.5, where the ideal EDM network F
would vanish). Noised in EDM's VE coordinates x = y + σ n, the ideal denoiser is D*(x; σ) = σ_d²/(σ_d² +
σ²) x and the exact score −x/(σ_d² + σ²). The oracle raw network recovers σ from the c_noise it is fed and
returns the F that makes D = D*, using the formulas of EDM's preconditioning table written out here.
"""

from __future__ import annotations

import math
import pathlib
import pickle

import pytest
import torch

from conservcheck.adapters import edm
from conservcheck.adapters.resolve import load_reference
from conservcheck.errors import ModelLoadError, UsageError
from conservcheck.geometry import jacobian

SIGMA_D = 0.8
SHAPE = (2, 4, 4)
M = 1000


def exact_score(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return -x / (SIGMA_D**2 + sigma**2).reshape(-1, 1, 1, 1)


def iddpm_levels() -> torch.Tensor:
    """iDDPM's noise levels u_0 > … > u_M = 0 by EDM's recursion, in float32 as EDM computes them."""
    u = torch.zeros(M + 1)
    abar = lambda j: (0.5 * math.pi * torch.tensor(j) / M / 1.008).sin() ** 2  # noqa: E731 - C_2 = 0.008
    for j in range(M, 0, -1):
        u[j - 1] = ((u[j] ** 2 + 1) / (abar(j - 1) / abar(j)).clip(min=0.001) - 1).sqrt()
    return u


def table(name: str, c_noise: torch.Tensor) -> tuple:
    """(σ, c_skip, c_out, c_in) of EDM's table, σ recovered from c_noise."""
    if name == "edm":
        sigma = torch.exp(4 * c_noise)
        return (
            sigma,
            0.25 / (sigma**2 + 0.25),
            0.5 * sigma / torch.sqrt(sigma**2 + 0.25),
            1 / torch.sqrt(sigma**2 + 0.25),
        )
    if name == "ve":
        sigma = 2 * torch.exp(c_noise)
        return sigma, torch.ones_like(sigma), sigma, torch.ones_like(sigma)
    if name == "vp":
        t = c_noise / (M - 1)
        sigma = torch.sqrt(torch.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1)
    else:
        sigma = iddpm_levels().to(c_noise.dtype)[(M - 1 - c_noise).round().long()]
    return sigma, torch.ones_like(sigma), -sigma, 1 / torch.sqrt(sigma**2 + 1)


class OracleF(torch.nn.Module):
    """The raw network F(c_in x; c_noise) that the preconditioning ``name`` turns into D*."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x_in, c_noise, class_labels=None):
        sigma, c_skip, c_out, c_in = (c.reshape(-1, 1, 1, 1) for c in table(self.name, c_noise))
        x = x_in / c_in
        f = (SIGMA_D**2 / (SIGMA_D**2 + sigma**2) * x - c_skip * x) / c_out
        # iDDPM networks also predict a variance: 2C channels, of which the first C are used
        return torch.cat([f, torch.full_like(f, 7.0)], 1) if self.name == "iddpm" else f


class EDMPrecond(torch.nn.Module):
    """A preconditioned denoiser with the interface of EDM's ``EDMPrecond`` around the oracle."""

    def __init__(self, label_dim: int = 0) -> None:
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = SHAPE[1], SHAPE[0], label_dim
        self.sigma_data, self.sigma_min, self.sigma_max = 0.5, 0.002, 80.0
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.model = OracleF("edm")
        self.calls_fp32 = []

    def forward(self, x, sigma, class_labels=None, force_fp32=False):
        self.calls_fp32.append(force_fp32)
        return edm.Denoiser(self.model, edm.EDMPreconditioning(0.5), SHAPE[0])(x, sigma) * self.weight


class Touch:
    """Unpickling this creates ``path``: evidence of code run while loading."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def inputs(sigma: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.tensor(sigma, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(sigma), *SHAPE, generator=g, dtype=torch.float64) * torch.sqrt(SIGMA_D**2 + s**2).reshape(
        -1, 1, 1, 1
    )
    return x, s


@pytest.mark.parametrize("name", ["edm", "vp", "ve"])
def test_preconditioned_oracle_gives_exact_score(name):
    x, sigma = inputs([0.002, 0.05, 0.5, 3.0, 80.0])
    probe = edm.wrap(OracleF(name), precond=name, sample_shape=SHAPE, dtype=torch.float64)
    assert probe.process.name == "ve" and probe.parameterization == "x0"
    got = probe.score(x, sigma)
    # float64: s = (D - x)/sigma^2 cancels D - x ~ (sigma/sigma_d)^2 x, which at sigma = 0.002 costs a factor
    # (sigma_d/sigma)^2 = 1.6e5 on 2.2e-16 rounding, ~4e-11 (measured 1.8e-11 in norm)
    assert torch.allclose(got, exact_score(x, sigma), rtol=1e-9, atol=0)


def test_iddpm_oracle_on_its_levels():
    u = iddpm_levels().double()
    sigma = u[[3, 100, 500, 900, 999]]  # on the table: the nearest level is σ itself
    x, _ = inputs([0.0] * 5)
    x = x / SIGMA_D * torch.sqrt(SIGMA_D**2 + sigma**2).reshape(-1, 1, 1, 1)
    probe = edm.wrap(OracleF("iddpm"), precond="iddpm", sample_shape=SHAPE, dtype=torch.float64)
    # cancellation in D - x costs (sigma_d/u_999)^2 = 1.6e4 on float64 rounding: ~4e-12
    assert torch.allclose(probe.score(x, sigma), exact_score(x, sigma), rtol=1e-10, atol=0)
    levels = edm.IDDPMPreconditioning().u
    # The same float32 operations on scalars, in the same order: the same bits on any one machine.
    assert torch.equal(levels, iddpm_levels())
    # Against an independent computation: the recursion in float64 (Python floats). EDM evaluates it in
    # float32: each level adds its own rounding (a few ulps of 2^-24 through sin², the ratio and the square
    # root), and carries the rounding of the level below without growth (u_{j−1}² r = u_j² + 1 − r ≥ u_j²,
    # so a relative error of u_j² shrinks in u_{j−1}²). Near the clean end (u_j² + 1)/r − 1 cancels
    # (r = ᾱ_{j−1}/ᾱ_j → 1) and amplifies the rounding of r by ≈ 1/u_j². 16 ulps × (1 + 1/u_j²) bounds both (measured
    # 1.1e-7 at u_0 and 4.8e-4 at u_{M−1}; the bound is 9.5e-7 and 2.3e-2 there). Platforms differ in the
    # last bits of float32 sin and sqrt, so no level is pinned to its bits.
    exact = [0.0] * (M + 1)
    abar = lambda j: math.sin(0.5 * math.pi * j / M / 1.008) ** 2  # noqa: E731 - C_2 = 0.008
    for j in range(M, 0, -1):
        exact[j - 1] = math.sqrt((exact[j] ** 2 + 1) / max(abar(j - 1) / abar(j), 0.001) - 1)
    ref = torch.tensor(exact[:M], dtype=torch.float64)
    bound = 16 * 2.0**-24 * (1 + 1 / ref**2)
    assert bool(((levels[:M].double() - ref).abs() <= bound * ref).all()) and float(levels[M]) == 0.0
    # sigma_max = u_0 and sigma_min = u_{M-1} of NVlabs/edm's own iDDPMPrecond (float32, read from it on
    # one machine): within the same bound of the float64 values, so within twice of ours.
    assert float(levels[0]) == pytest.approx(20291.171875, rel=2 * float(bound[0]))
    assert float(levels[M - 1]) == pytest.approx(0.006422337144613266, rel=2 * float(bound[M - 1]))


def test_coefficient_known_values():
    s = torch.tensor([0.5], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm.EDMPreconditioning(0.5).coefficients(s)
    # at sigma = sigma_data: c_skip = 1/2, c_out = sigma_data/sqrt 2, c_in = 1/(sigma_data sqrt 2)
    want = torch.tensor([0.5, 0.5 / math.sqrt(2), math.sqrt(2), math.log(0.5) / 4], dtype=torch.float64)
    assert torch.allclose(torch.cat([c_skip, c_out, c_in, c_noise]), want, rtol=1e-15, atol=0)
    assert float(edm.VEPreconditioning().coefficients(torch.tensor([2.0]))[3]) == 0.0  # c_noise = ln(sigma/2)
    vp = edm.VPPreconditioning()
    # EDM's VPPrecond: sigma_max = sigma(1) = 152.167 (it reports 152.16698 in float32); sigma(1e-5) =
    # sqrt(expm1(1.000995e-6)) = 1.0004976e-3 (EDM's float32 exp(.) - 1 rounds its sigma_min to 9.766e-4)
    assert float(vp.sigma(torch.tensor(1.0, dtype=torch.float64))) == pytest.approx(152.16698, rel=1e-6)
    assert float(vp.sigma(torch.tensor(1e-5, dtype=torch.float64))) == pytest.approx(1.0004976e-3, rel=1e-6)
    assert float(vp.coefficients(vp.sigma(torch.tensor([1.0], dtype=torch.float64)))[3]) == pytest.approx(
        999.0, rel=1e-12
    )


def test_wrap_preconditioned_module():
    x, sigma = inputs([0.01, 1.0, 20.0])
    net = EDMPrecond().double()
    probe = edm.wrap(net, sample_shape=SHAPE, dtype=torch.float64)
    # float64; cancellation in D - x at sigma = 0.01 costs a factor 6.4e3 on rounding
    assert torch.allclose(probe.score(x, sigma), exact_score(x, sigma), rtol=1e-10, atol=0)
    assert net.calls_fp32 == [True]  # EDM preconditioners are asked to stay in float32


def _write_pickle(folder: pathlib.Path, payload: dict) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "network-snapshot-000200.pkl"
    with open(path, "wb") as f:
        pickle.dump(payload, f)
    return path


def test_pickle_needs_trust(tmp_path):
    marker = tmp_path / "code-ran"
    path = _write_pickle(tmp_path / "net", {"ema": EDMPrecond(), "loss_fn": Touch(marker)})
    assert edm.detect(path) and edm.detect(path.parent)
    with pytest.raises(ModelLoadError, match="trust_remote_code=True") as err:
        edm.load(path)
    assert "\n" not in str(err.value) and not marker.exists()
    with pytest.raises(ModelLoadError, match="trust_remote_code=True"):
        load_reference(str(path))
    assert not marker.exists()
    probe = load_reference(str(path), trust_remote_code=True, dtype=torch.float64)
    assert marker.exists() and probe.info.adapter == "edm"
    assert probe.info.trust_remote_code and probe.info.extra["preconditioning"] == "EDMPrecond"
    assert probe.sample_shape == SHAPE and probe.precision == "fp32" and probe.info.extra["sigma_data"] == 0.5
    x, sigma = inputs([0.1, 2.0])
    # the oracle module computes in the input's float64 (its float32 weight is exactly 1)
    assert torch.allclose(probe.score(x, sigma), exact_score(x, sigma), rtol=1e-10, atol=0)


def test_pickle_errors(tmp_path, ncsnpp_folder):
    path = _write_pickle(tmp_path / "cond", {"ema": EDMPrecond(label_dim=10)})
    with pytest.raises(UsageError, match="a class-conditional model needs a class label"):
        edm.load(path, trust_remote_code=True)
    with pytest.raises(ModelLoadError, match="no entry 'net'"):
        edm.load(path, trust_remote_code=True, key="net")
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    assert not edm.detect(plain) and not edm.detect(ncsnpp_folder)


class LegacyIdentity(torch.autograd.Function):
    """An old-style autograd.Function (no setup_context, no jvp), like EDM's AttentionOp."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * 1.0


def test_legacy_autograd_function_falls_back_from_forward_mode():
    base = OracleF("edm")

    def raw(x_in, c_noise):
        return LegacyIdentity.apply(base(x_in, c_noise))

    probe = edm.wrap(raw, precond="edm", sample_shape=SHAPE, dtype=torch.float64)
    x, sigma = inputs([0.3, 1.5])
    choice = jacobian.select_strategy(probe.score, x, sigma)
    # torch.func refuses the Function; its backward is made of differentiable ops, so reverse over
    # reverse works and is chosen; central differences stay available
    assert "setup_context" in choice.rejected["jvp"]
    assert choice.name == "double_vjp" and "fd" in choice.deviations


def test_pickle_audit_end_to_end_records_the_trust_flag(tmp_path, audit_end_to_end):
    path = _write_pickle(tmp_path / "net", {"ema": EDMPrecond()})
    data = audit_end_to_end(path, "--trust-remote-code", "--sigmas", "0.5,2")
    assert data["model"]["adapter"] == "edm" and data["model"]["trust_remote_code"] is True
    assert data["options"]["trust_remote_code"] is True
    # The oracle denoiser is the exact score of N(0, σ_data² I): conservative, so every check passes.
    assert data["verdict"]["status"] == "pass", data["verdict"]


# ---------------------------------------------------------------------------------------------------
# Network pickles as NVlabs/edm writes them (torch_utils.persistence)
#
# EDM's training loop pickles {"ema", "loss_fn", "augment_pipe", "dataset_kwargs"} with plain pickle.
# Its networks are classes decorated with torch_utils.persistence.persistent_class: an instance pickles
# as a call of torch_utils.persistence._reconstruct_persistent_obj(meta), meta = {type: "class",
# version: 6, module_src: <the whole source of the class's module>, class_name, state: <its __dict__>},
# and unpickling executes module_src in a fresh module. So a snapshot references torch_utils.persistence
# (which imports dnnlib) by name and carries the source of training/networks.py and training/loss.py,
# whose imports (torch_utils.persistence, numpy, torch) must resolve. The stand-ins below are written
# here from that description: a torch_utils/dnnlib pair with the same names and pickle protocol, and a
# network module whose source, like EDM's, is embedded in the pickle.

DNNLIB_SRC = '''
class EasyDict(dict):
    """Stand-in for dnnlib.EasyDict: a dict with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name)

    def __setattr__(self, name, value):
        self[name] = value
'''

PERSISTENCE_SRC = '''
"""Stand-in for NVlabs/edm's torch_utils/persistence.py (same names, same pickle format)."""
import copy
import inspect
import sys
import types
import uuid

import dnnlib

_version = 6
_module_src = {}  # module name -> source, for modules rebuilt from a pickle


def is_persistent(cls):
    return "_orig_module_src" in getattr(cls, "__dict__", {})


def persistent_class(orig_class):
    if is_persistent(orig_class):
        return orig_class
    module = sys.modules[orig_class.__module__]
    src = _module_src.get(module.__name__) or inspect.getsource(module)

    class Decorator(orig_class):
        _orig_module_src = src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        def __reduce__(self):
            fields = list(super().__reduce__()) + [None] * 3
            meta = dict(type="class", version=_version, module_src=self._orig_module_src,
                        class_name=self._orig_class_name, state=fields[2])
            return (_reconstruct_persistent_obj, (meta,))

    Decorator.__name__ = orig_class.__name__
    Decorator.__module__ = orig_class.__module__
    return Decorator


def _reconstruct_persistent_obj(meta):
    meta = dnnlib.EasyDict(meta)
    assert meta.version == _version and meta.type == "class"
    module = types.ModuleType("_imported_module_" + uuid.uuid4().hex)
    sys.modules[module.__name__] = module
    _module_src[module.__name__] = meta.module_src
    exec(meta.module_src, module.__dict__)
    cls = persistent_class(module.__dict__[meta.class_name])
    obj = cls.__new__(cls)
    if callable(getattr(obj, "__setstate__", None)):
        obj.__setstate__(meta.state)
    else:
        obj.__dict__.update(meta.state)
    return obj
'''

# The network module: an EDMPrecond-like preconditioned denoiser (float32 inside, as EDM's) around the
# oracle raw network of N(0, SIGMA_D^2 I), with a persistent submodule inside a plain ModuleDict as in
# EDM's SongUNet. Executing this source touches $EDM_SOURCE_RAN: evidence that unpickling ran it.
NETWORKS_SRC = f"""
import os
import pathlib

import numpy as np
import torch
from torch_utils import persistence

if os.environ.get("EDM_SOURCE_RAN"):
    pathlib.Path(os.environ["EDM_SOURCE_RAN"]).touch()

SIGMA_D = {SIGMA_D}


@persistence.persistent_class
class Gain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.weight


@persistence.persistent_class
class OracleNet(torch.nn.Module):
    def __init__(self, sigma_data):
        super().__init__()
        self.sigma_data = sigma_data
        self.enc = torch.nn.ModuleDict({{"gain": Gain()}})

    def forward(self, x_in, c_noise, class_labels=None):
        sigma = torch.exp(4 * c_noise).reshape(-1, 1, 1, 1)
        sd2 = self.sigma_data ** 2
        x = x_in * torch.sqrt(sigma ** 2 + sd2)
        d_star = SIGMA_D ** 2 / (SIGMA_D ** 2 + sigma ** 2) * x
        c_out = sigma * self.sigma_data / torch.sqrt(sigma ** 2 + sd2)
        return self.enc["gain"]((d_star - sd2 / (sigma ** 2 + sd2) * x) / c_out)


@persistence.persistent_class
class EDMPrecond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0, sigma_max=float("inf"),
                 sigma_data=0.5):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.sigma_min, self.sigma_max, self.sigma_data = use_fp16, sigma_min, sigma_max, sigma_data
        self.model = OracleNet(sigma_data)

    def forward(self, x, sigma, class_labels=None, force_fp32=False):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == "cuda") else torch.float32
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten())
        return (c_skip * x + c_out * F_x.to(torch.float32)).to(torch.float32)


@persistence.persistent_class
class EDMLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
"""


@pytest.fixture
def edm_snapshot(tmp_path, monkeypatch):
    """(path of a network-snapshot pickle written through the persistence stand-in, the stand-in repo).

    The stand-in repository is importable only while the pickle is written; afterwards it is off
    sys.path and out of sys.modules, as on a machine without NVlabs/edm.
    """
    import sys

    repo = tmp_path / "edm"
    (repo / "torch_utils").mkdir(parents=True)
    (repo / "dnnlib").mkdir()
    (repo / "training").mkdir()
    (repo / "torch_utils" / "__init__.py").write_text("")
    (repo / "torch_utils" / "persistence.py").write_text(PERSISTENCE_SRC)
    (repo / "dnnlib" / "__init__.py").write_text(DNNLIB_SRC)
    (repo / "training" / "__init__.py").write_text("")
    (repo / "training" / "networks.py").write_text(NETWORKS_SRC)
    monkeypatch.syspath_prepend(str(repo))
    import importlib

    networks = importlib.import_module("training.networks")
    net = networks.EDMPrecond(img_resolution=SHAPE[1], img_channels=SHAPE[0], sigma_min=0.002, sigma_max=80.0)
    data = {
        "ema": net.eval().requires_grad_(False),
        "loss_fn": networks.EDMLoss(),
        "augment_pipe": None,
        "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "path": "x.zip", "use_labels": False},
    }
    path = tmp_path / "run" / "network-snapshot-000200.pkl"
    path.parent.mkdir()
    with open(path, "wb") as f:
        pickle.dump(data, f)
    monkeypatch.syspath_prepend(str(tmp_path))  # keep tmp_path importable; drop the repo below
    sys.path.remove(str(repo))
    for name in [m for m in sys.modules if m.split(".")[0] in ("torch_utils", "dnnlib", "training")]:
        monkeypatch.delitem(sys.modules, name)
    return path, repo


def test_persistence_pickle_references_what_edm_pickles_reference(edm_snapshot):
    import pickletools

    path, _ = edm_snapshot
    # the names the pickle imports: GLOBAL's argument, or STACK_GLOBAL's two strings (pushed or memo gets)
    globals_, pushed, memo = set(), [], {}
    for op, arg, _ in pickletools.genops(path.read_bytes()):
        if op.name == "GLOBAL":
            globals_.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            globals_.add(f"{pushed[-2]}.{pushed[-1]}")
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name in ("BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        elif "UNICODE" in op.name:
            pushed.append(arg)
        else:
            pushed.append(None)
    # what NVlabs/edm's snapshots reference by name: the persistence hook, torch's tensor rebuilders,
    # and the plain torch containers around persistent modules; the network classes travel as source
    assert "torch_utils.persistence._reconstruct_persistent_obj" in globals_
    assert "torch.nn.modules.container.ModuleDict" in globals_
    assert not any("training.networks" in g or "EDMPrecond" in g for g in globals_)
    assert b"class EDMPrecond(torch.nn.Module)" in path.read_bytes()
    assert edm.detect(path) and edm.detect(path.parent)


def test_edm_snapshot_without_trust_runs_nothing(edm_snapshot, tmp_path, monkeypatch):
    path, _ = edm_snapshot
    marker = tmp_path / "source-ran"
    monkeypatch.setenv("EDM_SOURCE_RAN", str(marker))
    with pytest.raises(ModelLoadError) as err:
        load_reference(str(path))
    assert str(err.value) == (
        f"{path.name} is a pickled network: loading it runs code from the file (the network source that "
        "torch_utils.persistence embeds) (pass trust_remote_code=True (CLI: --trust-remote-code) if you trust "
        "its source, with NVlabs/edm's repository on PYTHONPATH for its torch_utils and dnnlib)"
    )
    assert not marker.exists()


def test_edm_snapshot_with_trust_needs_edm_importable(edm_snapshot, tmp_path, monkeypatch):
    path, repo = edm_snapshot
    marker = tmp_path / "source-ran"
    monkeypatch.setenv("EDM_SOURCE_RAN", str(marker))
    with pytest.raises(ModelLoadError) as err:
        edm.load(path, trust_remote_code=True)
    assert str(err.value) == (
        f"unpickling {path.name} imports the module 'torch_utils', which is not installed ({edm.EDM_REPO_HINT})"
    )
    assert not marker.exists()
    # with the repository on sys.path (as PYTHONPATH puts it there) the embedded source runs and loads
    monkeypatch.syspath_prepend(str(repo))
    probe = edm.load(path, trust_remote_code=True, dtype=torch.float64)
    assert marker.exists()
    assert probe.info.extra["preconditioning"] == "EDMPrecond" and probe.sample_shape == SHAPE
    assert probe.info.extra["native_range"] == [0.002, 80.0] and probe.precision == "fp32"
    assert probe.info.extra["weights_loader"] == "pickle.load (runs code)"
    x, sigma = inputs([0.05, 0.7, 9.0])
    got, want = probe.score(x, sigma), exact_score(x, sigma)
    err = ((got - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1)).max()
    # D is computed in float32 (as EDM's preconditioners do); D − x cancels a factor (σ_d/σ)² = 256 at
    # σ = 0.05 on float32 rounding (6e-8): ~1.5e-5
    assert err < 1e-4, err


def test_edm_snapshot_errors_through_the_cli(edm_snapshot, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from conservcheck.cli.app import app

    path, _ = edm_snapshot
    runner = CliRunner()
    args = ["audit", str(path), "--paths", "rotation", "--samples", "1", "--cache-dir", str(tmp_path / "c")]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2
    lines = [ln for ln in refused.output.splitlines() if ln.strip()]
    assert lines == [
        f"error: {path.name} is a pickled network: loading it runs code from the file (the network "
        "source that torch_utils.persistence embeds) (pass trust_remote_code=True (CLI: "
        "--trust-remote-code) if you trust its source, with NVlabs/edm's repository on PYTHONPATH for "
        "its torch_utils and dnnlib)"
    ], refused.output
    missing = runner.invoke(app, [*args, "--trust-remote-code"])
    assert missing.exit_code == 2
    assert [ln for ln in missing.output.splitlines() if ln.strip()] == [
        f"error: unpickling {path.name} imports the module 'torch_utils', which is not installed ({edm.EDM_REPO_HINT})"
    ], missing.output
