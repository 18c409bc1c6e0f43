"""Known-answer self-test: every diagnostic on fields whose answer is exact, on a chosen device and dtype.

Each check runs a diagnostic exactly as an audit does (same loops, quadrature, Jacobian strategies and
batching) on an analytic field, and compares the result with what the maths predicts:

* exactly conservative fields (Gaussian-mixture scores under the OU process, the gradient of a quadratic
  potential) must give loop integrals and curl at the floating-point floor of the dtype;
* a linear field s = (S + K) x gives the closed-form rotation-loop integral 2π bᵀKa (loop
  c + a cos θ + b sin θ, Eq. 4), the curl block 2K on the sampled indices (Eq. 5), and a relative
  asymmetry ‖K‖_F/‖S + K‖_F that the Hutchinson interval must cover;
* the Stein operator of e = K s_ref (K antisymmetric) vanishes pointwise (Eq. 21), however large e is.

Running it on a new machine (``conservcheck selftest --device cuda``) checks that the kernels of that
device and torch build give the numbers the test suite asserts on the CPU. Bounds per dtype are the
floors justified in the test suite: rounding of O(1) products accumulated over a loop or a Jacobian.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from conservcheck.analytic.fields import GaussianMixture, LinearField, as_probe
from conservcheck.analytic.reference_scores import FieldReference
from conservcheck.batching import Batcher
from conservcheck.diagnostics.curl import block_indices, curl_hutchinson, curl_subjacobian
from conservcheck.diagnostics.loop_integral import loop_diagnostic
from conservcheck.diagnostics.stein import stein_diagnostic
from conservcheck.geometry.loops import rectangle
from conservcheck.geometry.loops.rotation import RotationLoop
from conservcheck.probe import VectorFieldProbe
from conservcheck.process import OUProcess
from conservcheck.timepoints import TimePoint

#: Floor of a scale-free ratio for an exactly conservative field: float64 rounding accumulated over
#: ~10³–10⁴ products (≈ 1e-14, ×10 margin); float32 ≈ 16 ulps of 2^-24.
FLOOR = {torch.float64: 1e-13, torch.float32: 1e-6}
#: Curl floors with automatic differentiation (J_ij and J_ji along different operation orders).
CURL_FLOOR = {torch.float64: 1e-14, torch.float32: 1e-5}
#: Curl floors with central finite differences (truncation + rounding ≈ ε^(2/3), ×20 margin).
CURL_FLOOR_FD = {torch.float64: 1e-9, torch.float32: 1e-3}
D = 12


@dataclass(frozen=True)
class Check:
    """One known-answer check: ``value`` (an error or a coverage) compared with ``bound``."""

    name: str
    dtype: str
    value: float
    bound: float
    larger_is_better: bool = False

    @property
    def ok(self) -> bool:
        good = self.value >= self.bound if self.larger_is_better else self.value <= self.bound
        return bool(good and math.isfinite(self.value))


def _fields() -> tuple[GaussianMixture, LinearField, LinearField]:
    g = torch.Generator().manual_seed(0)
    mixture = GaussianMixture(torch.randn(3, D, generator=g) * 0.7, torch.rand(3, generator=g) * 0.3 + 0.2)
    m, n = torch.randn(D, D, generator=g, dtype=torch.float64), torch.randn(D, D, generator=g, dtype=torch.float64)
    sym, anti = (m + m.T) / 2, 0.3 * (n - n.T) / 2
    return mixture, LinearField(sym, torch.zeros_like(sym)), LinearField(sym, anti)


def _checks_for(dtype: torch.dtype, device: torch.device) -> list[Check]:
    ou = OUProcess()
    time = TimePoint.from_t(ou, 0.4)
    mixture, quadratic, linear = _fields()
    x0 = torch.randn(16, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.8
    batcher = Batcher(4096)
    label = str(dtype).removeprefix("torch.")
    out: list[Check] = []

    def probe(field: Callable[[Tensor, Tensor], Tensor]) -> VectorFieldProbe:
        return as_probe(field, (D,), ou, dtype=dtype, device=device)

    def loops(field: Callable[[Tensor, Tensor], Tensor], path: str, n_points: int) -> dict[str, Tensor]:
        return loop_diagnostic(probe(field), x0, time, seed=3, batcher=batcher, path=path, n_points=n_points).values

    for path, field, n_points in (
        ("rotation", mixture, 256),
        ("projection", mixture, 1024),
        ("brownian", quadratic, 256),
        ("rectangle", mixture, 64),
    ):
        ratio = float(loops(field, path, n_points)["circulation_ratio"].abs().max())
        out.append(Check(f"loop.{path}: |∮s·dy|/∮|s||dy| of a conservative field", label, ratio, FLOOR[dtype]))

    rot = loops(linear, "rotation", 16)
    loop = RotationLoop.from_samples(x0, time, 3)
    exact = 2 * math.pi * torch.einsum("bi,ij,bj->b", loop.b, linear.K, loop.a)
    err = float(((rot["circulation"] - exact).abs() / rot["abs_score_length"]).max())
    out.append(Check("loop.rotation: linear field vs 2π bᵀKa", label, err, FLOOR[dtype]))

    rect = loops(linear, "rectangle", 16)
    ij = rectangle.planes(D, 3, time.key, list(range(len(x0))))
    exact = time.sigma**2 * (linear.A[ij[:, 1], ij[:, 0]] - linear.A[ij[:, 0], ij[:, 1]])
    err = float(((rect["circulation"] - exact).abs() / rect["abs_score_length"]).max())
    out.append(Check("loop.rectangle: linear field vs h²(A_ji − A_ij)", label, err, FLOOR[dtype]))

    for strategy in ("jvp", "double_vjp", "fd"):
        floor = (CURL_FLOOR_FD if strategy == "fd" else CURL_FLOOR)[dtype]
        sub = curl_subjacobian(probe(mixture), x0, time, seed=3, batcher=batcher, block=8, strategy=strategy)
        out.append(
            Check(
                f"curl.subjacobian ({strategy}): conservative field",
                label,
                float(sub.values["curl_rel_fro"].max()),
                floor,
            )
        )
        hut = curl_hutchinson(probe(mixture), x0, time, seed=3, batcher=batcher, n_probes=8, strategy=strategy)
        out.append(
            Check(
                f"curl.hutchinson ({strategy}): conservative field",
                label,
                float(hut.values["rel_asym_ci_high"].max()),
                floor,
            )
        )

    sub = curl_subjacobian(probe(linear), x0, time, seed=3, batcher=batcher, block=6, strategy="jvp")
    sets = block_indices(D, 6, 3, time.key, list(range(len(x0))))
    two_k = torch.stack([(2 * linear.K)[s][:, s] for s in sets])
    two_s = torch.stack([(2 * linear.S)[s][:, s] for s in sets])
    want = two_k.flatten(1).norm(dim=1) / two_s.flatten(1).norm(dim=1)
    err = float(((sub.values["curl_rel_fro"] - want).abs() / want).max())
    out.append(Check("curl.subjacobian: linear field, ‖2K_SS‖/‖2S_SS‖", label, err, CURL_FLOOR[dtype] * 10))

    many = torch.randn(200, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    hut = curl_hutchinson(probe(linear), many, time, seed=5, batcher=batcher, n_probes=16, strategy="jvp")
    rel = float(linear.K.norm() / linear.A.norm())
    covered = float(((hut.values["rel_asym_ci_low"] <= rel) & (rel <= hut.values["rel_asym_ci_high"])).double().mean())
    # Nominal 95% jackknife-t intervals; 0.88 is ≈ 3.5 binomial sd below the coverage measured in tests.
    out.append(Check("curl.hutchinson: 95% CI covers ‖K‖/‖A‖ (fraction)", label, covered, 0.88, True))

    ref = FieldReference(mixture)
    k = linear.K.to(device=device, dtype=dtype)
    rotated = probe(lambda x, t: ref.score(x, t) - ref.score(x, t) @ k.T)
    st = stein_diagnostic(rotated, x0, time, seed=3, batcher=batcher, reference=ref).values
    size = float(st["err_norm"].pow(2).mean())
    out.append(
        Check(
            "stein: 𝒮(K s_ref) = 0 pointwise (relative to ‖e‖²)",
            label,
            float(st["stein"].abs().max()) / size,
            FLOOR[dtype] * 10,
        )
    )
    out.append(
        Check("stein: ‖e‖ of K s_ref is not small (mean ‖e‖/‖s‖)", label, float(st["rel_err_norm"].mean()), 0.1, True)
    )
    return out


def selftest(
    device: torch.device | str = "cpu", dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32)
) -> list[Check]:
    """Run every known-answer check on ``device`` for each dtype; see the module docstring."""
    dev = torch.device(device)
    return [c for dtype in dtypes for c in _checks_for(dtype, dev)]


__all__ = ["Check", "selftest"]
