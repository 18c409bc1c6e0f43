"""A contract check run once on a new probe, before any diagnostic spends model evaluations.

It catches models whose numbers would be meaningless: outputs of the wrong shape, non-finite values,
non-determinism (dropout left on), batch dependence (BatchNorm in training mode). Each problem is a
one-line message naming what was expected, what was seen and what to try.

A time input that does not change the model's own output is a *warning*, not a problem: networks without
noise conditioning are a deliberate design (and a time-independent field is still a vector field whose
conservativeness the diagnostics measure), and the exact score of the OU process's stationary N(0, I),
s(x) = −x, does not depend on time at all — that one case is recognised and passes without a remark. The
check looks at the raw output (ε, x0, v, …) rather than the score: an ε-network that ignores its time
input still gives a time-dependent score through the conversion's σ(t).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from conservcheck import rng
from conservcheck.errors import ProbeContractError
from conservcheck.probe import VectorFieldProbe

#: Rows of the check's batch.
CHECK_BATCH = 4
#: Model evaluations of :func:`check_probe`: per row, three noise levels, a repeat, one by one, a swapped time.
CHECK_EVALS = 6 * CHECK_BATCH


@dataclass
class ContractReport:
    """Outcome of :func:`check_probe`: ``problems`` lists one-line messages; empty means it passed."""

    problems: list[str] = field(default_factory=list)
    nonfinite_times: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _times(probe: VectorFieldProbe) -> torch.Tensor:
    sig = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    if probe.process.name == "ve":
        sig = torch.tensor([0.05, 1.0, 20.0], dtype=torch.float64)
    return probe.process.t_from_sigma(sig)


TIME_IGNORED = (
    "model output does not change with its time input: a network without noise conditioning, or a time "
    "convention that does not reach the model (check that the time convention feeds the model the time it was "
    "trained with)"
)


def check_probe(probe: VectorFieldProbe, batch: int = CHECK_BATCH, seed: int = 0) -> ContractReport:
    """Run the probe on a few seeded inputs and report contract violations (never raises for them).

    Inputs are x = α x0 + σ ε with x0 at the centre of the data range, at three noise levels from
    nearly clean to noisy. A :class:`ProbeContractError` raised by the probe itself (wrong output
    shape) is reported as a problem.
    """
    report = ContractReport()
    lo, hi = probe.data_range
    x0 = torch.full((batch, *probe.sample_shape), 0.5 * (lo + hi), dtype=probe.dtype, device=probe.device)
    eps = rng.normal((batch, *probe.sample_shape), seed, "contract", dtype=probe.dtype, device=probe.device)
    outs = []
    with torch.no_grad():
        for t in _times(probe):
            x = float(probe.process.alpha(t)) * x0 + float(probe.process.sigma(t)) * eps
            try:
                s = probe.score(x, t)
            except ProbeContractError as err:
                report.problems.append(str(err))
                return report
            except Exception as err:  # the model's own code failed: report it, the audit goes on
                report.problems.append(_raised(err, float(t)))
                return report
            if not bool(torch.isfinite(s).all()):
                report.nonfinite_times.append(float(t))
            outs.append((x, t, s))
        if report.nonfinite_times:
            report.problems.append(
                "model output has NaN/Inf at t = "
                + ", ".join(f"{v:.4g}" for v in report.nonfinite_times)
                + " (check the weights and the precision; try --precision fp32)"
            )
        try:
            _repeat_checks(probe, outs, report)
        except ProbeContractError as err:
            report.problems.append(str(err))
        except Exception as err:
            report.problems.append(_raised(err, None))
    return report


def _raised(err: Exception, t: float | None) -> str:
    where = f" at t = {t:.4g}" if t is not None else " during the determinism, batch and time-input checks"
    first = (str(err).splitlines() or [""])[0]
    return f"model raised {type(err).__name__}{where}: {first} (run the model on its own at that time to debug it)"


def _repeat_checks(
    probe: VectorFieldProbe, outs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], report: ContractReport
) -> None:
    """Determinism, batch independence and use of the time input, from the first pass's outputs."""
    with torch.no_grad():
        x, t, s = outs[1]
        again = probe.score(x, t)
        tol = 1e-4 if probe.dtype == torch.float32 else 1e-10
        scale = float(s.abs().max().nan_to_num(0)) + 1e-30
        if not torch.allclose(again, s, rtol=0, atol=tol * scale, equal_nan=True):
            report.problems.append(
                "model output is not deterministic: two identical calls differ "
                "(put the model in eval() mode; dropout or sampling inside the forward pass breaks every diagnostic)"
            )
        single = torch.cat([probe.score(x[i : i + 1], t) for i in range(x.shape[0])])
        if not torch.allclose(single, s, rtol=0, atol=tol * scale, equal_nan=True):
            report.problems.append(
                "model output for a sample depends on the rest of its batch (BatchNorm in training mode? call eval())"
            )
        first, last = outs[0], outs[-1]
        raw = probe.output(first[0], first[1])
        same_x = probe.output(first[0], last[1])
        if torch.allclose(same_x, raw, rtol=1e-6, atol=0, equal_nan=True) and not _stationary_score(
            probe, first[0], first[2], tol
        ):
            report.warnings.append(TIME_IGNORED)


def _stationary_score(probe: VectorFieldProbe, x: torch.Tensor, s: torch.Tensor, tol: float) -> bool:
    """Whether s is the OU process's stationary score −x, the one exact score that does not depend on time."""
    if probe.parameterization != "score" or probe.process.name != "ou":
        return False
    scale = float(x.abs().max().nan_to_num(0)) + 1e-30
    return bool(torch.allclose(s, -x, rtol=0, atol=tol * scale))
