"""The transport check: what a model's error does to the samples the probability flow generates.

Eq. 20 says the error e = s_ref − s_θ changes the transported density only through 𝒮e = ∇·e + s_refᵀe.
This check integrates the probability-flow ODE backwards in time (Eq. 17–18; for the OU process
dx/dτ = x + s(x, −τ)) from the same starting points twice — once driven by the model s_θ, once by the
reference s_ref — and compares the two end sets at ``t_end``:

* ``loglik_model`` / ``loglik_reference``: mean exact log p_{t_end} (nats) of each end set under the
  reference density (when it has one), with standard errors; the reference flow's value is what an
  exact score achieves, so ``loglik_gap`` = reference − model is the likelihood lost to e (≥ 0 up to
  sampling noise).
* ``sliced_wasserstein``: the sliced 2-Wasserstein distance between the two end sets (data units):
  √(mean over ``n_projections`` random unit directions θ of the squared W₂ between the sorted
  projections). Directions come from the stream (seed, "transport", "sw", l). Equal marginals give a
  value at the finite-sample level ``sliced_wasserstein_floor``: the same distance between the reference
  end set and an independent set drawn exactly from p_{t_end} (when the reference can sample).
* ``paired_distance``: mean ‖x_model − x_reference‖₂ over pairs started from the same point (data
  units); ``paired_distance_per_dim`` = √(mean ‖·‖² / D). A divergence-free error (𝒮e = 0) moves samples
  along the level sets of ρ: large paired distance, sliced Wasserstein at the floor.

Solver: Heun's method (explicit trapezoid, second order, two field evaluations per step; ``euler``:
first order, one) on a grid of ``n_steps`` steps uniform in λ = log(σ/α), the log noise-to-signal
ratio, from t_start to t_end. dx/dt is :meth:`Process.pf_ode_velocity` (−x − s for OU, Eq. 13);
time runs backwards, so every step has dt < 0. Starting points: x(t_start) = α x0 + σ ε with x0 drawn
from the reference's data (exact p_{t_start}) when it can sample, else α·(data-range centre) + σ ε; ε
and x0 of sample i come from streams (seed, "transport", …, i), so nothing depends on batch size.
Default times: :func:`conservcheck.timepoints.noise_span` (a discrete schedule's first and last grid
times; otherwise OU time 5, flow time 0.999 or σ = 50 data-range widths for VE, down to σ = 10⁻³).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from conservcheck import rng
from conservcheck.analytic.reference_scores import Reference, resolve_reference
from conservcheck.batching import Batcher
from conservcheck.errors import ProbeContractError, UsageError
from conservcheck.probe import VectorFieldProbe
from conservcheck.process import Process, log_snr_grid
from conservcheck.timepoints import noise_span

SOLVERS = {"heun": 2, "euler": 1}
N_PROJECTIONS = 256


@dataclass
class TransportResult:
    """Outcome of :func:`transport_check`; ``to_dict`` gives the JSON-ready scalars and settings."""

    reference: str
    n_samples: int
    n_steps: int
    solver: str
    t_start: float
    t_end: float
    sliced_wasserstein: float
    sliced_wasserstein_floor: float | None
    n_projections: int
    paired_distance: float
    paired_distance_per_dim: float
    loglik_model: float | None
    loglik_model_se: float | None
    loglik_reference: float | None
    loglik_reference_se: float | None
    n_evals: int
    step_variable: str = "log(sigma/alpha)"
    x_model: Tensor | None = field(default=None, repr=False)
    x_reference: Tensor | None = field(default=None, repr=False)

    @property
    def loglik_gap(self) -> float | None:
        if self.loglik_model is None or self.loglik_reference is None:
            return None
        return self.loglik_reference - self.loglik_model

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("x_model", "x_reference")}
        out["loglik_gap"] = self.loglik_gap
        return out


def integrate(
    field_fn: Callable[[Tensor, Tensor], Tensor], process: Process, x: Tensor, ts: Tensor, solver: str = "heun"
) -> Tensor:
    """Integrate dx/dt = pf_ode_velocity(x, field(x, t), t) through the times ``ts`` (float64, [B, *shape])."""
    if solver not in SOLVERS:
        raise UsageError(f"unknown solver {solver!r}", f"use one of {', '.join(SOLVERS)}")

    def velocity(y: Tensor, t: Tensor) -> Tensor:
        tb = t.to(y.device).expand(y.shape[0])
        return process.pf_ode_velocity(y, field_fn(y, tb).to(y.dtype), tb)

    for k in range(ts.numel() - 1):
        t0, t1 = ts[k], ts[k + 1]
        dt = float(t1 - t0)
        v0 = velocity(x, t0)
        if solver == "euler":
            x = x + dt * v0
        else:
            x = x + 0.5 * dt * (v0 + velocity(x + dt * v0, t1))
    return x


def sliced_wasserstein(a: Tensor, b: Tensor, n_projections: int, seed: int) -> float:
    """√(mean_l W₂²(θ_lᵀa, θ_lᵀb)) over unit directions θ_l from (seed, "transport", "sw", l); equal sizes."""
    af, bf = a.reshape(a.shape[0], -1).to(torch.float64), b.reshape(b.shape[0], -1).to(torch.float64)
    if af.shape != bf.shape:
        raise UsageError("sliced Wasserstein needs two sets of the same size", "draw as many samples in each")
    theta = torch.stack(
        [rng.normal((af.shape[1],), seed, "transport", "sw", k, dtype=torch.float64) for k in range(n_projections)], 1
    )
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(af.device)
    pa, pb = (af @ theta).sort(0).values, (bf @ theta).sort(0).values
    return math.sqrt(float(((pa - pb) ** 2).mean()))


def _mean_se(v: Tensor) -> tuple[float, float]:
    """Mean and its standard error sd/√n."""
    return float(v.mean()), float(v.std(unbiased=True)) / math.sqrt(v.numel())


def transport_check(
    probe: VectorFieldProbe,
    reference: Reference | str | Any,
    *,
    n_samples: int = 256,
    seed: int = 0,
    t_start: float | None = None,
    t_end: float | None = None,
    n_steps: int = 100,
    solver: str = "heun",
    n_projections: int = N_PROJECTIONS,
    batcher: Batcher | None = None,
) -> TransportResult:
    """Probability-flow transport with the model and with the reference from the same start points.

    Args:
        probe: the model, in score units.
        reference: a :class:`Reference` or anything :func:`resolve_reference` accepts.
        n_samples: trajectories per field.
        seed: seed of every random draw.
        t_start, t_end: canonical start (noisy) and end (clean) times, t_start > t_end; defaults from
            :func:`~conservcheck.timepoints.noise_span`.
        n_steps: solver steps, uniform in log(σ/α).
        solver: ``heun`` (default) or ``euler``.
        n_projections: random directions of the sliced Wasserstein distance.
        batcher: batching of trajectories (each batch is integrated to the end before the next starts).
    """
    if int(n_samples) < 2 or int(n_steps) < 1 or int(n_projections) < 1:
        raise UsageError("transport needs n_samples ≥ 2, n_steps ≥ 1 and n_projections ≥ 1", "raise the counts")
    if solver not in SOLVERS:
        raise UsageError(f"unknown solver {solver!r}", f"use one of {', '.join(SOLVERS)}")
    ref = resolve_reference(reference, probe)
    proc = probe.process
    d_start, d_end = noise_span(probe)
    t_start = d_start if t_start is None else float(t_start)
    t_end = d_end if t_end is None else float(t_end)
    if not t_start > t_end:
        raise UsageError(f"t_start {t_start:g} must be later than t_end {t_end:g}", "integrate from noise to data")
    proc.check_times(torch.tensor([t_start, t_end], dtype=torch.float64))
    ts = log_snr_grid(proc, t_start, t_end, int(n_steps) + 1)
    n = int(n_samples)
    x_init = _start_points(ref, probe, ts[0], n, seed)
    batcher = batcher if batcher is not None else Batcher("auto", probe)

    def model_field(x: Tensor, t: Tensor) -> Tensor:
        with torch.no_grad():
            return probe.score(x.to(probe.dtype), t)

    def ref_field(x: Tensor, t: Tensor) -> Tensor:
        with torch.no_grad():
            return ref.score(x, t)

    x_model = batcher.map(lambda x: integrate(model_field, proc, x, ts, solver), x_init).cpu()
    x_ref = batcher.map(lambda x: integrate(ref_field, proc, x, ts, solver), x_init).cpu()
    bad = ~torch.isfinite(x_model.reshape(n, -1)).all(1)
    if bool(bad.any()):
        raise ProbeContractError(
            f"the model's probability flow ended in NaN/Inf for {int(bad.sum())} of {n} samples",
            "check the model over the whole time range, or shorten it with t_start / t_end",
        )
    diff = (x_model - x_ref).reshape(n, -1)
    floor = None
    if ref.has_sampler:
        fresh = _start_points(ref, probe, ts[-1], n, seed, stream="floor").cpu()
        floor = sliced_wasserstein(x_ref, fresh, int(n_projections), seed)
    ll_model: tuple[float | None, float | None] = (None, None)
    ll_ref: tuple[float | None, float | None] = (None, None)
    if ref.has_log_prob:
        t_end_b = torch.full((n,), t_end, dtype=torch.float64, device=probe.device)
        ll_model, ll_ref = (
            _mean_se(batcher.map(lambda x, t: ref.log_prob(x, t), xs.to(probe.device), t_end_b).cpu())
            for xs in (x_model, x_ref)
        )
    return TransportResult(
        reference=ref.name,
        n_samples=n,
        n_steps=int(n_steps),
        solver=solver,
        t_start=t_start,
        t_end=t_end,
        sliced_wasserstein=sliced_wasserstein(x_model, x_ref, int(n_projections), seed),
        sliced_wasserstein_floor=floor,
        n_projections=int(n_projections),
        paired_distance=float(diff.norm(dim=1).mean()),
        paired_distance_per_dim=math.sqrt(float((diff**2).mean())),
        loglik_model=ll_model[0],
        loglik_model_se=ll_model[1],
        loglik_reference=ll_ref[0],
        loglik_reference_se=ll_ref[1],
        n_evals=n * int(n_steps) * SOLVERS[solver],
        x_model=x_model,
        x_reference=x_ref,
    )


def _start_points(
    ref: Reference, probe: VectorFieldProbe, t: Tensor, n: int, seed: int, stream: str = "start"
) -> Tensor:
    """α x0 + σ ε at time t for samples 0..n−1, float64 on the probe's device.

    x0 is drawn from the reference when it can sample (then the points are exact draws of p_t), else
    it is the centre of the data range.
    """
    proc = probe.process
    alpha, sigma = float(proc.alpha(t)), float(proc.sigma(t))
    shape = probe.sample_shape
    eps = torch.stack([rng.normal(shape, seed, "transport", stream, "eps", i, dtype=torch.float64) for i in range(n)])
    if ref.has_sampler:
        x0 = torch.cat(
            [
                ref.sample(1, rng.generator(seed, "transport", stream, "x0", i)).reshape(1, *shape).cpu()
                for i in range(n)
            ]
        ).to(torch.float64)
    else:
        x0 = torch.full((n, *shape), 0.5 * sum(probe.data_range), dtype=torch.float64)
    return (alpha * x0 + sigma * eps).to(probe.device)


__all__ = ["SOLVERS", "TransportResult", "integrate", "sliced_wasserstein", "transport_check"]
