"""Exact conversions from a network's output to score units ∇ₓ log p_t(x).

With x = α x0 + σ ε (α, σ at the canonical time of the sample):

=============  ==============================  =============================================
name           network predicts                score s
=============  ==============================  =============================================
``score``      ∇ₓ log p_t(x)                   s = out
``epsilon``    ε̂                               s = −ε̂ / σ
``x0``         x̂0 (alias ``sample``, ``denoised``)  s = (α x̂0 − x) / σ²
``v``          v̂ = α ε − σ x0 (Salimans & Ho)  ε̂ = (α v̂ + σ x)/(α² + σ²), s = −ε̂ / σ
``velocity``   dx/dt = α' x0 + σ' ε            ε̂ = (α v̂ − α' x)/(α σ' − σ α'), s = −ε̂ / σ
=============  ==============================  =============================================

For the OU/VP process α² + σ² = 1 and the ``v`` row reduces to s = −x − (α/σ) v̂; for rectified flow
(α = 1 − t, σ = t) the ``velocity`` row reduces to ε̂ = x + (1 − t) v̂. ``docs/units.md`` derives each row.
"""

from __future__ import annotations

from torch import Tensor

from conservcheck.errors import UsageError

ALIASES = {
    "score": "score",
    "epsilon": "epsilon",
    "eps": "epsilon",
    "x0": "x0",
    "sample": "x0",
    "denoised": "x0",
    "v": "v",
    "v_prediction": "v",
    "velocity": "velocity",
    "flow": "velocity",
}


#: Each conversion as a formula in the process's α and σ ({alpha}, {sigma}); (parameterization, process)
#: entries hold the reduced forms of the module doc (OU/VP: α² + σ² = 1; rectified flow: α = 1 − t, σ = t).
CONVERSIONS: dict[str | tuple[str, str], str] = {
    "score": "s = out",
    "epsilon": "s = -eps_hat / {sigma}",
    "x0": "s = ({alpha} x0_hat - x) / {sigma}^2",
    "v": "eps_hat = ({alpha} v_hat + {sigma} x) / ({alpha}^2 + {sigma}^2), s = -eps_hat / {sigma}",
    "velocity": (
        "eps_hat = ({alpha} v_hat - {alpha}' x) / ({alpha} {sigma}' - {sigma} {alpha}'), s = -eps_hat / {sigma}"
    ),
    ("v", "ou"): "s = -x - ({alpha} / {sigma}) v_hat",
    ("velocity", "flow"): "eps_hat = x + (1 - t) v_hat, s = -eps_hat / t",
}


def conversion(parameterization: str, process: str | None = None, alpha: str = "alpha", sigma: str = "sigma") -> str:
    """The conversion :func:`to_score` applies, as a formula for reports (``alpha`` and ``sigma`` name α and σ
    the way the model's family writes them, e.g. ``sqrt(alpha_bar_k)``)."""
    kind = canonical_name(parameterization)
    formula = CONVERSIONS.get((kind, process or ""), CONVERSIONS[kind])
    if alpha == "1":
        formula = formula.replace("{alpha} ", "")
    return formula.format(alpha=alpha, sigma=sigma)


def canonical_name(parameterization: str) -> str:
    """Normalise a parameterization name (``sample`` → ``x0``, ``v_prediction`` → ``v``, ...)."""
    try:
        return ALIASES[parameterization.lower()]
    except KeyError:
        raise UsageError(
            f"unknown parameterization {parameterization!r}",
            "use one of score, epsilon, x0, v, velocity",
        ) from None


def to_score(
    parameterization: str,
    out: Tensor,
    x: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    dalpha: Tensor | None = None,
    dsigma: Tensor | None = None,
) -> Tensor:
    """Convert a network output to score units.

    Args:
        parameterization: one of the names in the module table.
        out, x: network output and input, shape [B, ...].
        alpha, sigma: α(t), σ(t) broadcastable to x (e.g. [B, 1, 1, 1]).
        dalpha, dsigma: dα/dt and dσ/dt, needed only for ``velocity``.
    Returns:
        s(x, t), shape [B, ...], same dtype as ``out``.
    """
    kind = canonical_name(parameterization)
    if kind == "score":
        return out
    if kind == "epsilon":
        return -out / sigma
    if kind == "x0":
        return (alpha * out - x) / sigma**2
    if kind == "v":
        eps = (alpha * out + sigma * x) / (alpha**2 + sigma**2)
        return -eps / sigma
    if dalpha is None or dsigma is None:
        raise UsageError("the velocity parameterization needs dα/dt and dσ/dt", "pass dalpha and dsigma")
    eps = (alpha * out - dalpha * x) / (alpha * dsigma - sigma * dalpha)
    return -eps / sigma
