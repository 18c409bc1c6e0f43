"""Jacobian-vector products of a vector field, by three strategies that fail in different places.

Every function takes a field ``fn(x, t) -> Tensor`` (a probe's ``score`` or an analytic field) with x of
shape [B, *shape] and treats the samples independently: J is the per-sample Jacobian J_ij = ∂s_i/∂x_j
(components flattened in C order), so the Jacobian of the whole batch is block-diagonal and one product
over the batch gives one product per sample. Products run in x's dtype.

==============  ==========================  ====================================  ======================
strategy        J v                         Jᵀ v                                  cost (forward passes)
==============  ==========================  ====================================  ======================
``jvp``         ``torch.func.jvp``          ``torch.autograd.grad``               3 / 3
                (forward mode)
``double_vjp``  vjp of u ↦ Jᵀu              ``torch.autograd.grad``               5 / 3
                (reverse over reverse)
``fd``          central differences         not available (raises)                2 / —
==============  ==========================  ====================================  ======================

Costs are forward-pass equivalents (:data:`PRODUCT_COST`): forward-mode AD carries a tangent through
every op (≈ 2–3 passes; counted 3), a vjp is a forward pass plus a backward pass (≈ 3), reverse over
reverse adds a backward pass through the backward graph (≈ 5, and it yields Jᵀv on the way, see
:func:`jvp_vjp`), a central difference is exactly two forward passes. Measured on the embedded digits
UNet on one CPU thread (batch 256): a vjp 1.9 passes, a forward-mode jvp 4.8 — so where both run, products
that only need the pair (v, J) use vjps (:func:`cheaper_product`).

Known failures, measured on diffusers' ``UNet2DModel`` (torch 2.11–2.13): forward-mode AD has no rule
for the fused scaled-dot-product attention kernels (``jvp`` fails with the default attention
processor); with the classic ``AttnProcessor`` it then fails inside GroupNorm on a non-contiguous
tangent unless GroupNorm's input is made contiguous; reverse over reverse fails with the default
processor (no double backward for the fused CPU flash kernel, nor for CUDA's memory-efficient
kernel). Central differences only need forward passes and always run. :func:`select_strategy` tries
the strategies on real inputs and keeps the first that runs and agrees with central differences.

**Finite-difference step.** For sample b, h_b = r · max(1, rms(x_b)) / max_j |v_bj| with r = ∛ε (ε the
machine epsilon of x's dtype, 2⁻⁵² or 2⁻²³: r ≈ 6.1e-6 in float64, 4.9e-3 in float32), so the largest
coordinate moves by r · max(1, rms(x_b)). The truncation error h²|∂³s|/6 and the rounding error
ε|s|/h then balance at a relative error of order ε^(2/3) (≈ 4e-11 in float64, 2e-5 in float32) for a
field that varies on the scale of the data. Pass ``rel_step`` when the forward pass is less precise
than x's dtype (tf32 or bf16 probes: :func:`rel_step_for`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from conservcheck import rng
from conservcheck.errors import ProbeContractError, UsageError, reason
from conservcheck.precision import PRECISIONS, check_mode

Field = Callable[[Tensor, Tensor | float], Tensor]

STRATEGIES = ("jvp", "double_vjp", "fd")
# Forward-pass equivalents of one product per sample (see module docstring).
PRODUCT_COST: dict[str, dict[str, int]] = {
    "jvp": {"jvp": 3, "vjp": 3, "pair": 6},
    "double_vjp": {"jvp": 5, "vjp": 3, "pair": 5},
    "fd": {"jvp": 2},
}
_CHECK_SEED = 20240917
_CHECK_ROWS = 2
_STACK_ROWS = 256


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown Jacobian strategy {strategy!r}", f"use one of {', '.join(STRATEGIES)}")


def rel_step_for(precision: str | torch.dtype) -> float:
    """∛ε for a precision name (``fp64``, ``fp32``, ``tf32``, ``bf16``) or a floating dtype."""
    eps = PRECISIONS[check_mode(precision)].eps if isinstance(precision, str) else torch.finfo(precision).eps
    return math.pow(float(eps), 1.0 / 3.0)


def _per_sample(h: Tensor, x: Tensor) -> Tensor:
    return h.reshape(-1, *([1] * (x.ndim - 1)))


def fd_step(x: Tensor, v: Tensor, rel_step: float | None = None) -> Tensor:
    """The central-difference step h_b = r · max(1, rms(x_b)) / max_j |v_bj|, shape [B] (module doc)."""
    r = rel_step_for(x.dtype) if rel_step is None else float(rel_step)
    b = x.shape[0]
    scale = x.detach().reshape(b, -1).pow(2).mean(1).sqrt().clamp_min(1.0)
    vmax = v.detach().reshape(b, -1).abs().amax(1)
    return r * scale / torch.where(vmax > 0, vmax, torch.ones_like(vmax))


def _fd_jvp(fn: Field, x: Tensor, t: Tensor | float, v: Tensor, rel_step: float | None) -> Tensor:
    h = _per_sample(fd_step(x, v, rel_step), x)
    with torch.no_grad():
        # Two calls of B rows each, so the memory of one call is that of a forward pass of the batch.
        plus = fn(x + h * v, t)
        minus = fn(x - h * v, t)
    return (plus - minus) / (2 * h)


def _forward_jvp(fn: Field, x: Tensor, t: Tensor | float, v: Tensor) -> Tensor:
    out: Tensor = torch.func.jvp(lambda y: fn(y, t), (x,), (v,))[1]
    return out


def _double_vjp(fn: Field, x: Tensor, t: Tensor | float, v: Tensor) -> tuple[Tensor, Tensor]:
    """(J v, Jᵀ v) from one forward pass: g(u) = Jᵀu is linear in u, so the vjp of g with v is J v."""
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        out = fn(xr, t)
        u = v.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(out, xr, u, create_graph=True, allow_unused=True, materialize_grads=True)
        if not g.requires_grad:  # the field does not depend on x: J = 0
            return torch.zeros_like(x), g.detach()
        (jv,) = torch.autograd.grad(g, u, v, allow_unused=True, materialize_grads=True)
    return jv.detach(), g.detach()


def jvp(fn: Field, x: Tensor, t: Tensor | float, v: Tensor, strategy: str, *, rel_step: float | None = None) -> Tensor:
    """J v per sample: x, v [B, *shape] → [B, *shape] in x's dtype.

    Args:
        fn: the field ``fn(x, t)``; samples must be independent.
        t: whatever ``fn`` takes as time (a scalar or a [B] tensor), passed through unchanged.
        strategy: ``jvp`` (forward mode), ``double_vjp`` (reverse over reverse) or ``fd`` (central
            differences with the step of :func:`fd_step`; ``rel_step`` overrides ∛ε).
    """
    _check_strategy(strategy)
    x, v = x.detach(), v.detach().to(x)
    if strategy == "jvp":
        return _forward_jvp(fn, x, t, v).detach()
    if strategy == "double_vjp":
        return _double_vjp(fn, x, t, v)[0]
    return _fd_jvp(fn, x, t, v, rel_step).detach()


def _no_transpose() -> UsageError:
    return UsageError(
        "the fd strategy has no transposed product Jᵀv (central differences only give Jv)",
        "use jvp products only with fd, or pick the jvp or double_vjp strategy",
    )


def vjp(fn: Field, x: Tensor, t: Tensor | float, v: Tensor, strategy: str) -> Tensor:
    """Jᵀ v per sample (reverse mode), shape of x; the ``fd`` strategy has none and raises UsageError."""
    _check_strategy(strategy)
    if strategy == "fd":
        raise _no_transpose()
    x, v = x.detach(), v.detach().to(x)
    with torch.enable_grad():
        xr = x.requires_grad_(True)
        out = fn(xr, t)
        (g,) = torch.autograd.grad(out, xr, v, allow_unused=True, materialize_grads=True)
    return g.detach()


def jvp_vjp(fn: Field, x: Tensor, t: Tensor | float, v: Tensor, strategy: str) -> tuple[Tensor, Tensor]:
    """(J v, Jᵀ v) for the same v; ``double_vjp`` gets both from one reverse-over-reverse pass.

    Cost per sample: :data:`PRODUCT_COST` [strategy]["pair"] forward passes. Raises UsageError for ``fd``.
    """
    _check_strategy(strategy)
    if strategy == "fd":
        raise _no_transpose()
    if strategy == "double_vjp":
        return _double_vjp(fn, x.detach(), t, v.detach().to(x))
    return jvp(fn, x, t, v, strategy), vjp(fn, x, t, v, strategy)


def cheaper_product(strategy: str) -> str:
    """``"vjp"`` where a vjp costs no more than a jvp (both AD strategies: reverse mode is the cheaper in
    practice, see the module doc), else ``"jvp"`` (central differences, which have no vjp).

    Either gives what only depends on the pair (v, J): vᵀJv, a row or column of J, the diagonal.
    """
    _check_strategy(strategy)
    cost = PRODUCT_COST[strategy]
    return "vjp" if cost.get("vjp", math.inf) <= cost["jvp"] else "jvp"


def _product(fn: Field, x: Tensor, t: Tensor | float, v: Tensor, strategy: str, rel_step: float | None) -> Tensor:
    if cheaper_product(strategy) == "vjp":
        return vjp(fn, x, t, v, strategy)
    return jvp(fn, x, t, v, strategy, rel_step=rel_step)


# --------------------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class StrategyChoice:
    """The strategy :func:`select_strategy` kept and how every candidate fared.

    ``max_rel_dev`` is the chosen strategy's largest relative deviation from the central-difference
    check (for ``fd`` itself: the disagreement of the check at steps h and 2h); ``deviations`` holds it
    for every candidate that ran; ``rejected`` names each candidate that failed or deviated, with why.
    """

    name: str
    max_rel_dev: float
    tolerance: float
    reference: str
    reference_error: float
    deviations: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    n_evals: int = 0

    def to_meta(self) -> dict[str, Any]:
        """Flat entries for a diagnostic's meta (``strategy`` is the name alone)."""
        return {
            "strategy": self.name,
            "strategy_max_rel_dev": self.max_rel_dev,
            "strategy_tolerance": self.tolerance,
            "strategy_reference": self.reference,
            "strategy_deviations": dict(self.deviations),
            "strategy_rejected": dict(self.rejected),
        }


def _rel(a: Tensor, ref: Tensor) -> Tensor:
    """Per-sample ‖a − ref‖ / ‖ref‖ (0 when both vanish), float64 [B]."""
    a64, r64 = a.reshape(a.shape[0], -1).double(), ref.reshape(ref.shape[0], -1).double()
    num = (a64 - r64).norm(dim=1)
    den = torch.maximum(r64.norm(dim=1), a64.norm(dim=1))
    return torch.where(den > 0, num / torch.where(den > 0, den, 1), torch.zeros_like(num))


def check_tolerance(rel_step: float, reference_error: float) -> float:
    """Largest relative deviation from the central-difference check that still passes.

    400 r² ≈ 400 ε^(2/3) is ~100× the check's own expected error (clipped to [1e-6, 0.25]: 1e-6 in
    float64, 1e-2 in float32), widened to 4× the check's measured error when that is larger.
    """
    base = min(0.25, max(1e-6, 400.0 * rel_step**2))
    return max(base, 4.0 * reference_error)


def select_strategy(
    fn: Field,
    x: Tensor,
    t: Tensor | float,
    candidates: Sequence[str] = STRATEGIES,
    *,
    rel_step: float | None = None,
) -> StrategyChoice:
    """Try each candidate on the first rows of x and keep the first that runs and agrees with differences.

    Check: Rademacher v, w (a fixed stream, so the check is reproducible); the references are central
    differences J v and J w at step h (in x's dtype: a float64 check for float64 fields), and their
    own error is estimated as the disagreement of J v with the step 2h. A candidate passes if its J v
    (relative to the reference) and its Jᵀv through the adjoint identity ⟨Jᵀv, w⟩ = ⟨v, J w⟩
    (normalised by ‖J w‖, the typical size of ⟨v, J w⟩ for independent Rademacher v, w) agree within
    :func:`check_tolerance`, and all values are finite. Failures (exceptions) are caught and recorded.

    Raises:
        ProbeContractError: no candidate passes, or the field is not finite at x.
    """
    for c in candidates:
        _check_strategy(c)
    if not candidates:
        raise UsageError("no Jacobian strategy to choose from", f"pass some of {', '.join(STRATEGIES)}")
    r = rel_step_for(x.dtype) if rel_step is None else float(rel_step)
    x = x.detach()[:_CHECK_ROWS]
    t = t[:_CHECK_ROWS] if isinstance(t, Tensor) and t.ndim > 0 else t
    n = x.shape[0]
    shape = tuple(x.shape[1:])
    v = torch.stack([rng.rademacher(shape, _CHECK_SEED, "strategy_check", "v", b, dtype=x.dtype) for b in range(n)])
    w = torch.stack([rng.rademacher(shape, _CHECK_SEED, "strategy_check", "w", b, dtype=x.dtype) for b in range(n)])
    v, w = v.to(x.device), w.to(x.device)
    ref = _fd_jvp(fn, x, t, v, r)
    ref2 = _fd_jvp(fn, x, t, v, 2 * r)
    ref_w = _fd_jvp(fn, x, t, w, r)
    n_evals = 6 * n
    if not all(bool(torch.isfinite(a).all()) for a in (ref, ref2, ref_w)):
        raise ProbeContractError(
            "the field is not finite near the Jacobian check points",
            "check the model's output at this time point (NaN or Inf in a forward pass)",
        )
    ref_err = float(_rel(ref, ref2).max())
    tol = check_tolerance(r, ref_err)
    ref_w_norm = ref_w.reshape(n, -1).double().norm(dim=1)
    deviations: dict[str, float] = {}
    rejected: dict[str, str] = {}
    for name in candidates:
        if name == "fd":
            deviations[name] = ref_err
            continue
        n_evals += PRODUCT_COST[name]["pair"] * n
        try:
            jv, jtv = jvp_vjp(fn, x, t, v, name)
        except Exception as err:  # any failure of a differentiation rule rejects the candidate
            rejected[name] = reason(err)
            continue
        if not (bool(torch.isfinite(jv).all()) and bool(torch.isfinite(jtv).all())):
            rejected[name] = "non-finite products where the field is finite"
            continue
        adj = (jtv.reshape(n, -1).double() * w.reshape(n, -1).double()).sum(1)
        adj_ref = (v.reshape(n, -1).double() * ref_w.reshape(n, -1).double()).sum(1)
        adj_dev = (adj - adj_ref).abs() / torch.where(ref_w_norm > 0, ref_w_norm, 1)
        dev = float(torch.maximum(_rel(jv, ref), adj_dev).max())
        deviations[name] = dev
        if not dev <= tol:
            rejected[name] = f"deviates from central differences by {dev:.3g} (tolerance {tol:.3g})"
    kept = [c for c in candidates if c in deviations and c not in rejected]
    if not kept:
        reasons = "; ".join(f"{k}: {v}" for k, v in rejected.items())
        raise ProbeContractError(
            f"no Jacobian strategy works for this field ({reasons})",
            "include 'fd' among the candidates, or make the model differentiable (e.g. classic attention)",
        )
    name = kept[0]
    reference = f"central differences in {str(x.dtype).replace('torch.', '')}, relative step {r:.3g}"
    return StrategyChoice(name, deviations[name], tol, reference, ref_err, deviations, rejected, n_evals)


# ------------------------------------------------------------------------------------- divergence


def divergence_exact(
    fn: Field, x: Tensor, t: Tensor | float, strategy: str, *, rel_step: float | None = None
) -> Tensor:
    """tr J = Σ_j e_jᵀ J e_j per sample from D products with unit vectors (for small D), float64 [B].

    Unit vectors are stacked along the batch (up to ~256 rows per call); under ``double_vjp`` the
    cheaper vjp rows e_jᵀJ are used. Cost: D products per sample (:data:`PRODUCT_COST`).
    """
    _check_strategy(strategy)
    x = x.detach()
    b = x.shape[0]
    d = math.prod(x.shape[1:])
    group = max(1, _STACK_ROWS // max(1, b))
    total = torch.zeros(b, dtype=torch.float64, device=x.device)
    for j0 in range(0, d, group):
        js = torch.arange(j0, min(d, j0 + group), device=x.device)
        k = js.shape[0]
        xs = x.repeat(k, *([1] * (x.ndim - 1)))  # row m = (unit k_m, sample b_m), k-major
        rows_j = js.repeat_interleave(b)
        e = torch.zeros(k * b, d, dtype=x.dtype, device=x.device)
        e[torch.arange(k * b, device=x.device), rows_j] = 1
        ts = t.repeat(k) if isinstance(t, Tensor) and t.ndim > 0 else t
        out = _product(fn, xs, ts, e.reshape(xs.shape), strategy, rel_step).reshape(k * b, d)
        diag = out.gather(1, rows_j[:, None])[:, 0].double()
        total += diag.reshape(k, b).sum(0)
    return total


def _key_tuple(key: object) -> tuple[object, ...]:
    return tuple(key) if isinstance(key, (tuple, list)) else (key,)


def rademacher_probes(
    shape: tuple[int, ...],
    n_probes: int,
    seed: int,
    keys: Sequence[object],
    *suffix: object,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Probe p of sample b from the stream (seed, *keys[b], p, *suffix): [n_probes, B, *shape]."""
    return torch.stack(
        [
            torch.stack([rng.rademacher(shape, seed, *_key_tuple(k), p, *suffix, dtype=dtype) for k in keys])
            for p in range(n_probes)
        ]
    ).to(device)


def divergence_hutchinson(
    fn: Field,
    x: Tensor,
    t: Tensor | float,
    *,
    n_probes: int,
    seed: int,
    keys: Sequence[object],
    strategy: str,
    rel_step: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Hutchinson's estimate of tr J: the mean of vᵀJv over Rademacher v, with its standard error.

    Args:
        keys: one key (or tuple of keys) per sample, e.g. ``[("stein", time.key, start + b) ...]``;
            probe p of sample b comes from the stream (seed, *keys[b], p), so a sample's probes do
            not depend on the batch it runs in (its estimate only by the rounding of the field's kernels).
        n_probes: at least 2 (the standard error needs two); one product per probe (a vjp under
            ``double_vjp``, else a jvp), probes run one after another over the whole batch.
    Returns:
        (mean, stderr), float64 [B]; stderr = sd(vᵀJv) / √n_probes. For Rademacher v the variance is
        2 Σ_{i≠j} ((J_ij + J_ji)/2)²: the diagonal contributes none.
    """
    _check_strategy(strategy)
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 2:
        raise UsageError(f"n_probes must be an integer ≥ 2, got {n_probes!r}", "use e.g. 16 probes per sample")
    if len(keys) != x.shape[0]:
        raise UsageError(f"got {len(keys)} keys for {x.shape[0]} samples", "pass one key per sample")
    x = x.detach()
    probes = rademacher_probes(tuple(x.shape[1:]), n_probes, seed, keys, dtype=x.dtype, device=x.device)
    vals = []
    for v in probes:
        out = _product(fn, x, t, v, strategy, rel_step)
        vals.append((v.reshape(x.shape[0], -1).double() * out.reshape(x.shape[0], -1).double()).sum(1))
    q = torch.stack(vals, 1)
    return q.mean(1), q.std(1) / math.sqrt(n_probes)


__all__ = [
    "PRODUCT_COST",
    "STRATEGIES",
    "StrategyChoice",
    "check_tolerance",
    "cheaper_product",
    "divergence_exact",
    "divergence_hutchinson",
    "fd_step",
    "jvp",
    "jvp_vjp",
    "rademacher_probes",
    "rel_step_for",
    "select_strategy",
    "vjp",
]
