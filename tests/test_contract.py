"""The probe contract check flags each kind of broken model with its own message."""

import torch

from conservcheck import OUProcess, VectorFieldProbe
from conservcheck.analytic.fields import GaussianMixture, as_probe
from conservcheck.contract import check_probe


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


def test_model_ignoring_time():
    rep = check_probe(_probe(lambda x, t: -x))
    assert rep.problems == [
        "model output does not change with its time input "
        "(check that the time convention feeds the model the time it was trained with)"
    ]
