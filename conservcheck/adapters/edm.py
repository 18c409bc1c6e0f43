"""EDM-style denoisers D(x; σ) (Karras et al. 2022; NVlabs/edm ``training/networks.py``).

EDM writes every model as a denoiser in variance-exploding coordinates, x = y + σ n with clean data
y ∈ [−1, 1]:

    D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ))

with the raw network F and the preconditioning of one of four formulations (the table of EDM's
``VPPrecond``, ``VEPrecond``, ``iDDPMPrecond`` and ``EDMPrecond``):

==========  ======================  ===========================  =================  ===============================
name        c_skip                  c_out                        c_in               c_noise
==========  ======================  ===========================  =================  ===============================
``vp``      1                       −σ                           1/√(σ² + 1)        (M − 1) σ⁻¹(σ)
``ve``      1                       σ                            1                  ln(½ σ)
``iddpm``   1                       −σ                           1/√(σ² + 1)        M − 1 − j, u_j the nearest level
``edm``     σ_d²/(σ² + σ_d²)        σ σ_d/√(σ² + σ_d²)           1/√(σ² + σ_d²)     ¼ ln σ
==========  ======================  ===========================  =================  ===============================

(VP: σ(t) = √(e^{½β_d t² + β_min t} − 1), β_d = 19.9, β_min = 0.1, M = 1000; iDDPM's levels u_j follow
its cosine schedule with C₁ = 0.001, C₂ = 0.008 and F has 2C output channels of which the first C are
used; σ_d = 0.5.) The score is
s = (D(x; σ) − x)/σ²: the probe uses :class:`VEProcess` (canonical time σ) with the ``x0``
parameterization.

:func:`wrap` builds a probe from a raw network F and a preconditioning name, or from a module that is
already a denoiser. :func:`load` reads EDM's network pickles (``network-snapshot-*.pkl``, the ``ema``
entry): they are pickles of the module itself whose classes ``torch_utils.persistence`` stores as the
source of their Python module, executed again when the pickle loads — so loading runs code and needs
``trust_remote_code=True``, and NVlabs/edm's ``torch_utils`` and ``dnnlib`` must be importable (the
pickle references ``torch_utils.persistence._reconstruct_persistent_obj``; the embedded source imports
``torch_utils`` modules too). Those
networks compute in float32 whatever the probe's dtype (EDM's preconditioners cast their inputs), and
their attention is a legacy ``torch.autograd.Function`` (``AttentionOp``) that has no forward-mode rule
and does not work under ``torch.func`` transforms.
"""

from __future__ import annotations

import inspect
import math
import pathlib
import pickle
import zipfile
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from conservcheck.adapters._diffusers import check_options
from conservcheck.adapters.weights import hash_files, single_file
from conservcheck.errors import ModelLoadError, UsageError, reason
from conservcheck.parameterization import conversion
from conservcheck.probe import ProbeInfo, VectorFieldProbe
from conservcheck.process import TimeConvention, VEProcess
from conservcheck.safe_load import pickle_names

NAME = "edm"

SUFFIXES = (".pkl", ".pt", ".pth")
PRECOND_CLASSES = ("EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond")
_MARKERS = (b"torch_utils.persistence",) + tuple(name.encode() for name in PRECOND_CLASSES)
CONDITIONS = ("class_label",)
_OPTIONS = ("key", "precision", *CONDITIONS)
# how much of a pickle to scan for EDM's class names in detect()


# ---------------------------------------------------------------------------------------------------
# Preconditionings


class Preconditioning:
    """c_skip, c_out, c_in, c_noise of one EDM formulation as functions of σ (tensors [B])."""

    name = "preconditioning"
    output_factor = 1  # F's output channels per data channel

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}


class EDMPreconditioning(Preconditioning):
    """EDM's own (``EDMPrecond``): unit-variance input and training target for data of std σ_d."""

    name = "edm"

    def __init__(self, sigma_data: float = 0.5) -> None:
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / torch.sqrt(sigma**2 + sd2)
        c_in = 1 / torch.sqrt(sigma**2 + sd2)
        return c_skip, c_out, c_in, torch.log(sigma) / 4

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sigma_data": self.sigma_data}


class VPPreconditioning(Preconditioning):
    """Song et al.'s VP formulation (``VPPrecond``): F predicts ε, fed the rescaled VP time (M − 1) t."""

    name = "vp"

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000) -> None:
        self.beta_d, self.beta_min, self.M = float(beta_d), float(beta_min), int(M)

    def sigma(self, t: Tensor) -> Tensor:
        """σ(t) = √(exp(½ β_d t² + β_min t) − 1)."""
        return torch.sqrt(torch.expm1(0.5 * self.beta_d * t**2 + self.beta_min * t))

    def sigma_inv(self, sigma: Tensor) -> Tensor:
        """t(σ) = (√(β_min² + 2 β_d ln(1 + σ²)) − β_min)/β_d."""
        return (torch.sqrt(self.beta_min**2 + 2 * self.beta_d * torch.log1p(sigma**2)) - self.beta_min) / self.beta_d

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return torch.ones_like(sigma), -sigma, 1 / torch.sqrt(sigma**2 + 1), (self.M - 1) * self.sigma_inv(sigma)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "beta_d": self.beta_d, "beta_min": self.beta_min, "M": self.M}


class VEPreconditioning(Preconditioning):
    """Song et al.'s VE formulation (``VEPrecond``): F predicts the scaled score, fed ln(½ σ)."""

    name = "ve"

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        one = torch.ones_like(sigma)
        return one, sigma, one, torch.log(0.5 * sigma)


class IDDPMPreconditioning(Preconditioning):
    """Nichol & Dhariwal's improved DDPM (``iDDPMPrecond``): F predicts ε (first C of 2C channels), fed the
    index of the nearest noise level of its cosine schedule, counted from the clean end."""

    name = "iddpm"
    output_factor = 2

    def __init__(self, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000) -> None:
        self.C_1, self.C_2, self.M = float(C_1), float(C_2), int(M)
        # the levels in float32 with EDM's operations, so the nearest-level index is the one it trained with
        u = torch.zeros(self.M + 1, dtype=torch.float32)
        for j in range(self.M, 0, -1):
            ratio = (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=self.C_1)
            u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
        self.u = u

    def alpha_bar(self, j: int) -> Tensor:
        """ᾱ_j = sin²(½π j / (M (C₂ + 1))), float32."""
        return (0.5 * math.pi * torch.as_tensor(j) / self.M / (self.C_2 + 1)).sin() ** 2

    def index(self, sigma: Tensor) -> Tensor:
        """j with u_j nearest to σ (u_0 = σ_max … u_M = 0)."""
        u = self.u.to(device=sigma.device, dtype=sigma.dtype)
        return (sigma.reshape(-1, 1) - u.reshape(1, -1)).abs().argmin(dim=1).reshape(sigma.shape)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c_noise = (self.M - 1 - self.index(sigma)).to(sigma.dtype)
        return torch.ones_like(sigma), -sigma, 1 / torch.sqrt(sigma**2 + 1), c_noise

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "C_1": self.C_1, "C_2": self.C_2, "M": self.M}


PRECONDITIONINGS: dict[str, type[Preconditioning]] = {
    "edm": EDMPreconditioning,
    "vp": VPPreconditioning,
    "ve": VEPreconditioning,
    "iddpm": IDDPMPreconditioning,
}


def preconditioning(name: str, **params: Any) -> Preconditioning:
    """A preconditioning by name (``edm``, ``vp``, ``ve``, ``iddpm``) with its parameters (e.g. ``sigma_data``)."""
    try:
        cls = PRECONDITIONINGS[name.lower()]
    except KeyError:
        raise UsageError(f"unknown EDM preconditioning {name!r}", f"use one of {', '.join(PRECONDITIONINGS)}") from None
    try:
        return cls(**params)
    except TypeError as err:
        raise UsageError(
            f"bad parameters for the {name!r} preconditioning ({err})", "see conservcheck.adapters.edm"
        ) from None


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class Denoiser(torch.nn.Module):
    """D(x; σ) = c_skip x + c_out F(c_in x; c_noise) around a raw network ``F(x, c_noise)``.

    Networks written for EDM (``SongUNet``, ``DhariwalUNet``) also take ``class_labels``; they get None.
    """

    def __init__(self, net: Callable[..., Tensor], precond: Preconditioning, channels: int) -> None:
        super().__init__()
        self.net = net
        self.precond = precond
        self.channels = int(channels)
        self._labels = _accepts(net, "class_labels")

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        c_skip, c_out, c_in, c_noise = self.precond.coefficients(sigma.reshape(-1))
        shape = (-1,) + (1,) * (x.ndim - 1)
        x_in = c_in.to(x.dtype).reshape(shape) * x
        noise = c_noise.to(x.dtype)
        out = self.net(x_in, noise, class_labels=None) if self._labels else self.net(x_in, noise)
        f = out[:, : self.channels].to(x.dtype)
        return c_skip.to(x.dtype).reshape(shape) * x + c_out.to(x.dtype).reshape(shape) * f


class DenoiserCall(torch.nn.Module):
    """``fn(x, σ)`` of an already-preconditioned denoiser module or callable ``D(x, σ)``.

    ``force_fp32=True`` is passed to modules that accept it (EDM's preconditioners would otherwise run
    their network in float16 on CUDA).
    """

    def __init__(self, denoiser: Callable[..., Tensor]) -> None:
        super().__init__()
        self.denoiser = denoiser
        self._force_fp32 = _accepts(denoiser, "force_fp32")

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.denoiser(x, sigma, force_fp32=True) if self._force_fp32 else self.denoiser(x, sigma)


def wrap(
    net: Callable[..., Tensor],
    *,
    sample_shape: tuple[int, ...],
    precond: str | Preconditioning | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    data_range: tuple[float, float] = (-1.0, 1.0),
    precision: str | None = None,
    info: ProbeInfo | None = None,
    **precond_params: Any,
) -> VectorFieldProbe:
    """A probe for an EDM-style model: a raw network F with ``precond`` (name or object), or — with
    ``precond=None`` — a denoiser ``D(x, σ)`` that already includes its preconditioning.

    ``sample_shape`` is (C, H, W) of one sample; σ is the canonical time (:class:`VEProcess`).
    """
    if precond is None:
        if precond_params:
            raise UsageError(
                f"preconditioning parameters {sorted(precond_params)} given without a preconditioning",
                "pass precond='edm', 'vp', 've' or 'iddpm'",
            )
        fn: torch.nn.Module = DenoiserCall(net)
        scheme: str | dict[str, Any] = "denoiser D(x; sigma) as given"
    else:
        p = precond if isinstance(precond, Preconditioning) else preconditioning(precond, **precond_params)
        fn = Denoiser(net, p, sample_shape[0])
        scheme = p.to_dict()
    info = info if info is not None else ProbeInfo(name=type(net).__name__, adapter=NAME)
    info.extra.setdefault("family", "edm")
    info.extra.setdefault("preconditioning", scheme)
    info.extra.setdefault("native_time", "sigma (noise standard deviation; x = y + sigma n)")
    info.extra.setdefault("output", "denoised D(x; sigma)")
    info.extra.setdefault("data_range", list(data_range))
    info.extra.setdefault("conversion", conversion("x0", alpha="1").replace("x0_hat", "D(x; sigma)"))
    return VectorFieldProbe(
        fn,
        process=VEProcess(),
        sample_shape=sample_shape,
        parameterization="x0",
        time_convention=TimeConvention(),
        data_range=data_range,
        device=device,
        dtype=dtype,
        precision=precision,
        info=info,
    )


# ---------------------------------------------------------------------------------------------------
# EDM network pickles


def _is_network_pickle(file: pathlib.Path) -> bool:
    return file.is_file() and file.suffix.lower() in SUFFIXES and any(m in pickle_names(file) for m in _MARKERS)


def network_file(path: pathlib.Path) -> pathlib.Path | None:
    """The EDM network pickle a path names: the file, or the one such file in a folder."""
    return single_file(path, _is_network_pickle, "EDM network pickles")


def detect(path: pathlib.Path) -> bool:
    """A pickle (``.pkl``, or a torch ``.pt``/``.pth``) naming EDM's preconditioner classes or its
    ``torch_utils.persistence``, found without unpickling; or a folder holding exactly one."""
    try:
        return network_file(pathlib.Path(path)) is not None
    except ModelLoadError:
        return True


#: What unpickling an EDM network pickle needs besides the trust flag.
EDM_REPO_HINT = (
    "put NVlabs/edm's repository on PYTHONPATH (e.g. PYTHONPATH=/path/to/edm): the pickle carries its networks' "
    "source but imports torch_utils and dnnlib from there"
)


def _hyperparameter(net: torch.nn.Module, name: str) -> Any:
    """A plain attribute in which an NVlabs network keeps a hyperparameter (``img_resolution``, ``sigma_data``,
    ...): torch types a Module's unknown attributes as Tensor | Module."""
    return getattr(net, name)


def _unpickle(file: pathlib.Path) -> Any:
    try:
        if zipfile.is_zipfile(file):
            return torch.load(file, map_location="cpu", weights_only=False)
        with open(file, "rb") as f:
            return pickle.load(f)
    except ModuleNotFoundError as err:
        raise ModelLoadError(
            f"unpickling {file.name} imports the module {err.name!r}, which is not installed", EDM_REPO_HINT
        ) from err
    except Exception as err:
        raise ModelLoadError(
            f"cannot unpickle {file.name} ({reason(err)})",
            "check that the file is a complete EDM network pickle",
        ) from err


def load(
    path: pathlib.Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    **options: Any,
) -> VectorFieldProbe:
    """A probe for an EDM network pickle (the preconditioned module under ``key``, default ``"ema"``).

    Refused unless ``trust_remote_code`` is true: unpickling the module runs code. Options: ``key`` (the
    entry of a pickled dict), ``precision`` (default ``fp32``: EDM's networks compute in float32),
    ``class_label`` (a class-conditional network's label(s) or ``"random"``:
    :mod:`conservcheck.adapters.edm_conditional`).
    """
    check_options(options, _OPTIONS)
    path = pathlib.Path(path)
    file = network_file(path)
    if file is None:
        raise ModelLoadError(
            f"{path} is not an EDM network pickle", "pass a network-snapshot-*.pkl written by NVlabs/edm"
        )
    if not trust_remote_code:
        raise ModelLoadError(
            f"{file.name} is a pickled network: loading it runs code from the file (the network source that "
            "torch_utils.persistence embeds)",
            "pass trust_remote_code=True (CLI: --trust-remote-code) if you trust its source, with NVlabs/edm's "
            "repository on PYTHONPATH for its torch_utils and dnnlib",
        )
    obj = _unpickle(file)
    key = options.get("key", "ema")
    if isinstance(obj, dict):
        if key not in obj:
            raise ModelLoadError(
                f"{file.name} has no entry {key!r} (entries: {', '.join(map(str, obj))})",
                "pass key=<entry holding the network>",
            )
        obj = obj[key]
    if not isinstance(obj, torch.nn.Module) or not hasattr(obj, "img_channels") or not hasattr(obj, "img_resolution"):
        raise ModelLoadError(
            f"{file.name} holds a {type(obj).__name__}, not an EDM preconditioned network",
            "pass a network pickle written by NVlabs/edm",
        )
    label_dim = int(getattr(obj, "label_dim", 0) or 0)
    if label_dim == 0 and options.get("class_label") is not None:
        raise UsageError(f"{file.name} holds an unconditional network: it takes no --class-label", "drop --class-label")
    net = obj.eval().requires_grad_(False).to(device)
    res = int(_hyperparameter(net, "img_resolution"))
    shape = (int(_hyperparameter(net, "img_channels")), res, res)
    digest, per_file = hash_files([file], file.parent)
    info = ProbeInfo(
        name=file.name,
        adapter=NAME,
        reference=str(path),
        weights_sha256=digest,
        trust_remote_code=True,
        extra={
            "preconditioning": type(net).__name__,
            "sigma_data": float(_hyperparameter(net, "sigma_data")) if hasattr(net, "sigma_data") else None,
            "native_range": [float(getattr(net, "sigma_min", 0.0)), float(getattr(net, "sigma_max", math.inf))],
            "internal_dtype": "float32 (EDM's preconditioners cast their inputs)",
            "weights_files": per_file,
            "weights_format": "pickle",
            "weights_loader": "pickle.load (runs code)"
            if not zipfile.is_zipfile(file)
            else "torch.load(weights_only=False)",
            "autodiff": "attention is a legacy torch.autograd.Function: no forward-mode AD, no torch.func transforms",
        },
    )
    if label_dim > 0:
        from conservcheck.adapters import edm_conditional

        return edm_conditional.wrap(
            net,
            label_dim=label_dim,
            class_label=options.get("class_label"),
            sample_shape=shape,
            device=device,
            dtype=dtype,
            precision=options.get("precision") or "fp32",
            info=info,
        )
    return wrap(
        net, sample_shape=shape, device=device, dtype=dtype, precision=options.get("precision") or "fp32", info=info
    )
