"""Noising processes and time conventions.

Every process is a Gaussian corruption x_t = α(t)·x0 + σ(t)·ε in the model's own data coordinates,
indexed by a *canonical time* t:

* :class:`OUProcess` — the paper's Ornstein–Uhlenbeck (VP) process dX = −X dt + √2 dW (Eq. 1):
  α = e^{−t}, σ² = 1 − e^{−2t}; t is "OU time".
* :class:`VEProcess` — variance exploding, α = 1; the canonical time *is* σ.
* :class:`FlowProcess` — rectified flow / flow matching, α = 1 − t, σ = t.
* :class:`SubVPProcess` — Song et al.'s sub-VP SDE: α = e^{−t}, σ = 1 − e^{−2t} (no square root), t the
  same OU time as the VP SDE's.

A :class:`TimeConvention` maps a model's native time (a DDPM index k, a VP-SDE time, σ itself) to and
from canonical time. :class:`DiscreteSchedule` observes the OU process at t_k = −½ log ᾱ_k (Santos & Lin
2023; the paper's Eq. 6 for the cosine schedule).

All functions take and return tensors; time tensors have shape [B] (or are 0-d) and are broadcast over
the sample dimensions by :func:`expand_like`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from conservcheck.errors import UsageError


def expand_like(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample tensor of shape [B] (or 0-d) to broadcast against x of shape [B, ...]."""
    v = torch.as_tensor(v, device=x.device)
    if v.ndim == 0:
        return v.to(x.dtype)
    return v.to(x.dtype).reshape(v.shape[0], *([1] * (x.ndim - 1)))


def _t(t: Tensor | float) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64) if not isinstance(t, Tensor) else t


class Process:
    """x_t = α(t) x0 + σ(t) ε at canonical time t. Subclasses define α, σ and their derivatives."""

    name: str = "process"
    time_name: str = "t"

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        """Canonical time at which the noise level is σ."""
        raise NotImplementedError

    def dlog_alpha_dt(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def dsigma2_dt(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def t_range(self) -> tuple[float, float]:
        """Open interval of valid canonical times."""
        raise NotImplementedError

    def marginal_sample(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = α(t) x0 + σ(t) ε (x0, ε: [B, ...]; t: [B] or 0-d)."""
        t = _t(t)
        return expand_like(self.alpha(t), x0) * x0 + expand_like(self.sigma(t), eps) * eps

    def conditional_score(self, x: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """∇ₓ log N(x; α x0, σ² I) = −(x − α x0)/σ² (the denoising score-matching target, Eq. 16)."""
        t = _t(t)
        a, s = expand_like(self.alpha(t), x), expand_like(self.sigma(t), x)
        return -(x - a * x0) / s**2

    def pf_ode_velocity(self, x: Tensor, score: Tensor, t: Tensor) -> Tensor:
        """Probability-flow velocity dx/dt = (d log α/dt) x − (½ dσ²/dt − (d log α/dt) σ²) s.

        For the OU process this is −x − s, the WGF velocity of Eq. 13.
        """
        t = _t(t)
        f = self.dlog_alpha_dt(t)
        g2 = self.dsigma2_dt(t) - 2 * f * self.sigma(t) ** 2
        return expand_like(f, x) * x - 0.5 * expand_like(g2, x) * score

    def check_times(self, t: Tensor) -> None:
        """Raise a :class:`UsageError` if any canonical time lies outside the open interval t_range."""
        lo, hi = self.t_range
        t = _t(t)
        bad = ~((t > lo) & (t < hi))
        if bool(bad.any()):
            raise UsageError(
                f"time {float(t[bad].flatten()[0]):g} is outside the {self.name} process's range "
                f"({lo:g}, {hi:g}) in {self.time_name}",
                "choose time points strictly inside that range",
            )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "time": self.time_name}


class OUProcess(Process):
    """The paper's OU process dX = −X dt + √2 dW: α = e^{−t}, σ = √(1 − e^{−2t}) (Eq. 1)."""

    name = "ou"
    time_name = "t"

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-_t(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(-2 * _t(t)))

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        return -0.5 * torch.log1p(-(_t(sigma) ** 2))

    def dlog_alpha_dt(self, t: Tensor) -> Tensor:
        return -torch.ones_like(_t(t))

    def dsigma2_dt(self, t: Tensor) -> Tensor:
        return 2 * torch.exp(-2 * _t(t))

    @property
    def t_range(self) -> tuple[float, float]:
        return (0.0, math.inf)


class VEProcess(Process):
    """Variance exploding: x_σ = x0 + σ ε. The canonical time is σ itself."""

    name = "ve"
    time_name = "sigma"

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(_t(t))

    def sigma(self, t: Tensor) -> Tensor:
        return _t(t)

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        return _t(sigma)

    def dlog_alpha_dt(self, t: Tensor) -> Tensor:
        return torch.zeros_like(_t(t))

    def dsigma2_dt(self, t: Tensor) -> Tensor:
        return 2 * _t(t)

    @property
    def t_range(self) -> tuple[float, float]:
        return (0.0, math.inf)


class FlowProcess(Process):
    """Rectified flow / flow matching: x_t = (1 − t) x0 + t ε, t ∈ (0, 1)."""

    name = "flow"
    time_name = "t"

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - _t(t)

    def sigma(self, t: Tensor) -> Tensor:
        return _t(t)

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        return _t(sigma)

    def dlog_alpha_dt(self, t: Tensor) -> Tensor:
        return -1 / (1 - _t(t))

    def dsigma2_dt(self, t: Tensor) -> Tensor:
        return 2 * _t(t)

    @property
    def t_range(self) -> tuple[float, float]:
        return (0.0, 1.0)


class SubVPProcess(Process):
    """Song et al.'s sub-VP SDE, dx = −½β x ds + √(β(1 − e^{−2∫₀ˢβ})) dW, at t = ½∫₀ˢβ.

    Its mean decays like the VP SDE's, α = e^{−t}, but its standard deviation is σ = 1 − e^{−2t} = 1 − α²
    (score_sde's ``subVPSDE.marginal_prob``): below the OU process's √(1 − α²) at every t, so its marginals
    are not the OU process's at any time. In t, f = −1 and g² = 2(1 − e^{−4t}).
    """

    name = "subvp"
    time_name = "t"

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-_t(t))

    def sigma(self, t: Tensor) -> Tensor:
        return -torch.expm1(-2 * _t(t))

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        return -0.5 * torch.log1p(-_t(sigma))

    def dlog_alpha_dt(self, t: Tensor) -> Tensor:
        return -torch.ones_like(_t(t))

    def dsigma2_dt(self, t: Tensor) -> Tensor:
        e = torch.exp(-2 * _t(t))
        return 4 * e * (1 - e)

    @property
    def t_range(self) -> tuple[float, float]:
        return (0.0, math.inf)


PROCESSES: dict[str, type[Process]] = {
    "ou": OUProcess,
    "vp": OUProcess,
    "ve": VEProcess,
    "flow": FlowProcess,
    "subvp": SubVPProcess,
}


def get_process(name: str) -> Process:
    """A process by name: ``ou`` (alias ``vp``), ``ve``, ``flow`` or ``subvp``."""
    try:
        return PROCESSES[name.lower()]()
    except KeyError:
        raise UsageError(f"unknown process {name!r}", f"use one of {', '.join(sorted(PROCESSES))}") from None


def log_snr_grid(process: Process, t_start: float, t_end: float, n: int) -> Tensor:
    """n canonical times from t_start to t_end, evenly spaced in λ = log(α/σ): [n] float64.

    λ decreases with t for every process here, so each λ is inverted by bisection (200 halvings, to the
    last bit of float64); the ends are t_start and t_end exactly.
    """

    def log_nsr(t: Tensor) -> Tensor:
        return torch.log(process.sigma(t) / process.alpha(t))

    lo = torch.full((n,), float(min(t_start, t_end)), dtype=torch.float64)
    hi = torch.full((n,), float(max(t_start, t_end)), dtype=torch.float64)
    ends = log_nsr(torch.tensor([t_start, t_end], dtype=torch.float64))
    target = torch.linspace(float(ends[0]), float(ends[1]), n, dtype=torch.float64)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        above = log_nsr(mid) > target
        hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
    ts = 0.5 * (lo + hi)
    ts[0], ts[-1] = float(t_start), float(t_end)
    return ts


class TimeConvention:
    """Maps a model's native time to canonical time and back. The identity by default."""

    name = "canonical"
    discrete = False

    @property
    def num_steps(self) -> int | None:
        """The number of native steps of a discrete schedule; None for continuous time."""
        return None

    def to_canonical(self, native: Tensor) -> Tensor:
        return _t(native)

    def from_canonical(self, t: Tensor) -> Tensor:
        return _t(t)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}


class DiscreteSchedule(TimeConvention):
    """A DDPM-style schedule ᾱ_k, k = 0 … T−1, observing the OU process at t_k = −½ log ᾱ_k.

    Native time is the index k (diffusers' convention: ᾱ_k = Π_{i≤k} (1 − β_i)). Fractional indices
    interpolate t_k linearly, so :meth:`from_canonical` inverts :meth:`to_canonical` exactly on the grid.
    """

    discrete = True

    def __init__(self, alphas_cumprod: Sequence[float] | Tensor, name: str = "discrete") -> None:
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ab.numel() < 2 or not bool(((ab > 0) & (ab <= 1)).all()) or not bool((ab[1:] < ab[:-1]).all()):
            raise UsageError(
                "alphas_cumprod must be a strictly decreasing array in (0, 1] with at least 2 entries",
                "pass the scheduler's alphas_cumprod",
            )
        self.alphas_cumprod = ab
        self.t_grid = -0.5 * torch.log(ab)
        self.name = name

    @property
    def num_steps(self) -> int:
        return int(self.alphas_cumprod.numel())

    def to_canonical(self, native: Tensor) -> Tensor:
        """OU time of (possibly fractional) index k, by linear interpolation of t_k."""
        k = _t(native).to(torch.float64)
        if bool(((k < 0) | (k > self.num_steps - 1)).any()):
            raise UsageError(
                f"time index out of range for a {self.num_steps}-step schedule",
                f"use indices 0 … {self.num_steps - 1}",
            )
        grid = self.t_grid.to(k.device)
        lo = k.floor().long().clamp(max=self.num_steps - 2)
        w = k - lo
        return grid[lo] * (1 - w) + grid[lo + 1] * w

    def from_canonical(self, t: Tensor) -> Tensor:
        """Fractional index k with t_k = t (inverse of :meth:`to_canonical`); clamps to the grid's ends."""
        t = _t(t).to(torch.float64)
        grid = self.t_grid.to(t.device)
        hi = torch.searchsorted(grid, t.reshape(-1).contiguous()).clamp(1, self.num_steps - 1)
        lo = hi - 1
        w = (t.reshape(-1) - grid[lo]) / (grid[hi] - grid[lo])
        return (lo + w.clamp(0, 1)).reshape(t.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_steps": self.num_steps}

    @classmethod
    def from_betas(cls, betas: Sequence[float] | Tensor, name: str = "discrete") -> DiscreteSchedule:
        b = torch.as_tensor(betas, dtype=torch.float64)
        return cls(torch.cumprod(1 - b, 0), name=name)

    @classmethod
    def linear(cls, beta_start: float = 1e-4, beta_end: float = 0.02, num_steps: int = 1000) -> DiscreteSchedule:
        """DDPM's linear β schedule (Ho et al. 2020; diffusers ``linear``)."""
        return cls.from_betas(torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64), "linear")

    @classmethod
    def scaled_linear(
        cls, beta_start: float = 0.00085, beta_end: float = 0.012, num_steps: int = 1000
    ) -> DiscreteSchedule:
        """Linear in √β (diffusers ``scaled_linear``)."""
        b = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
        return cls.from_betas(b, "scaled_linear")

    @classmethod
    def cosine(cls, num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> DiscreteSchedule:
        """Nichol & Dhariwal's cosine schedule, f(k) = cos²((k/T + s)/(1 + s) · π/2) (the paper's Eq. 6).

        As in diffusers' ``squaredcos_cap_v2``, β_k = 1 − f(k+1)/f(k) is clipped at ``max_beta`` so the
        last ᾱ stays positive.
        """
        k = torch.arange(num_steps + 1, dtype=torch.float64)
        f = torch.cos((k / num_steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = torch.clamp(1 - f[1:] / f[:-1], max=max_beta)
        return cls.from_betas(betas, "cosine")

    @classmethod
    def sigmoid(cls, beta_start: float = 1e-4, beta_end: float = 0.02, num_steps: int = 1000) -> DiscreteSchedule:
        """diffusers' ``sigmoid`` schedule: β = sigmoid(linspace(−6, 6)) · (β_end − β_start) + β_start."""
        b = torch.sigmoid(torch.linspace(-6, 6, num_steps, dtype=torch.float64)) * (beta_end - beta_start) + beta_start
        return cls.from_betas(b, "sigmoid")


class VPSDETime(TimeConvention):
    """Song et al.'s continuous VP-SDE time s ∈ [0, 1] with β(s) = β_min + s(β_max − β_min).

    ᾱ(s) = exp(−∫₀ˢ β), so the OU time is t = ½ ∫₀ˢ β = ½ (β_min s + ½ (β_max − β_min) s²).
    """

    name = "vpsde"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def to_canonical(self, native: Tensor) -> Tensor:
        s = _t(native)
        return 0.5 * (self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s**2)

    def from_canonical(self, t: Tensor) -> Tensor:
        t = _t(t)
        a = 0.5 * (self.beta_max - self.beta_min)
        b = self.beta_min
        return (-b + torch.sqrt(b * b + 8 * a * t)) / (2 * a)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "beta_min": self.beta_min, "beta_max": self.beta_max}


class SigmaLevels(TimeConvention):
    """The N noise levels of a discretely trained score_sde VE model (SMLD / NCSN), canonical time σ.

    score_sde's table is geometric from σ_max down to σ_min and its networks take the table index
    i = 0 … N−1 (0 the noisiest). Native time here is k = N−1−i, counted from the clean end like a DDPM
    index, so σ_k = σ_min (σ_max/σ_min)^{k/(N−1)}; fractional k interpolate log σ linearly, so
    :meth:`from_canonical` inverts :meth:`to_canonical` exactly.
    """

    name = "sigma_levels"
    discrete = True

    def __init__(self, sigma_min: float, sigma_max: float, num_steps: int) -> None:
        if not (0 < sigma_min < sigma_max) or num_steps < 2:
            raise UsageError(
                f"noise levels need 0 < sigma_min < sigma_max and at least 2 steps (got {sigma_min:g}, "
                f"{sigma_max:g}, {num_steps})",
                "pass the model's sigma_min, sigma_max and number of scales",
            )
        self.sigma_min, self.sigma_max, self._n = float(sigma_min), float(sigma_max), int(num_steps)

    @property
    def num_steps(self) -> int:
        return self._n

    def _log_ratio(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def to_canonical(self, native: Tensor) -> Tensor:
        k = _t(native).to(torch.float64)
        if bool(((k < 0) | (k > self._n - 1)).any()):
            raise UsageError(f"noise level index out of range for {self._n} levels", f"use 0 … {self._n - 1}")
        return self.sigma_min * torch.exp(k / (self._n - 1) * self._log_ratio())

    def from_canonical(self, t: Tensor) -> Tensor:
        return torch.log(_t(t).to(torch.float64) / self.sigma_min) / self._log_ratio() * (self._n - 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_steps": self._n,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
        }
