"""The differential-constraint diagnostic: the score's Jacobian must be symmetric (paper §3.3, Eq. 5).

A score s = ∇ₓ log p_t is a gradient, so its Jacobian J_ij = ∂s_i/∂x_j is the Hessian of log p_t and
∂_j s_i − ∂_i s_j = 0 for all i, j (Eq. 5). Two estimators at the forward samples
x_t = α x0 + σ ε of :func:`~conservcheck.timepoints.forward_samples` (the points the loop and
Stein diagnostics see):

* :func:`curl_subjacobian` — the paper's: per sample a random index set S (|S| = ``block``, 64 in the
  paper), the block J_SS from |S| Jacobian products with unit vectors, and C = J_SS − J_SSᵀ,
  C_ij = ∂s_{S_i}/∂x_{S_j} − ∂s_{S_j}/∂x_{S_i}.
* :func:`curl_hutchinson` — the whole Jacobian: ‖J − Jᵀ‖²_F = E‖Jv − Jᵀv‖² and ‖J‖²_F = E‖Jv‖² over
  Rademacher v, and the relative asymmetry ‖J − Jᵀ‖_F / (2‖J‖_F) ∈ [0, 1] with a 95% interval.

Columns (float64 [B]; J in score units per data unit, i.e. 1/data²):

======================  ==========================================================================
``curl_mean_abs``       mean over i ≠ j in S of |C_ij| (the paper's Fig. 2c/3c quantity)
``sym_mean_abs``        the same for J_SS + J_SSᵀ (the symmetric part's scale, for comparison)
``curl_rel_fro``        ‖C‖_F / ‖J_SS + J_SSᵀ‖_F (dimensionless; 0 for a score)
``curl_fro2``           ‖C‖²_F and ``sym_fro2`` ‖J_SS + J_SSᵀ‖²_F (1/data⁴), for the pooled ratio
``asym_fro2``           ‖J − Jᵀ‖²_F (twice QCSBM's Asym = ½‖J − Jᵀ‖²_F), 1/data⁴
``asym_fro2_se``        its standard error over probes
``jac_fro2``            ‖J‖²_F, 1/data⁴, and ``jac_fro2_se``
``rel_asym``            ‖J − Jᵀ‖_F / (2‖J‖_F) (dimensionless; its square is QCSBM's NAsym)
``rel_asym_se``         jackknife standard error; ``rel_asym_ci_low`` / ``_high``: its 95% interval
======================  ==========================================================================

A ratio whose numerator and denominator both vanish (a field whose Jacobian is zero) is 0, not NaN.

Pooled ratios: the per-sample ``curl_rel_fro`` and ``rel_asym`` are summarised by their median over samples
(the verdict's headline), and also *pooled* over samples, √(Σ‖C‖²/Σ‖J_SS + J_SSᵀ‖²) and
½√(Σ‖J − Jᵀ‖²/Σ‖J‖²) — the form other work reports (:attr:`Diagnostic.pooled`).

Random draws: the index set of sample b comes from the stream (seed, "curl_block", time.key, b), its
probes from (seed, "curl_probe", time.key, b, p) — independent of the batch size (the values are within
the reproducibility tolerance of :mod:`conservcheck.report.reproducibility` across batch sizes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from conservcheck import rng, settings
from conservcheck.batching import Batcher
from conservcheck.diagnostics import Diagnostic, Figure, Variant
from conservcheck.diagnostics.result import DiagnosticResult, ratio
from conservcheck.errors import UsageError
from conservcheck.geometry.jacobian import (
    PRODUCT_COST,
    STRATEGIES,
    StrategyChoice,
    cheaper_product,
    jvp,
    jvp_vjp,
    rel_step_for,
    select_strategy,
    vjp,
)
from conservcheck.probe import VectorFieldProbe
from conservcheck.settings import Option
from conservcheck.timepoints import SampleIndex, TimePoint, forward_samples, sample_index

Z95 = 1.959963984540054
BLOCK_STREAM = "curl_block"
PROBE_STREAM = "curl_probe"
CONVENTION = "J_ij = ds_i/dx_j; C = J_SS - J_SS^T, C_ij = d_j s_i - d_i s_j"
SUBJACOBIAN_COLUMNS = ("curl_mean_abs", "sym_mean_abs", "curl_rel_fro", "curl_fro2", "sym_fro2")
HUTCHINSON_COLUMNS = (
    "asym_fro2",
    "asym_fro2_se",
    "jac_fro2",
    "jac_fro2_se",
    "rel_asym",
    "rel_asym_se",
    "rel_asym_ci_low",
    "rel_asym_ci_high",
)


def _check(probe: VectorFieldProbe, x0: Tensor, strategy: str, start: SampleIndex) -> list[int]:
    if x0.ndim < 2 or tuple(x0.shape[1:]) != probe.sample_shape or x0.shape[0] == 0:
        raise UsageError(
            f"x0 has shape {tuple(x0.shape)}, expected [B, {', '.join(map(str, probe.sample_shape))}] with B ≥ 1",
            "pass a batch of clean samples in the probe's data coordinates",
        )
    if strategy != "auto" and strategy not in STRATEGIES:
        raise UsageError(f"unknown Jacobian strategy {strategy!r}", f"use auto or one of {', '.join(STRATEGIES)}")
    return sample_index(start, x0.shape[0])


def _forward(probe: VectorFieldProbe, x0: Tensor, time: TimePoint, seed: int, start: SampleIndex) -> Tensor:
    """x_t in float64 (as the loop diagnostic builds it), then in the probe's dtype on its device."""
    x_t, _ = forward_samples(x0.to(device=probe.device, dtype=torch.float64), time, seed, start)
    return x_t.to(probe.dtype)


def _choose(probe: VectorFieldProbe, x_t: Tensor, t: Tensor, strategy: str) -> StrategyChoice:
    """``auto``: the first of jvp, double_vjp, fd that passes the check; a named strategy is checked too."""
    candidates = STRATEGIES if strategy == "auto" else (strategy,)
    return select_strategy(probe.score, x_t, t, candidates, rel_step=rel_step_for(probe.precision))


def block_indices(dim: int, block: int, seed: int, time_key: str, index: list[int]) -> Tensor:
    """Index sets S_b: the first ``block`` entries of a permutation of range(dim) per sample, [B, block]."""
    return torch.stack([rng.permutation(dim, seed, BLOCK_STREAM, time_key, i)[:block] for i in index])


def subjacobian(
    probe: VectorFieldProbe,
    x: Tensor,
    t: Tensor | float,
    index_sets: Tensor,
    strategy: str,
    batcher: Batcher,
) -> Tensor:
    """J_SS per sample: J_SS[b, i, j] = ∂s_{S_bi}/∂x_{S_bj} at x[b], float64 [B, n, n] on the CPU.

    Products are stacked over (sample, unit vector) rows and run through ``batcher``: columns J e_j
    (jvps) for ``jvp`` and ``fd``, rows Jᵀe_i (vjps, cheaper under reverse over reverse) for
    ``double_vjp``. Cost: B·n products.
    """
    b_count, n = index_sets.shape
    dim = probe.dim
    use_rows = cheaper_product(strategy) == "vjp"
    sets = index_sets.to(x.device)
    rel_step = rel_step_for(probe.precision)

    def chunk(ids: Tensor) -> Tensor:
        ids = ids.to(x.device)
        b, k = ids // n, ids % n
        e = torch.zeros(ids.shape[0], dim, dtype=x.dtype, device=x.device)
        e[torch.arange(ids.shape[0], device=x.device), sets[b, k]] = 1
        e = e.reshape(-1, *probe.sample_shape)
        if use_rows:
            out = vjp(probe.score, x[b], t, e, strategy)
        else:
            out = jvp(probe.score, x[b], t, e, strategy, rel_step=rel_step)
        return out.reshape(ids.shape[0], dim).gather(1, sets[b]).double()

    res = batcher.map(chunk, torch.arange(b_count * n)).reshape(b_count, n, n).cpu()
    # Columns: res[b, k, i] = (J e_{S_k})_{S_i} = J[S_i, S_k]; rows: res[b, k, j] = J[S_k, S_j].
    return res if use_rows else res.transpose(1, 2).contiguous()


def block_values(j_ss: Tensor) -> dict[str, Tensor]:
    """The :data:`SUBJACOBIAN_COLUMNS` of blocks J_SS [B, n, n] (module doc)."""
    n = j_ss.shape[-1]
    curl = j_ss - j_ss.transpose(1, 2)
    sym = j_ss + j_ss.transpose(1, 2)
    off = ~torch.eye(n, dtype=torch.bool, device=j_ss.device)
    pairs = n * (n - 1)
    curl_fro, sym_fro = curl.flatten(1).norm(dim=1), sym.flatten(1).norm(dim=1)
    return {
        "curl_mean_abs": (curl.abs() * off).sum((1, 2)) / pairs,
        "sym_mean_abs": (sym.abs() * off).sum((1, 2)) / pairs,
        "curl_rel_fro": ratio(curl_fro, sym_fro),
        "curl_fro2": curl_fro**2,
        "sym_fro2": sym_fro**2,
    }


def curl_subjacobian(
    probe: VectorFieldProbe,
    x0: Tensor,
    time: TimePoint,
    *,
    seed: int,
    batcher: Batcher,
    block: int = 64,
    strategy: str = "auto",
    start: SampleIndex = 0,
) -> DiagnosticResult:
    """The paper's curl estimator (§3.3, Eq. 5) on a random |S| × |S| sub-Jacobian per sample.

    Args:
        probe: the field, evaluated at canonical time ``time.t``.
        x0: clean samples [B, *sample_shape]; sample b has global index ``start + b`` in every stream.
        time: the time point.
        seed: audit seed.
        batcher: runs the stacked (sample, unit vector) products.
        block: |S| (paper: 64); capped at the dimension D, at least 2.
        strategy: ``auto`` (first of jvp, double_vjp, fd that agrees with central differences) or one
            of them (checked the same way).
        start: global sample index of x0[0], or one global index per sample.
    Returns:
        ``DiagnosticResult("curl", "subjacobian")`` with ``curl_mean_abs``, ``sym_mean_abs``,
        ``curl_rel_fro`` and meta: strategy (+ its check), block, products ("columns" or "rows"),
        convention, n_evals (forward-pass equivalents, the strategy check included).
    """
    index = _check(probe, x0, strategy, start)
    if isinstance(block, bool) or not isinstance(block, int) or block < 2:
        raise UsageError(f"block must be an integer ≥ 2, got {block!r}", "the paper uses 64")
    if probe.dim < 2:
        raise UsageError("the curl needs at least 2 components per sample", "use loops or Stein for 1-D data")
    n = min(block, probe.dim)
    x_t = _forward(probe, x0, time, seed, start)
    t = torch.tensor(time.t, dtype=torch.float64)
    choice = _choose(probe, x_t, t, strategy)
    sets = block_indices(probe.dim, n, seed, time.key, index)
    j_ss = subjacobian(probe, x_t, t, sets, choice.name, batcher)
    product = cheaper_product(choice.name)
    meta: dict[str, Any] = {
        **choice.to_meta(),
        "block": n,
        "products": "rows (vjp)" if product == "vjp" else "columns (jvp)",
        "convention": CONVENTION,
        "n_evals": choice.n_evals + x0.shape[0] * n * PRODUCT_COST[choice.name][product],
    }
    return DiagnosticResult("curl", "subjacobian", time, block_values(j_ss), meta)


def t_quantile(z: float, df: int) -> float:
    """Student-t quantile with ``df`` degrees of freedom at the normal quantile z (Cornish–Fisher).

    The four-term expansion in 1/df (Abramowitz & Stegun 26.7.5): 2.1314 for z = 1.96, df = 15
    (exact 2.1314), 4.27 for df = 2 (exact 4.30).
    """
    z2 = z * z
    g1 = (z2 + 1) * z / 4
    g2 = ((5 * z2 + 16) * z2 + 3) * z / 96
    g3 = (((3 * z2 + 19) * z2 + 17) * z2 - 15) * z / 384
    g4 = ((((79 * z2 + 776) * z2 + 1482) * z2 - 1920) * z2 - 945) * z / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def jackknife_summary(q: Tensor, r: Tensor, q_loo: Tensor, r_loo: Tensor) -> dict[str, Tensor]:
    """The Hutchinson columns from q ≈ ‖J − Jᵀ‖²_F, r ≈ ‖J‖²_F [B] and leave-one-probe-out q_loo, r_loo [B, P].

    Standard errors are the jackknife's, se² = (P − 1)/P · Σ_p (θ₋ₚ − mean θ₋.)²: for a mean of
    independent probe terms it is exactly s/√P, for the ratio ρ = q/r it agrees with the delta method
    to first order, and for the U-statistic of the fd estimator it accounts for the shared probes.
    ``rel_asym`` = ½√ρ with se(ρ)/(8 rel_asym); its 95% interval is ρ ± t se(ρ) (t the Student-t
    0.975 quantile with P − 1 degrees of freedom, 2.13 for P = 16), cut at 0, mapped through ½√·
    (monotone) and clipped to [0, 1], so it stays sensible near 0, where a symmetric interval around
    ½√ρ would not.
    """
    p = q_loo.shape[1]
    t95 = t_quantile(Z95, p - 1)

    def se(loo: Tensor) -> Tensor:
        return ((p - 1) / p * (loo - loo.mean(1, keepdim=True)).pow(2).sum(1)).sqrt()

    rho = ratio(q, r)
    se_rho = se(ratio(q_loo, r_loo))
    rel = 0.5 * rho.sqrt()
    positive = rel > 0
    rel_se = torch.where(positive, se_rho / (8 * torch.where(positive, rel, 1)), torch.zeros_like(rel))
    return {
        "asym_fro2": q,
        "asym_fro2_se": se(q_loo),
        "jac_fro2": r,
        "jac_fro2_se": se(r_loo),
        "rel_asym": rel,
        "rel_asym_se": rel_se,
        "rel_asym_ci_low": (0.5 * (rho - t95 * se_rho).clamp_min(0).sqrt()).clamp(max=1.0),
        "rel_asym_ci_high": (0.5 * (rho + t95 * se_rho).sqrt()).clamp(max=1.0),
    }


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-row inner products over all trailing dimensions, in float64."""
    return (a.flatten(1).double() * b.flatten(1).double()).sum(1)


def _loo_mean(terms: Tensor) -> Tensor:
    """Means of [B, P] terms leaving out each probe in turn, [B, P]."""
    p = terms.shape[1]
    return (terms.sum(1, keepdim=True) - terms) / (p - 1)


def hutchinson_estimates(
    probe: VectorFieldProbe,
    x: Tensor,
    t: Tensor | float,
    *,
    seed: int,
    time_key: str,
    index: list[int],
    n_probes: int,
    strategy: str,
    batcher: Batcher,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(q, r, q_loo, r_loo): estimates of ‖J − Jᵀ‖²_F and ‖J‖²_F [B] and leave-one-probe-out ones [B, P].

    ``jvp`` / ``double_vjp`` (one Rademacher v per probe; Jv and Jᵀv): q = mean ‖Jv − Jᵀv‖²,
    r = mean (‖Jv‖² + ‖Jᵀv‖²)/2, over independent probe terms. Rows (sample, probe) run through
    ``batcher``.

    ``fd`` (Jv only): for two independent probes v, w, E[(vᵀ(J − Jᵀ)w)²] = ‖J − Jᵀ‖²_F and
    vᵀ(J − Jᵀ)w = vᵀ(Jw) − wᵀ(Jv) needs two jvps. With P probes v_1..v_P (P jvps, 2P forward passes)
    every pair p < p' is such a pair: q is the U-statistic mean over the P(P − 1)/2 pairs, and
    r = mean ‖Jv_p‖². Its variance is ≈ (4/P) Var‖(J − Jᵀ)ᵀv‖² + (2/P²) Var (vᵀ(J − Jᵀ)w)²: the
    second term, 2 to 8 times ‖J − Jᵀ‖⁴_F, dominates in high dimension, so q's relative standard
    error is ≈ 2–4/P (13–25% at P = 16), against ≈ √(2/(P·D_eff)) for the one-probe estimator. Samples
    run through ``batcher``, each chunk's P products one after another.
    """
    b_count = x.shape[0]
    shape = probe.sample_shape

    def probes(b: list[int], p: list[int]) -> Tensor:
        rows = [
            rng.rademacher(shape, seed, PROBE_STREAM, time_key, index[bi], pi, dtype=x.dtype) for bi, pi in zip(b, p)
        ]
        return torch.stack(rows).to(x.device)

    if strategy != "fd":

        def pairs(ids: Tensor) -> Tensor:
            b, p = ids // n_probes, ids % n_probes
            v = probes(b.tolist(), p.tolist())
            jv, jtv = jvp_vjp(probe.score, x[b.to(x.device)], t, v, strategy)
            return torch.stack([_dot(jv - jtv, jv - jtv), (_dot(jv, jv) + _dot(jtv, jtv)) / 2], 1)

        terms = batcher.map(pairs, torch.arange(b_count * n_probes)).cpu().reshape(b_count, n_probes, 2)
        q_terms, r_terms = terms[..., 0], terms[..., 1]
        return q_terms.mean(1), r_terms.mean(1), _loo_mean(q_terms), _loo_mean(r_terms)

    rel_step = rel_step_for(probe.precision)

    def gram(ids: Tensor) -> Tensor:
        m = ids.shape[0]
        reps = ids.repeat_interleave(n_probes).tolist()
        v = probes(reps, list(range(n_probes)) * m).reshape(m, n_probes, *shape)
        xs = x[ids.to(x.device)]
        g = torch.empty(m, n_probes, n_probes, dtype=torch.float64, device=x.device)
        for p in range(n_probes):
            jv = jvp(probe.score, xs, t, v[:, p], strategy, rel_step=rel_step)
            g[:, :, p] = (v.flatten(2).double() * jv.flatten(1).double()[:, None]).sum(2)  # v_p'ᵀ J v_p
            g[:, p, p] = _dot(jv, jv)  # the diagonal vᵀJv is not needed: keep ‖J v_p‖² there
        return g.flatten(1)

    g = batcher.map(gram, torch.arange(b_count)).cpu().reshape(b_count, n_probes, n_probes)
    eye = torch.eye(n_probes, dtype=torch.bool)
    r_terms = g.diagonal(dim1=1, dim2=2)
    # h[p, p'] = (v_pᵀ(J − Jᵀ)v_p')² for p ≠ p'
    h = torch.where(eye, torch.zeros_like(g), (g - g.transpose(1, 2)) ** 2)
    n_pairs = n_probes * (n_probes - 1) / 2
    total = h.sum((1, 2)) / 2
    q_loo = (total[:, None] - h.sum(2)) / (n_pairs - (n_probes - 1))
    return total / n_pairs, r_terms.mean(1), q_loo, _loo_mean(r_terms)


def curl_hutchinson(
    probe: VectorFieldProbe,
    x0: Tensor,
    time: TimePoint,
    *,
    seed: int,
    batcher: Batcher,
    n_probes: int = 16,
    strategy: str = "auto",
    start: SampleIndex = 0,
) -> DiagnosticResult:
    """Full-Jacobian asymmetry by Hutchinson's estimator (Eq. 5 over all of J).

    Args:
        probe, x0, time, seed, batcher, start: as for :func:`curl_subjacobian`.
        n_probes: probes per sample (≥ 3); with ``fd`` every pair of probes is a pair (v, w).
        strategy: ``auto`` or one of jvp, double_vjp, fd (checked against central differences).
    Returns:
        ``DiagnosticResult("curl", "hutchinson")`` with the columns of :func:`jackknife_summary` and
        meta: strategy (+ its check), n_probes, estimator, interval, n_evals (forward-pass equivalents
        per probe: 6 for jvp, 5 for double_vjp, 2 for fd; plus the strategy check).
    """
    index = _check(probe, x0, strategy, start)
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 3:
        raise UsageError(
            f"n_probes must be an integer ≥ 3 (the jackknife needs it), got {n_probes!r}",
            "use e.g. 16 probes per sample",
        )
    x_t = _forward(probe, x0, time, seed, start)
    t = torch.tensor(time.t, dtype=torch.float64)
    choice = _choose(probe, x_t, t, strategy)
    estimates = hutchinson_estimates(
        probe,
        x_t,
        t,
        seed=seed,
        time_key=time.key,
        index=index,
        n_probes=n_probes,
        strategy=choice.name,
        batcher=batcher,
    )
    fd = choice.name == "fd"
    per_probe = PRODUCT_COST["fd"]["jvp"] if fd else PRODUCT_COST[choice.name]["pair"]
    meta: dict[str, Any] = {
        **choice.to_meta(),
        "n_probes": n_probes,
        "estimator": "mean over probe pairs of (v^T (J - J^T) w)^2" if fd else "mean of |Jv - J^T v|^2",
        "interval": "leave-one-probe-out jackknife on the ratio, Student-t 95%",
        "convention": "asym_fro2 = |J - J^T|_F^2 = 2 x QCSBM Asym",
        "n_evals": choice.n_evals + x0.shape[0] * n_probes * per_probe,
    }
    return DiagnosticResult("curl", "hutchinson", time, jackknife_summary(*estimates), meta)


# --------------------------------------------------------------------------------------------- registry

CURL_CHOICES = ("none", "subjacobian", "hutchinson", "both")


#: The strategy whose product costs the plan counts (it is chosen when a unit runs): double_vjp, the one
#: UNets with attention end on; a jvp costs the same per block column, and 6 instead of 5 per probe pair.
PLAN_STRATEGY = "double_vjp"


def _plan(opts: Mapping[str, Any], probe: VectorFieldProbe) -> list[Variant]:
    n, which = opts["n_samples"], opts["curl"]
    cost = PRODUCT_COST[PLAN_STRATEGY]
    out: list[Variant] = []
    if which in ("subjacobian", "both"):
        block = min(opts["block"], probe.dim)
        out.append(Variant("subjacobian", curl_subjacobian, {"block": block}, n * block * cost["vjp"]))
    if which in ("hutchinson", "both"):
        probes = opts["n_probes"]
        out.append(Variant("hutchinson", curl_hutchinson, {"n_probes": probes}, n * probes * cost["pair"]))
    return out


DIAGNOSTIC = Diagnostic(
    name="curl",
    summary="∂ᵢsⱼ − ∂ⱼsᵢ (Eq. 5): the paper's random sub-Jacobian and a Hutchinson estimate over all of J",
    options=(
        Option(
            "curl",
            "subjacobian",
            "--curl",
            "Differential constraint (Eq. 5): the paper's 64×64 sub-Jacobian, the full-Jacobian Hutchinson "
            "estimate, both, or none.",
            settings.choice("--curl", CURL_CHOICES),
            "|".join(CURL_CHOICES),
            schema={"enum": list(CURL_CHOICES)},
        ),
        Option(
            "block",
            64,
            "--block",
            "Size of the random sub-Jacobian block (paper: 64).",
            settings.integer("--block", 2),
            "N",
            schema={"type": "integer"},
        ),
    ),
    plan=_plan,
    selected=lambda opts: opts["curl"] != "none",
    headline={"subjacobian": "curl_rel_fro", "hutchinson": "rel_asym"},
    table={"subjacobian": ("curl_rel_fro", "curl_mean_abs"), "hutchinson": ("rel_asym", "asym_fro2")},
    pooled={"curl_rel_fro": ("curl_fro2", "sym_fro2", 1.0), "rel_asym": ("asym_fro2", "jac_fro2", 0.5)},
    coupled_control=True,
    control_follows=("strategy",),
    figures=(
        Figure("curl_mean_abs", "mean |∂ᵢsⱼ − ∂ⱼsᵢ|  (64×64 block)"),
        Figure("curl_rel_fro", "‖B − Bᵀ‖_F relative"),
        Figure("rel_asym", "‖J − Jᵀ‖_F / (2‖J‖_F)"),
    ),
)


__all__ = [
    "BLOCK_STREAM",
    "CURL_CHOICES",
    "DIAGNOSTIC",
    "CONVENTION",
    "HUTCHINSON_COLUMNS",
    "PROBE_STREAM",
    "SUBJACOBIAN_COLUMNS",
    "block_indices",
    "block_values",
    "curl_hutchinson",
    "curl_subjacobian",
    "hutchinson_estimates",
    "jackknife_summary",
    "subjacobian",
    "t_quantile",
]
