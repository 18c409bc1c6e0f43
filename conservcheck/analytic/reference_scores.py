"""Reference scores s_ref(x, t) for the Stein diagnostic and the transport check (paper §4).

The Stein diagnostic compares a model with the score of a *known* noised distribution p_t. A
:class:`Reference` answers ``score(x, t)`` and, where it can, ``log_prob(x, t)`` (log p_t, for
likelihoods in the transport check), ``divergence(x, t)`` (∇·s_ref = Δ log p_t, exactly; otherwise the
diagnostic differentiates ``score``) and ``sample(n, generator)`` (clean data x0 ~ p_0).

* :class:`FieldReference` — an analytic field: :class:`~conservcheck.analytic.fields.GaussianMixture` (exact
  divergence added here) or :class:`~conservcheck.analytic.funnel.Funnel`.
* :class:`EmpiricalScore` — the exact score of a dataset's noised empirical distribution
  p_t = (1/N) Σ_i N(α x0_i, σ² I), streamed over data chunks so 50,000 CIFAR-sized samples fit in GPU
  memory; it works for any sample shape (images, latents).
* :class:`CallableReference` — a user's ``fn(x, t)`` in score units at canonical time, validated.

:func:`resolve_reference` turns a user's spec into one of these (its ``kind`` — the word before the
colon, or a callable's name — names the Stein diagnostic's variant in reports):

==============================  =====================================================================
spec                            reference
==============================  =====================================================================
``funnel``                      Neal's funnel with n = D − 1 (v first), scale 3
``funnel:scale=S``              the same with neck standard deviation S
``gaussian``                    Gaussian data N(0, I) in the probe's coordinates
``gaussian:std=S,mean=M``       Gaussian data N(M·1, S² I)
``mixture:<file>``              Gaussian mixture from .json / .npz / .pt holding ``means`` [K, D],
                                ``stds`` ([K] or [K, D]) and optionally ``weights`` [K]
``data:<file>``                 empirical score of the clean samples in an .npy / .npz / .pt array
                                [N, *shape] (or [N, D]) in the probe's data coordinates
a callable ``fn(x, t)``         that function (score units, canonical time)
a GaussianMixture / Funnel      that field (its process must be the probe's)
==============================  =====================================================================
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from conservcheck.analytic.fields import GaussianMixture
from conservcheck.analytic.funnel import Funnel
from conservcheck.errors import UsageError, reason
from conservcheck.files import input_file
from conservcheck.process import Process

_LOG_2PI = math.log(2 * math.pi)

SPEC_FORMS = "funnel[:scale=S], gaussian[:std=S,mean=M], mixture:<file>, data:<file> or a callable fn(x, t)"


def _times(process: Process, t: Tensor | float, batch: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """α(t), σ(t) as [B] tensors in ``like``'s dtype and device."""
    t = torch.as_tensor(t, dtype=torch.float64, device=like.device)
    tb = t.expand(batch) if t.ndim == 0 else t
    return process.alpha(tb).to(like.dtype), process.sigma(tb).to(like.dtype)


class Reference:
    """A reference score s_ref(x, t) = ∇ₓ log p_t(x) at canonical time t of ``process``.

    Inputs x are [B, *sample_shape]; t is [B] or 0-d. Subclasses override ``score`` and whichever of
    ``log_prob`` / ``divergence`` / ``sample`` they can answer, and set the matching ``has_*`` flags.
    """

    #: Short identifier used as the Stein diagnostic's variant (``funnel``, ``gaussian``, ``mixture``,
    #: ``data``, or a callable's name): letters, digits and underscores only.
    kind: str = "reference"
    #: Full description, e.g. the spec string it was resolved from.
    name: str = "reference"
    has_log_prob: bool = False
    has_divergence: bool = False
    has_sampler: bool = False

    def __init__(self, process: Process, sample_shape: tuple[int, ...]) -> None:
        self.process = process
        self.sample_shape = tuple(int(d) for d in sample_shape)

    @property
    def dim(self) -> int:
        return math.prod(self.sample_shape)

    def score(self, x: Tensor, t: Tensor | float) -> Tensor:
        """s_ref(x, t), shaped like x."""
        raise NotImplementedError

    __call__ = score

    def log_prob(self, x: Tensor, t: Tensor | float) -> Tensor:
        """log p_t(x), shape [B]."""
        raise UsageError(f"reference {self.name!r} has no log-density", "use an analytic or data reference")

    def divergence(self, x: Tensor, t: Tensor | float) -> Tensor:
        """∇·s_ref(x, t) = Δ log p_t(x), shape [B]."""
        raise UsageError(f"reference {self.name!r} has no closed-form divergence", "differentiate its score")

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n clean samples x0 ~ p_0, shape [n, *sample_shape]."""
        raise UsageError(f"reference {self.name!r} cannot draw samples", "pass clean samples explicitly")

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "process": self.process.to_dict(),
            "sample_shape": list(self.sample_shape),
            "log_prob": self.has_log_prob,
            "divergence": self.has_divergence,
            "sampler": self.has_sampler,
        }


def mixture_divergence(mix: GaussianMixture, x: Tensor, t: Tensor | float) -> Tensor:
    """∇·s of a diagonal Gaussian mixture's noised score, shape [B].

    With responsibilities r_k and component scores g_k = −(x − αμ_k)/v_k (v_k = α²c_k² + σ²):
    Δ log p = Σ_k r_k (−Σ_d 1/v_kd) + Σ_k r_k ‖g_k − ḡ‖², ḡ = Σ_k r_k g_k (Hessian = E_r[∇² log N_k] +
    Cov_r[∇ log N_k]); the covariance is summed centred so it does not cancel when one component dominates.
    """
    xf = x.reshape(x.shape[0], -1)
    a, s = _times(mix.process, t, x.shape[0], xf)
    var = a[:, None, None] ** 2 * mix.stds.to(xf)[None] ** 2 + s[:, None, None] ** 2
    diff = xf[:, None, :] - a[:, None, None] * mix.means.to(xf)[None]
    logj = mix.log_weights.to(xf)[None] - 0.5 * (diff**2 / var + torch.log(2 * math.pi * var)).sum(-1)
    r = torch.softmax(logj, dim=1)
    g = -diff / var
    gbar = (r[:, :, None] * g).sum(1, keepdim=True)
    return (r * (-(1 / var).sum(-1) + ((g - gbar) ** 2).sum(-1))).sum(1)


class FieldReference(Reference):
    """An analytic field with exact score, log-density and sampler: a GaussianMixture or a Funnel.

    Inputs of any sample shape holding the field's D components are flattened for the field.
    """

    has_log_prob = True
    has_divergence = True
    has_sampler = True

    def __init__(
        self,
        field: GaussianMixture | Funnel,
        name: str | None = None,
        sample_shape: tuple[int, ...] | None = None,
        kind: str | None = None,
    ) -> None:
        if not isinstance(field, (GaussianMixture, Funnel)):
            raise UsageError(f"no analytic reference for {type(field).__name__}", "pass a GaussianMixture or Funnel")
        shape = sample_shape if sample_shape is not None else (field.dim,)
        if math.prod(shape) != field.dim:
            raise UsageError(
                f"sample shape {tuple(shape)} does not hold the field's {field.dim} components",
                "match the reference's dimension to the probe's",
            )
        super().__init__(field.process, shape)
        self.field = field
        self.kind = kind or ("funnel" if isinstance(field, Funnel) else "mixture")
        self.name = name or self.kind

    def _flat(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)

    def score(self, x: Tensor, t: Tensor | float) -> Tensor:
        return self.field.score(self._flat(x), t).reshape(x.shape)

    __call__ = score

    def log_prob(self, x: Tensor, t: Tensor | float) -> Tensor:
        return self.field.log_prob(self._flat(x), t)

    def divergence(self, x: Tensor, t: Tensor | float) -> Tensor:
        if isinstance(self.field, Funnel):
            return self.field.divergence(self._flat(x), t)
        return mixture_divergence(self.field, x, t)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.field.sample(n, generator).reshape(n, *self.sample_shape)


class EmpiricalScore(Reference):
    """The exact score of the noised empirical distribution p_t = (1/N) Σ_i N(x; α x0_i, σ² I).

    s(x) = (α E_w[x0] − x)/σ² with softmax weights w_i ∝ exp(−‖x − α x0_i‖²/2σ²). The dataset is
    streamed in chunks of ``chunk_size`` rows with an online log-sum-exp (running maximum, rescaled
    running sums), so memory is O(B·chunk + B·D) beyond the data itself. Data are stored centred on
    their mean (distances are unchanged; the expanded ‖x‖² − 2αx·x0 + α²‖x0‖² loses less to rounding).

    Args:
        data: clean samples [N, *shape] in the model's data coordinates (pixels or latents).
        process: the noising process.
        chunk_size: dataset rows per streamed chunk.
        device, dtype: where and in what precision the data are kept and the sums run (float64 by
            default: at small σ the logits are large differences of large numbers).
        name: the reference's name in reports.
    """

    has_log_prob = True
    has_divergence = True
    has_sampler = True

    def __init__(
        self,
        data: Tensor,
        process: Process,
        chunk_size: int = 4096,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        name: str = "data",
    ) -> None:
        data = torch.as_tensor(data)
        if data.ndim < 2 or data.shape[0] < 1:
            raise UsageError(f"reference data has shape {tuple(data.shape)}", "pass clean samples as [N, *shape]")
        if int(chunk_size) < 1:
            raise UsageError(f"chunk_size must be positive, got {chunk_size}", "use e.g. 4096")
        flat = data.reshape(data.shape[0], -1).to(device=device or data.device, dtype=dtype)
        if not bool(torch.isfinite(flat).all()):
            raise UsageError("reference data contain NaN or Inf", "clean the data file")
        super().__init__(process, tuple(data.shape[1:]))
        self.kind, self.name = "data", name
        self.chunk_size = int(chunk_size)
        self.mean = flat.mean(0)
        self.centred = flat - self.mean
        self.sq_norms = (self.centred**2).sum(1)

    @property
    def n_data(self) -> int:
        return int(self.centred.shape[0])

    def _prepare(self, x: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        xf = x.reshape(x.shape[0], -1).to(self.centred)
        a, s = _times(self.process, t, x.shape[0], xf)
        return xf - a[:, None] * self.mean, a, s

    def _logits(self, xc: Tensor, a: Tensor, s: Tensor, lo: int, hi: int) -> Tensor:
        """(2α x·x0_i − α²‖x0_i‖²)/2σ² for data rows lo:hi, [B, hi − lo].

        That is −‖x − αx0_i‖²/2σ² up to a per-row constant.
        """
        dots = xc @ self.centred[lo:hi].T
        return (2 * a[:, None] * dots - a[:, None] ** 2 * self.sq_norms[lo:hi]) / (2 * s[:, None] ** 2)

    def _stream(self, xc: Tensor, a: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Online log-sum-exp: running max M [B], Σ e^{l−M} [B] and Σ e^{l−M} x0_i [B, D] over all chunks."""
        run_max = xc.new_full((xc.shape[0],), -math.inf)
        run_sum = xc.new_zeros(xc.shape[0])
        run_mean = torch.zeros_like(xc)
        for lo in range(0, self.n_data, self.chunk_size):
            hi = min(self.n_data, lo + self.chunk_size)
            logits = self._logits(xc, a, s, lo, hi)
            new_max = torch.maximum(run_max, logits.max(1).values)
            keep = torch.exp(run_max - new_max)
            w = torch.exp(logits - new_max[:, None])
            run_sum = run_sum * keep + w.sum(1)
            run_mean = run_mean * keep[:, None] + w @ self.centred[lo:hi]
            run_max = new_max
        return run_max, run_sum, run_mean

    def score(self, x: Tensor, t: Tensor | float) -> Tensor:
        """(α E_w[x0] − x)/σ², shaped like x, in x's dtype."""
        xc, a, s = self._prepare(x, t)
        _, run_sum, run_mean = self._stream(xc, a, s)
        post_mean = run_mean / run_sum[:, None]
        return ((a[:, None] * post_mean - xc) / s[:, None] ** 2).reshape(x.shape).to(x.dtype)

    __call__ = score

    def log_prob(self, x: Tensor, t: Tensor | float) -> Tensor:
        """log p_t(x) = log Σ_i e^{l_i} − ‖x‖²/2σ² − log N − (D/2) log(2πσ²), shape [B]."""
        xc, a, s = self._prepare(x, t)
        run_max, run_sum, _ = self._stream(xc, a, s)
        d = xc.shape[1]
        out = run_max + torch.log(run_sum) - (xc**2).sum(1) / (2 * s**2)
        return (out - math.log(self.n_data) - 0.5 * d * (_LOG_2PI + 2 * torch.log(s))).to(x.dtype)

    def divergence(self, x: Tensor, t: Tensor | float) -> Tensor:
        """∇·s = α² tr Cov_w[x0]/σ⁴ − D/σ², shape [B]; a second pass sums ‖x0_i − E_w[x0]‖² centred."""
        xc, a, s = self._prepare(x, t)
        run_max, run_sum, run_mean = self._stream(xc, a, s)
        post_mean = run_mean / run_sum[:, None]
        spread = torch.zeros_like(run_sum)
        for lo in range(0, self.n_data, self.chunk_size):
            hi = min(self.n_data, lo + self.chunk_size)
            w = torch.exp(self._logits(xc, a, s, lo, hi) - run_max[:, None])
            dev = (self.centred[lo:hi] ** 2).sum(1)[None] - 2 * post_mean @ self.centred[lo:hi].T
            spread = spread + (w * (dev + (post_mean**2).sum(1, keepdim=True))).sum(1)
        trace = (spread / run_sum).clamp_min(0)
        return (a**2 * trace / s**4 - xc.shape[1] / s**2).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n rows of the dataset drawn uniformly with replacement, [n, *shape]."""
        idx = torch.randint(0, self.n_data, (n,), generator=generator).to(self.centred.device)
        return (self.centred[idx] + self.mean).reshape(n, *self.sample_shape)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "n_data": self.n_data, "chunk_size": self.chunk_size}


class CallableReference(Reference):
    """A user's ``fn(x, t)`` returning scores shaped like x at canonical time t ([B] float64).

    Every call checks the output's shape (a wrong shape raises a UsageError naming the function);
    non-finite values pass through and are reported by the diagnostics.
    """

    def __init__(
        self,
        fn: Callable[[Tensor, Tensor], Tensor],
        process: Process,
        sample_shape: tuple[int, ...],
        name: str | None = None,
    ) -> None:
        if not callable(fn):
            raise UsageError(f"reference must be callable, got {type(fn).__name__}", "pass fn(x, t) -> score")
        super().__init__(process, sample_shape)
        self.fn = fn
        self.name = name or str(getattr(fn, "__name__", "callable"))
        self.kind = re.sub(r"[^A-Za-z0-9_]", "", self.name) or "callable"

    def score(self, x: Tensor, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        out = self.fn(x, t.expand(x.shape[0]) if t.ndim == 0 else t)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise UsageError(
                f"reference function {self.name!r} returned {got}, expected {tuple(x.shape)}",
                "return one score vector per input sample",
            )
        return out.to(x.dtype)

    __call__ = score


# --------------------------------------------------------------------------------------------- resolve


def _options(text: str, allowed: tuple[str, ...], spec: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in allowed:
            raise UsageError(
                f"bad option {part!r} in reference {spec!r}", f"use {', '.join(k + '=…' for k in allowed)}"
            )
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise UsageError(
                f"option {key.strip()} in reference {spec!r} is not a number", "pass e.g. scale=3"
            ) from None
    return out


def _load_arrays(path: Path, spec: str) -> dict[str, Tensor] | Tensor:
    """Read .npy (array), .npz (arrays), .pt / .pth (tensor or dict) or .json (dict of lists).

    Only regular files are read; nothing is unpickled (``weights_only`` for torch files, no pickles in
    numpy files), and a damaged or unexpected file is one :class:`UsageError`.
    """
    if not path.exists():
        raise UsageError(f"reference file {str(path)!r} not found", f"check the path in {spec!r}")
    input_file(path, "reference file", f"check the path in {spec!r}")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz", ".pt", ".pth", ".json"):
        raise UsageError(f"unsupported reference file type {suffix!r}", "use .npy, .npz, .pt or .json")
    try:
        if suffix in (".npy", ".npz"):
            import numpy as np

            loaded = np.load(path, allow_pickle=False)
            if suffix == ".npy":
                return torch.from_numpy(np.asarray(loaded))
            return {k: torch.from_numpy(loaded[k]) for k in loaded.files}
        if suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                return {str(k): torch.as_tensor(v) for k, v in obj.items()}
            return torch.as_tensor(obj)
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("the JSON file is not an object of arrays")
        return {str(k): torch.as_tensor(v, dtype=torch.float64) for k, v in data.items()}
    except UsageError:
        raise
    except Exception as err:  # numpy, torch and json raise many types for damaged, pickled or odd files
        raise UsageError(
            f"cannot read reference file {str(path)!r}: {reason(err)}",
            "save plain arrays (.npy/.npz), a tensor dict saved with torch.save, or a JSON object of arrays",
        ) from None


def _mixture_from_file(path: Path, spec: str, probe: Any) -> GaussianMixture:
    arrays = _load_arrays(path, spec)
    if not isinstance(arrays, dict) or "means" not in arrays or "stds" not in arrays:
        raise UsageError(
            f"{str(path)!r} does not hold 'means' and 'stds'", "save a dict with means [K, D], stds, weights"
        )
    means = arrays["means"].to(torch.float64).reshape(arrays["means"].shape[0], -1)
    return GaussianMixture(
        means, arrays["stds"].to(torch.float64), arrays.get("weights"), probe.process, sample_shape=probe.sample_shape
    )


def _data_from_file(path: Path, spec: str, probe: Any) -> Tensor:
    arrays = _load_arrays(path, spec)
    if isinstance(arrays, dict):
        named = [k for k in ("data", "x0", "x", "samples") if k in arrays]
        if not named and len(arrays) != 1:
            raise UsageError(f"{str(path)!r} holds several arrays", "name the samples array 'data'")
        arrays = arrays[named[0] if named else next(iter(arrays))]
    data = arrays.to(torch.float64)
    if data.ndim < 2 or math.prod(data.shape[1:]) != probe.dim:
        raise UsageError(
            f"reference data {tuple(data.shape)} do not match the probe's sample shape {probe.sample_shape}",
            "save clean samples as [N, *sample_shape] in the model's data coordinates",
        )
    return data.reshape(data.shape[0], *probe.sample_shape)


def _check_compatible(ref: Reference, probe: Any) -> Reference:
    if ref.dim != probe.dim:
        raise UsageError(
            f"reference has {ref.dim} components, the probe {probe.dim}", "use a reference of the probe's dimension"
        )
    if ref.process.to_dict() != probe.process.to_dict():
        raise UsageError(
            f"reference is noised by the {ref.process.name} process, the probe by {probe.process.name}",
            "build the reference with the probe's process",
        )
    return ref


def resolve_reference(spec: Any, probe: Any) -> Reference:
    """A :class:`Reference` for the probe from a spec (see the module docstring for the forms).

    Data-backed and analytic references are built with the probe's process and sample shape and kept
    on the probe's device in float64.
    """
    if isinstance(spec, Reference):
        return _check_compatible(spec, probe)
    if isinstance(spec, (GaussianMixture, Funnel)):
        return _check_compatible(FieldReference(spec, sample_shape=probe.sample_shape), probe)
    if callable(spec) and not isinstance(spec, str):
        return CallableReference(spec, probe.process, probe.sample_shape)
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"unknown reference {spec!r}", f"use {SPEC_FORMS}")
    kind, _, rest = spec.strip().partition(":")
    kind = kind.lower()
    field: GaussianMixture | Funnel
    if kind == "funnel":
        opts = _options(rest, ("scale",), spec)
        if probe.dim < 2:
            raise UsageError("the funnel reference needs at least 2 dimensions", "use it with a D ≥ 2 probe")
        field = Funnel(probe.dim - 1, opts.get("scale", 3.0), probe.process)
        return FieldReference(field, name=spec.strip(), sample_shape=probe.sample_shape, kind="funnel")
    if kind == "gaussian":
        opts = _options(rest, ("std", "mean"), spec)
        if opts.get("std", 1.0) <= 0:
            raise UsageError(f"std must be positive in reference {spec!r}", "pass e.g. gaussian:std=0.5")
        means = torch.full((1, probe.dim), opts.get("mean", 0.0), dtype=torch.float64)
        field = GaussianMixture(means, opts.get("std", 1.0), process=probe.process, sample_shape=probe.sample_shape)
        return FieldReference(field, name=spec.strip(), sample_shape=probe.sample_shape, kind="gaussian")
    if kind == "mixture" and rest:
        field = _mixture_from_file(Path(rest).expanduser(), spec, probe)
        return _check_compatible(FieldReference(field, name=spec.strip(), sample_shape=probe.sample_shape), probe)
    if kind == "data" and rest:
        data = _data_from_file(Path(rest).expanduser(), spec, probe)
        return EmpiricalScore(data, probe.process, device=probe.device, name=spec.strip())
    raise UsageError(f"unknown reference {spec!r}", f"use {SPEC_FORMS}")


__all__ = [
    "CallableReference",
    "EmpiricalScore",
    "FieldReference",
    "Reference",
    "mixture_divergence",
    "resolve_reference",
]
