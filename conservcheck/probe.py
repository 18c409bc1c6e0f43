"""`VectorFieldProbe`: the one interface every diagnostic sees.

A probe wraps any callable ``fn(x, native_time) -> output`` together with what decides its units: the
noising process (canonical time), the model's time convention, and the parameterization of its output.
It answers :meth:`VectorFieldProbe.score` in score units ∇ₓ log p_t(x) at canonical time t. Nothing
downstream of the probe knows the model's native units. A conditional model is one field per condition:
its ``fn`` is a :class:`~conservcheck.conditioning.ConditionalField` at a selected condition and
classifier-free guidance scale (:mod:`conservcheck.conditioning`); unconditional models are unchanged.

Three lines wrap a custom epsilon-network trained with DDPM's linear schedule::

    sched = DiscreteSchedule.linear()
    probe = VectorFieldProbe(lambda x, k: net(x, k), process=OUProcess(), time_convention=sched,
                             parameterization="epsilon", sample_shape=(3, 32, 32))
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from conservcheck.conditioning import Conditioning, field_of
from conservcheck.errors import ProbeContractError, UsageError
from conservcheck.parameterization import canonical_name, to_score
from conservcheck.precision import check_mode, forward_context
from conservcheck.process import OUProcess, Process, TimeConvention, expand_like


def _reachable_tensors(obj: Any, path: str, seen: set[int], depth: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor (or numpy array) reachable from ``obj``, in a fixed order: an
    ``nn.Module``'s state dict, a bound method's object, a function's closure cells, a partial's function
    and arguments, the items of lists, tuples and dicts and an object's attributes, ``depth`` levels deep."""
    if id(obj) in seen or depth < 0:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, np.ndarray) and obj.dtype.kind in "biufc":
        yield path, torch.from_numpy(np.ascontiguousarray(obj))
    elif isinstance(obj, torch.nn.Module):
        for name, t in sorted(obj.state_dict(keep_vars=True).items()):
            yield f"{path}.{name}", t
    elif inspect.ismethod(obj):
        yield from _reachable_tensors(obj.__self__, f"{path}.__self__", seen, depth - 1)
    elif inspect.isfunction(obj):
        for i, cell in enumerate(obj.__closure__ or ()):
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            yield from _reachable_tensors(content, f"{path}.<cell {i}>", seen, depth - 1)
    elif isinstance(obj, functools.partial):
        yield from _reachable_tensors((obj.func, obj.args, obj.keywords), path, seen, depth - 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _reachable_tensors(v, f"{path}[{i}]", seen, depth - 1)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _reachable_tensors(obj[k], f"{path}[{k!r}]", seen, depth - 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type) and not inspect.ismodule(obj):
        for k in sorted(vars(obj)):
            yield from _reachable_tensors(vars(obj)[k], f"{path}.{k}", seen, depth - 1)


def weights_digest(model: Any, depth: int = 6) -> str | None:
    """SHA-256 of every tensor reachable from ``model`` (names, dtypes, shapes and values), or None when
    none is: the identity of a model that names no weights file (a ``module:factory`` model, a probe object)."""
    h = hashlib.sha256()
    count = 0
    for name, t in _reachable_tensors(model, "model", set(), depth):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        count += 1
        if t.is_meta or t.layout != torch.strided or t.is_quantized:
            continue  # no plain values to hash: its name, dtype and shape stand for it
        data = t.detach().to("cpu").contiguous()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        h.update(data.numpy().tobytes() if data.numel() else b"")
    return h.hexdigest() if count else None


@dataclass
class ProbeInfo:
    """Provenance recorded in reports: where the model came from and how it was converted."""

    name: str = "custom"
    adapter: str = "custom"
    reference: str | None = None
    revision: str | None = None
    weights_sha256: str | None = None
    trust_remote_code: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("name", "adapter", "reference", "revision", "weights_sha256")}
        out["trust_remote_code"] = self.trust_remote_code
        out.update(self.extra)
        return out


class VectorFieldProbe:
    """A vector field s(x, t) in score units at canonical time.

    Args:
        fn: callable ``fn(x, native_time)``; ``x`` has shape [B, *sample_shape] in the model's data
            coordinates, ``native_time`` is a float tensor of shape [B] produced by ``time_convention``.
        process: the noising process that defines canonical time, α(t) and σ(t).
        sample_shape: shape of one sample, e.g. (3, 32, 32).
        parameterization: what ``fn`` predicts: score, epsilon, x0, v or velocity (see
            :mod:`conservcheck.parameterization`).
        time_convention: maps canonical time to ``fn``'s native time (identity by default).
        data_range: the interval clean data lives in, e.g. (−1, 1) for DDPM, (0, 1) for score_sde VE.
        device, dtype: where inputs are evaluated and the dtype they are stored in.
        precision: how the forward pass runs (``fp32``, ``tf32``, ``bf16``, ``fp64``; see
            :mod:`conservcheck.precision`); conversions to score units stay in ``dtype``.
        info: provenance for reports.
    """

    def __init__(
        self,
        fn: Callable[[Tensor, Tensor], Tensor],
        *,
        process: Process | None = None,
        sample_shape: tuple[int, ...],
        parameterization: str = "score",
        time_convention: TimeConvention | None = None,
        data_range: tuple[float, float] = (-1.0, 1.0),
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        precision: str | None = None,
        info: ProbeInfo | None = None,
    ) -> None:
        if not callable(fn):
            raise UsageError(
                f"the probe's model must be callable, got {type(fn).__name__}", "pass a function or module"
            )
        self.fn = fn
        self.process = process if process is not None else OUProcess()
        self.sample_shape = tuple(int(d) for d in sample_shape)
        if not self.sample_shape or any(d <= 0 for d in self.sample_shape):
            raise UsageError(f"invalid sample_shape {sample_shape!r}", "give the shape of one sample, e.g. (3, 32, 32)")
        self.parameterization = canonical_name(parameterization)
        self.time_convention = time_convention if time_convention is not None else TimeConvention()
        self.data_range = (float(data_range[0]), float(data_range[1]))
        self.device = torch.device(device)
        self.dtype = dtype
        self.precision = check_mode(precision) if precision else ("fp64" if dtype == torch.float64 else "fp32")
        self.info = info if info is not None else ProbeInfo()

    @property
    def conditioning(self) -> Conditioning | None:
        """What the field is conditioned on when ``fn`` is a :class:`~conservcheck.conditioning.ConditionalField`
        (None: an unconditional model); select a condition and guidance scale with
        :func:`conservcheck.conditioning.select`."""
        field_ = field_of(self)
        return field_.conditioning if field_ is not None else None

    @property
    def dim(self) -> int:
        """Number of components D of one sample."""
        n = 1
        for d in self.sample_shape:
            n *= d
        return n

    def times(self, t: Tensor | float, batch: int) -> Tensor:
        """Canonical times as a float64 tensor of shape [batch] on the probe's device."""
        t = torch.as_tensor(t, dtype=torch.float64, device=self.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise UsageError(
                f"time has shape {tuple(t.shape)}, expected ({batch},) or a scalar", "pass one time per sample"
            )
        return t

    def output(self, x: Tensor, t: Tensor | float) -> Tensor:
        """The wrapped callable's own output at canonical time t (its native units), shape of x.

        A model that ends the process from inside its forward pass (``sys.exit``) raises
        :class:`ProbeContractError` instead, so the audit records it where it happened and goes on.
        """
        if tuple(x.shape[1:]) != self.sample_shape:
            raise UsageError(
                f"input has sample shape {tuple(x.shape[1:])}, the probe expects {self.sample_shape}",
                "reshape the batch to [B, *sample_shape]",
            )
        t64 = self.times(t, x.shape[0])
        native = self.time_convention.from_canonical(t64).to(self.dtype)
        try:
            with forward_context(self.precision, x.device):
                out = self.fn(x, native)
        except SystemExit as err:
            raise ProbeContractError(
                f"the model called sys.exit({err.code!r}) in its forward pass",
                "a model must return its output; remove the exit from its code",
            ) from None
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ProbeContractError(
                f"model output has shape {got}, expected {tuple(x.shape)}",
                "the wrapped callable must return one vector per input sample",
            )
        return out.to(x.dtype)

    def score(self, x: Tensor, t: Tensor | float) -> Tensor:
        """s(x, t) = ∇ₓ log p_t(x), shape [B, *sample_shape], for x of that shape and t of shape [B] or 0-d."""
        out = self.output(x, t)
        t64 = self.times(t, x.shape[0])
        proc = self.process
        alpha = expand_like(proc.alpha(t64), out)
        sigma = expand_like(proc.sigma(t64), out)
        if self.parameterization == "velocity":
            dalpha = expand_like(proc.alpha(t64) * proc.dlog_alpha_dt(t64), out)
            dsigma = expand_like(proc.dsigma2_dt(t64) / (2 * proc.sigma(t64)), out)
            return to_score("velocity", out, x, alpha, sigma, dalpha, dsigma)
        return to_score(self.parameterization, out, x, alpha, sigma)

    __call__ = score

    def describe(self) -> dict[str, Any]:
        """Everything that decides this probe's units (and, for a conditional model, its conditions), for
        reports."""
        conditioning = self.conditioning
        extra = {"conditioning": conditioning.describe()} if conditioning is not None else {}
        return {
            **self.info.to_dict(),
            "parameterization": self.parameterization,
            "process": self.process.to_dict(),
            "time_convention": self.time_convention.to_dict(),
            "sample_shape": list(self.sample_shape),
            "data_range": list(self.data_range),
            "dtype": str(self.dtype).replace("torch.", ""),
            "precision": self.precision,
            "device": str(self.device),
            **extra,
        }
