"""The probe contract check flags each kind of broken model with its own message."""

import torch

from conservcheck import OUProcess, VectorFieldProbe
from conservcheck.analytic.fields import GaussianMixture, as_probe
from conservcheck.contract import TIME_IGNORED, check_probe
from conservcheck.process import FlowProcess, VEProcess


def _probe(fn, **kw):
    return VectorFieldProbe(fn, process=OUProcess(), sample_shape=(2, 3), dtype=torch.float64, **kw)


def test_exact_score_passes():
    mix = GaussianMixture(torch.randn(2, 6, generator=torch.Generator().manual_seed(0)), 0.5, sample_shape=(2, 3))
    assert check_probe(as_probe(mix, (2, 3))).ok


def test_nan_outputs_are_reported():
    rep = check_probe(_probe(lambda x, t: torch.where(t[:, None, None] < 0.1, x, torch.nan * x)))
    assert not rep.ok and "NaN/Inf" in rep.problems[0] and len(rep.nonfinite_times) == 2


def test_wrong_shape_is_reported():
    rep = check_probe(_probe(lambda x, t: x[:, :1]))
    assert rep.problems == [
        "model output has shape (4, 1, 3), expected (4, 2, 3) (the wrapped callable must return one "
        "vector per input sample)"
    ]


def test_nondeterministic_model():
    drop = torch.nn.Dropout(0.5).train()
    rep = check_probe(_probe(lambda x, t: drop(x) * t[:, None, None]))
    assert any("not deterministic" in p for p in rep.problems)


def test_batch_dependent_model():
    rep = check_probe(_probe(lambda x, t: (x - x.mean(0, keepdim=True)) * t[:, None, None]))
    assert any("depends on the rest of its batch" in p for p in rep.problems)


def test_exact_stationary_score_is_not_a_problem():
    """The exact score of the OU process's stationary N(0, I) is s(x) = −x at every time: a score that does
    not depend on time and is exact. The contract must not call it broken, nor warn about it."""
    rep = check_probe(_probe(lambda x, t: -x))
    assert rep.ok and rep.warnings == []


def test_time_ignored_is_a_warning_not_a_problem():
    """A score network that ignores time but is not −x: possible by design (no noise conditioning), a
    mis-wired time input otherwise; the diagnostics still measure its field, so it is a warning."""
    rep = check_probe(_probe(lambda x, t: -2 * x))
    assert rep.ok and rep.warnings == [TIME_IGNORED]


def test_epsilon_network_ignoring_time_gets_a_warning():
    """Its score −ε̂(x)/σ(t) changes with t through σ, so a check on the score would miss it: the check
    looks at the network's own output."""
    probe = VectorFieldProbe(
        lambda x, t: 0.5 * x, process=OUProcess(), sample_shape=(2, 3), parameterization="epsilon", dtype=torch.float64
    )
    rep = check_probe(probe)
    assert rep.ok and rep.warnings == [TIME_IGNORED]
    x = torch.ones(1, 2, 3, dtype=torch.float64)
    assert not torch.allclose(probe.score(x, 0.1), probe.score(x, 1.0))  # its score does change with t


def test_stationary_score_under_other_processes_gets_the_warning():
    """Under VE or flow matching no distribution has a time-independent score: −x is not exact there."""
    for process in (VEProcess(), FlowProcess()):
        probe = VectorFieldProbe(lambda x, t: -x, process=process, sample_shape=(2, 3), dtype=torch.float64)
        assert check_probe(probe).warnings == [TIME_IGNORED]


def test_time_dependent_model_gets_no_warning():
    rep = check_probe(_probe(lambda x, t: -x * (1 + t[:, None, None])))
    assert rep.ok and rep.warnings == []


def test_zero_field_passes_the_contract():
    rep = check_probe(_probe(lambda x, t: torch.zeros_like(x)))
    assert rep.ok and rep.nonfinite_times == [] and rep.warnings == [TIME_IGNORED]


def test_model_calling_sys_exit_is_a_problem_not_an_exit():
    def fn(x, t):
        raise SystemExit(0)

    rep = check_probe(_probe(fn))
    assert rep.problems == [
        "the model called sys.exit(0) in its forward pass "
        "(a model must return its output; remove the exit from its code)"
    ]
