"""The Stein diagnostic: the error field e = s_ref − s_θ and its Stein operator 𝒮e (paper Eq. 20–21).

Driving the probability flow with s_θ = s_ref − e instead of the score adds the density source
[∇·e + s_refᵀe] ρ to the Liouville equation (Eq. 20); the learned field transports the true marginals
wherever that source vanishes (Eq. 21), however large e is. At forward samples x_t = α x0 + σ ε of one
time point this reports per sample:

=================  ==========================================================================
column             value
=================  ==========================================================================
``err_norm``       ‖e‖₂ (score units, 1/data; the paper's Fig. 4a)
``rel_err_norm``   ‖e‖₂ / ‖s_ref‖₂ (dimensionless)
``div_e``          ∇·e = ∇·s_ref − ∇·s_θ (1/data²)
``sref_dot_e``     s_refᵀe (1/data²)
``stein``          𝒮e = ∇·e + s_refᵀe (Eq. 21; 1/data²): the density-source rate ∂_τ log ρ the
                   error adds (Eq. 20, per unit reverse time for the OU process)
``div_e_se``       standard error of ``div_e`` (and of ``stein``) from Hutchinson probes; 0 when exact
=================  ==========================================================================

**Built-in check.** Stein's identity E_p[∇·e + ∇log pᵀe] = ∫ ∇·(p e) = 0 holds for *any* smooth e
decaying at infinity. When x0 are drawn from the reference's own data (its analytic law, or the dataset
behind an empirical reference) the x_t are exact draws from p_t, so the mean of ``stein`` over samples
must vanish within its confidence interval whatever the model is (:func:`stein_summary`). A mean far
outside it means the reference does not describe the samples, or a divergence is wrong. The pointwise
size (RMS) of 𝒮e is what Eq. 20 is about: zero only if e lies in the kernel of ∇· + s_refᵀ.

∇·e is exact when D ≤ ``exact_max_dim``: ∇·s_ref in closed form where the reference has one (mixtures,
funnel, empirical data; else D Jacobian-vector products, like ∇·s_θ). Above that, ∇·e is one Hutchinson
estimate on the field e itself with Rademacher probes v (mean of vᵀ(∂e/∂x)v): its variance comes from
the off-diagonal Jacobian of e, not of s_θ, so it shrinks as the model approaches the reference and is
exactly 0 when e ≡ 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor

from conservcheck import settings
from conservcheck.analytic.reference_scores import Reference, resolve_reference
from conservcheck.batching import Batcher
from conservcheck.diagnostics import ANY, Diagnostic, Figure, Variant
from conservcheck.diagnostics.result import DiagnosticResult
from conservcheck.errors import UsageError
from conservcheck.geometry.jacobian import (
    PRODUCT_COST,
    STRATEGIES,
    divergence_exact,
    divergence_hutchinson,
    rel_step_for,
    select_strategy,
)
from conservcheck.probe import VectorFieldProbe
from conservcheck.settings import Option
from conservcheck.timepoints import SampleIndex, TimePoint, forward_samples, sample_index

EXACT_MAX_DIM = 64
DIVERGENCE_MODES = ("auto", "exact", "hutchinson")
COLUMNS = ("err_norm", "rel_err_norm", "div_e", "sref_dot_e", "stein", "div_e_se")


def divergence_mode(divergence: str, dim: int, exact_max_dim: int = EXACT_MAX_DIM) -> str:
    """``exact`` or ``hutchinson`` for a request (``auto``: exact up to ``exact_max_dim`` dimensions)."""
    if divergence not in DIVERGENCE_MODES:
        raise UsageError(f"unknown divergence mode {divergence!r}", f"use one of {', '.join(DIVERGENCE_MODES)}")
    if divergence == "auto":
        return "exact" if dim <= exact_max_dim else "hutchinson"
    return divergence


def stein_diagnostic(
    probe: VectorFieldProbe,
    x0: Tensor,
    time: TimePoint,
    *,
    seed: int,
    batcher: Batcher,
    reference: Reference | str | Any,
    divergence: str = "auto",
    n_probes: int = 16,
    strategy: str = "auto",
    exact_max_dim: int = EXACT_MAX_DIM,
    start: SampleIndex = 0,
) -> DiagnosticResult:
    """e = s_ref − s_θ and 𝒮e = ∇·e + s_refᵀe (Eq. 21) at the forward samples of ``x0`` at ``time``.

    Args:
        probe: the model, in score units.
        x0: clean samples [B, *shape] in the probe's data coordinates; sample b has index ``start + b``
            (or ``start[b]`` when ``start`` lists one global index per sample)
            (its noise and Hutchinson probes come from streams keyed by that index).
        time: the time point.
        seed: seed of every random draw.
        batcher: model batching with out-of-memory back-off.
        reference: a :class:`Reference` or anything :func:`resolve_reference` accepts.
        divergence: ``auto`` (exact when D ≤ ``exact_max_dim``), ``exact`` or ``hutchinson``.
        n_probes: Rademacher probes per sample for Hutchinson divergences.
        strategy: Jacobian-product strategy (``jvp``, ``double_vjp``, ``fd``) or ``auto``: chosen by
            :func:`conservcheck.geometry.jacobian.select_strategy` on the field whose divergence is taken.
    Returns:
        DiagnosticResult("stein", <reference kind>) with the module docstring's columns ([B] float64
        CPU) and meta: n_evals, strategy (and the strategy check's entries), divergence,
        reference_divergence, n_probes, reference, dim.
    """
    if int(n_probes) < 2:
        raise UsageError(f"n_probes must be at least 2, got {n_probes}", "use e.g. --probes 16")
    ref = resolve_reference(reference, probe)
    mode = divergence_mode(divergence, probe.dim, exact_max_dim)
    b = x0.shape[0]
    x0 = x0.to(device=probe.device, dtype=probe.dtype)
    x_t, _ = forward_samples(x0, time, seed, start)
    t_all = torch.full((b,), time.t, dtype=torch.float64, device=probe.device)
    index = torch.tensor(sample_index(start, b), device=probe.device)

    def error_field(x: Tensor, t: Tensor | float) -> Tensor:
        return ref.score(x.to(torch.float64), t).to(x.dtype) - probe.score(x, t)

    div_field = probe.score if mode == "exact" else error_field
    rel_step = rel_step_for(probe.precision)
    if strategy == "auto":
        choice = select_strategy(div_field, x_t[:2], t_all[:2], rel_step=rel_step)
        name, strategy_meta, check_evals = choice.name, choice.to_meta(), choice.n_evals
    elif strategy in STRATEGIES:
        name, strategy_meta, check_evals = strategy, {"strategy": strategy}, 0
    else:
        raise UsageError(f"unknown Jacobian strategy {strategy!r}", f"use auto or one of {', '.join(STRATEGIES)}")
    ref_strategy = None
    if mode == "exact" and not ref.has_divergence:
        ref_strategy = select_strategy(ref.score, x_t[:2].to(torch.float64), t_all[:2]).name

    def chunk(x: Tensor, t: Tensor, idx: Tensor) -> Tensor:
        xr = x.to(torch.float64)
        with torch.no_grad():
            s_theta = probe.score(x, t).to(torch.float64)
            s_ref = ref.score(xr, t).to(torch.float64)
        e = (s_ref - s_theta).reshape(x.shape[0], -1)
        s_ref = s_ref.reshape(x.shape[0], -1)
        err = e.norm(dim=1)
        dot = (s_ref * e).sum(1)
        if mode == "exact":
            div_theta = divergence_exact(probe.score, x, t, name, rel_step=rel_step)
            if ref.has_divergence:
                with torch.no_grad():
                    div_ref = ref.divergence(xr, t).to(torch.float64)
            else:
                assert ref_strategy is not None, "chosen above for an exact divergence the reference lacks"
                div_ref = divergence_exact(ref.score, xr, t, ref_strategy)
            div_e, se = div_ref - div_theta, torch.zeros_like(err)
        else:
            keys = [("stein", time.key, int(i)) for i in idx]
            div_e, se = divergence_hutchinson(
                error_field, x, t, n_probes=int(n_probes), seed=seed, keys=keys, strategy=name, rel_step=rel_step
            )
        return torch.stack([err, err / s_ref.norm(dim=1), div_e, dot, div_e + dot, se], dim=1)

    table = batcher.map(chunk, x_t, t_all, index).to("cpu", torch.float64)
    per_sample = probe.dim if mode == "exact" else int(n_probes)
    product = PRODUCT_COST[name]["vjp" if name == "double_vjp" else "jvp"]
    meta = {
        # One forward pass for s_θ, one Jacobian product per direction, plus the strategy check.
        "n_evals": b * (1 + product * per_sample) + check_evals,
        **strategy_meta,
        "divergence": mode,
        "reference_divergence": "joint" if mode == "hutchinson" else ("closed-form" if ref.has_divergence else "exact"),
        "n_probes": int(n_probes) if mode == "hutchinson" else 0,
        "reference": ref.describe(),
        "dim": probe.dim,
    }
    values = {col: table[:, i].contiguous() for i, col in enumerate(COLUMNS)}
    return DiagnosticResult("stein", ref.kind, time, values, meta)


def stein_summary(result: DiagnosticResult, level: float = 0.95) -> dict[str, float]:
    """Across-sample summary of a Stein result.

    * ``stein_mean`` with ``stein_mean_se`` and the ``level`` confidence interval ``stein_mean_ci_lo`` /
      ``_hi``: the built-in check — it must contain 0 when x0 come from the reference's data (Stein's
      identity); ``stein_identity_z`` = mean / se.
    * ``stein_rms`` = √mean(𝒮e²): the pointwise size of the density source (Eq. 20);
      ``stein_rms_debiased`` removes the Hutchinson noise, √max(0, mean(𝒮e²) − mean(se²)).
    * ``err_norm_mean``, ``rel_err_norm_mean``: the size of e itself.
    """
    v = result.values
    s = v["stein"]
    n = s.numel()
    if n < 2:
        raise UsageError("a Stein summary needs at least 2 samples", "run the diagnostic on more samples")
    mean = float(s.mean())
    se = float(s.std(unbiased=True)) / math.sqrt(n)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    ms = float((s**2).mean())
    return {
        "n": float(n),
        "stein_mean": mean,
        "stein_mean_se": se,
        "stein_mean_ci_lo": mean - z * se,
        "stein_mean_ci_hi": mean + z * se,
        "stein_identity_z": mean / se if se > 0 else (0.0 if mean == 0 else math.inf),
        "stein_rms": math.sqrt(ms),
        "stein_rms_debiased": math.sqrt(max(0.0, ms - float((v["div_e_se"] ** 2).mean()))),
        "err_norm_mean": float(v["err_norm"].mean()),
        "rel_err_norm_mean": float(v["rel_err_norm"].mean()),
    }


# --------------------------------------------------------------------------------------------- registry


def _plan(opts: Mapping[str, Any], probe: VectorFieldProbe) -> list[Variant]:
    if not opts["stein"]:
        return []
    ref = resolve_reference(opts["stein"], probe)
    # The variant is the reference's kind (funnel, gaussian, mixture, data, …): a name without the dots of
    # a file path, so gate expressions can address it.
    variant = ref.name.split(":")[0].replace(".", "_") or "reference"
    kwargs = {"reference": ref, "n_probes": opts["n_probes"]}
    return [Variant(variant, stein_diagnostic, kwargs, 3 * opts["n_samples"] * opts["n_probes"], controlled=False)]


DIAGNOSTIC = Diagnostic(
    name="stein",
    summary="the error field e = s_ref − s_θ and its Stein operator ∇·e + s_refᵀe (Eq. 20–21)",
    options=(
        Option(
            "stein",
            None,
            "--stein",
            "Reference score for the Stein diagnostic (Eq. 20–21); off when unset.",
            settings.text("--stein", "a reference (funnel, gaussian, mixture:FILE, data:FILE)"),
            "REF",
            schema={"type": ["string", "null"]},
        ),
    ),
    plan=_plan,
    selected=lambda opts: bool(opts["stein"]),
    table={ANY: ("stein", "rel_err_norm")},
    figures=(Figure("err_norm", "‖s_ref − s_θ‖"), Figure("stein", "∇·e + s_refᵀe  (Eq. 20)", log=False)),
)


__all__ = ["COLUMNS", "EXACT_MAX_DIM", "divergence_mode", "stein_diagnostic", "stein_summary"]
