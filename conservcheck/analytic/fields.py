"""Vector fields with exact answers: references for tests, demos and the Stein diagnostic.

* :class:`GaussianMixture` — data Σ w_k N(μ_k, diag(c_k²)); under a process the time-t marginal is the
  mixture Σ w_k N(α μ_k, diag(α² c_k² + σ²)), whose score is exact and computed log-sum-exp stably.
* :class:`TurnedGaussian` — data N(m, Q diag(c²) Qᵀ) with Q a fixed product of Householder reflections:
  a Gaussian whose every score component depends on every coordinate, at O(D) cost per sample.
* :class:`LinearField` — s(x) = A x with A = S + K split into symmetric S and antisymmetric K parts.
* :func:`gradient_field` — ∇φ of any scalar torch function φ, by autograd (exactly conservative).

Every field is a callable ``field(x, t)`` over batches [B, *shape] and turns into a probe with
:func:`as_probe`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from conservcheck import rng
from conservcheck.errors import UsageError
from conservcheck.probe import ProbeInfo, VectorFieldProbe
from conservcheck.process import OUProcess, Process


class GaussianMixture:
    """Gaussian-mixture data with diagonal components, noised by ``process``.

    Args:
        means: [K, D] component means of the clean data.
        stds: [K] (isotropic) or [K, D] (diagonal) component standard deviations of the clean data.
        weights: [K] mixture weights (normalised here); uniform by default.
        process: the noising process (OU by default).
        sample_shape: shape of one sample; (D,) by default.
    """

    def __init__(
        self,
        means: Tensor,
        stds: Tensor | float,
        weights: Tensor | None = None,
        process: Process | None = None,
        sample_shape: tuple[int, ...] | None = None,
    ) -> None:
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise UsageError("means must have shape [K, D]", "stack the component means into a 2-D tensor")
        k, d = means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64)
        stds = stds.expand(k).reshape(k, 1).expand(k, d) if stds.ndim <= 1 and stds.numel() in (1, k) else stds
        if stds.shape != (k, d) or bool((stds < 0).any()):
            raise UsageError("stds must be a scalar, [K] or [K, D] and non-negative", "check the component widths")
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or bool((w <= 0).any()):
            raise UsageError("weights must be [K] and positive", "check the mixture weights")
        self.means, self.stds, self.log_weights = means, stds.clone(), torch.log(w / w.sum())
        self.process = process if process is not None else OUProcess()
        self.sample_shape = sample_shape if sample_shape is not None else (d,)
        if math.prod(self.sample_shape) != d:
            raise UsageError(f"sample_shape {self.sample_shape} does not hold {d} components", "match it to D")

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def _components(self, x: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """Per-component log-joint [B, K], centred inputs [B, K, D] and variances [B or 1, K, D]."""
        xf = x.reshape(x.shape[0], -1)
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        tb = t.expand(x.shape[0]) if t.ndim == 0 else t
        a = self.process.alpha(tb).to(xf.dtype)[:, None, None]
        s2 = (self.process.sigma(tb) ** 2).to(xf.dtype)[:, None, None]
        mu = self.means.to(xf)[None]
        var = a**2 * self.stds.to(xf)[None] ** 2 + s2
        diff = xf[:, None, :] - a * mu
        logn = -0.5 * ((diff**2 / var) + torch.log(2 * math.pi * var)).sum(-1)
        return self.log_weights.to(xf)[None] + logn, diff, var

    def log_prob(self, x: Tensor, t: Tensor | float) -> Tensor:
        """log p_t(x), shape [B]."""
        logj, _, _ = self._components(x, t)
        return torch.logsumexp(logj, dim=1)

    def score(self, x: Tensor, t: Tensor | float) -> Tensor:
        """∇ₓ log p_t(x) = Σ_k r_k(x) · (−(x − α μ_k)/(α² c_k² + σ²)), shape [B, *shape]."""
        logj, diff, var = self._components(x, t)
        r = torch.softmax(logj, dim=1)
        return (-(r[:, :, None] * diff / var).sum(1)).reshape(x.shape)

    __call__ = score

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n clean samples x0 ~ data, shape [n, *shape], float64."""
        idx = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[idx] + self.stds[idx] * z).reshape(n, *self.sample_shape)


class TurnedGaussian:
    """Gaussian data N(m, Q diag(c²) Qᵀ) noised by ``process``, with Q = H_1 ⋯ H_R a product of Householder
    reflections H_r = I − 2 u_r u_rᵀ (u_r unit vectors from the stream (seed, "turned_gaussian", r)).

    Its score at time t is s(x) = −Q diag(1/(α² c² + σ²)) Qᵀ (x − α m): exactly a gradient, with the
    spectrum of the diagonal Gaussian N(m, diag(c²)) (same scale), but a dense Jacobian, so every component
    of s depends on every coordinate of x. Applying Q costs O(R·D) per sample, whatever D.

    Args:
        mean, std: [D] mean m and standard deviations c of the clean data (before turning).
        process, sample_shape: as for :class:`GaussianMixture`.
        reflections: R; seed: the stream's seed.
    """

    def __init__(
        self,
        mean: Tensor,
        std: Tensor,
        process: Process | None = None,
        sample_shape: tuple[int, ...] | None = None,
        reflections: int = 2,
        seed: int = 0,
    ) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
        self.std = torch.as_tensor(std, dtype=torch.float64).flatten()
        d = self.mean.numel()
        if self.std.shape != (d,) or bool((self.std < 0).any()):
            raise UsageError("std must have the mean's D entries and be non-negative", "pass [D] tensors")
        self.process = process if process is not None else OUProcess()
        self.sample_shape = sample_shape if sample_shape is not None else (d,)
        if math.prod(self.sample_shape) != d:
            raise UsageError(f"sample_shape {self.sample_shape} does not hold {d} components", "match it to D")
        units = [rng.normal((d,), seed, "turned_gaussian", r, dtype=torch.float64) for r in range(reflections)]
        self.reflections = [u / u.norm() for u in units]

    def _turn(self, y: Tensor, order: list[Tensor]) -> Tensor:
        for u in order:
            u = u.to(y)
            y = y - 2 * (y @ u)[:, None] * u[None]
        return y

    def score(self, x: Tensor, t: Tensor | float) -> Tensor:
        """−Q diag(1/(α² c² + σ²)) Qᵀ (x − α m), shape of x."""
        xf = x.reshape(x.shape[0], -1)
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        tb = t.expand(x.shape[0]) if t.ndim == 0 else t
        a = self.process.alpha(tb).to(xf.dtype)[:, None]
        s2 = (self.process.sigma(tb) ** 2).to(xf.dtype)[:, None]
        var = a**2 * self.std.to(xf)[None] ** 2 + s2
        # Qᵀy = H_R ⋯ H_1 y applies H_1 first; Qy = H_1 ⋯ H_R y applies H_R first.
        y = self._turn(xf - a * self.mean.to(xf)[None], self.reflections)
        return self._turn(-y / var, self.reflections[::-1]).reshape(x.shape)

    __call__ = score


class LinearField:
    """s(x) = A x (time independent) with A = S + K, S symmetric, K antisymmetric.

    Its curl ∂ᵢsⱼ − ∂ⱼsᵢ is the constant matrix Aᵀ − A = −2K in (i, j) index order, i.e. J − Jᵀ = 2K with
    J = A; the loop integral over the ellipse c + a cos θ + b sin θ is 2π bᵀ K a.
    """

    def __init__(self, sym: Tensor, antisym: Tensor, sample_shape: tuple[int, ...] | None = None) -> None:
        sym = torch.as_tensor(sym, dtype=torch.float64)
        antisym = torch.as_tensor(antisym, dtype=torch.float64)
        if sym.shape != antisym.shape or sym.ndim != 2 or sym.shape[0] != sym.shape[1]:
            raise UsageError("sym and antisym must be square matrices of one size", "pass two [D, D] tensors")
        if not torch.allclose(sym, sym.T) or not torch.allclose(antisym, -antisym.T):
            raise UsageError("sym must be symmetric and antisym antisymmetric", "symmetrise them first")
        self.S, self.K = sym, antisym
        self.A = sym + antisym
        self.sample_shape = sample_shape if sample_shape is not None else (sym.shape[0],)

    def __call__(self, x: Tensor, t: Tensor | float | None = None) -> Tensor:
        xf = x.reshape(x.shape[0], -1)
        return (xf @ self.A.to(xf).T).reshape(x.shape)

    score = __call__


def gradient_field(potential: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """The exactly conservative field ∇ₓφ(x, t) for a scalar potential φ(x, t) → [B].

    Built with ``torch.func.grad``, so it composes with the jvp / vjp strategies of the Jacobian tools.
    The potential must treat samples independently (∇ of Σ_b φ(x_b) is then the per-sample gradient).
    """

    def field(x: Tensor, t: Tensor) -> Tensor:
        grad: Tensor = torch.func.grad(lambda y: potential(y, t).sum())(x)
        return grad

    return field


def as_probe(
    field: Callable[[Tensor, Tensor], Tensor],
    sample_shape: tuple[int, ...],
    process: Process | None = None,
    *,
    name: str = "analytic",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> VectorFieldProbe:
    """Wrap a field that already returns scores as a probe (canonical time, identity convention)."""
    process = process if process is not None else getattr(field, "process", None) or OUProcess()
    return VectorFieldProbe(
        field,
        process=process,
        sample_shape=sample_shape,
        parameterization="score",
        device=device,
        dtype=dtype,
        info=ProbeInfo(name=name, adapter="analytic"),
    )


__all__ = ["GaussianMixture", "LinearField", "TurnedGaussian", "as_probe", "gradient_field"]
