"""Baseline gates: the 'worse by P%' grammar, the bootstrap test's calibration and power, the refusal of
reports that measured different things, and the command on real reports — noise (the same checkpoint,
another seed) passes, an injected non-conservative error fails."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from conservcheck.cli.app import app
from conservcheck.errors import UsageError
from conservcheck.report.audit_report import AuditReport
from conservcheck.report.baseline import check_comparable, compare_metric, ratio_draws
from conservcheck.report.gate import Regression, evaluate, parse

runner = CliRunner()


def cc(*args):
    return runner.invoke(app, [str(a) for a in args])


def _unit(index, values, status="ok", variant="rotation", diagnostic="loop"):
    t = 0.001 * index
    return {
        "field": "model",
        "diagnostic": diagnostic,
        "variant": variant,
        "status": status,
        "message": None if status == "ok" else "NaN/Inf values",
        "meta": {},
        "time": {"key": f"k{index}", "index": index, "t": t, "sigma": math.sqrt(-math.expm1(-2 * t)), "alpha": 1.0},
        "values": values,
    }


def _report(medians, seed=0, n=32, scale=0.5, draw_seed=0, status="ok", options=None, indices=(10, 500)):
    """A report with per-sample |ratio| values lognormal around ``medians`` (one per time index)."""
    gen = np.random.default_rng(draw_seed)
    units = []
    for index, median in zip(indices, medians):
        vals = (median * np.exp(scale * gen.standard_normal(n))).tolist()
        units.append(_unit(index, {"abs_circulation_ratio": vals}, status if index == indices[-1] else "ok"))
    header = {
        "model": {"name": "synthetic", "precision": "fp32"},
        "process": {"name": "ou", "time": "t"},
        "options": {"seed": seed, "n_points": 128, "n_probes": 16, **(options or {})},
        "time_points": [u["time"] for u in units],
        "problems": [],
        "complete": True,
    }
    return AuditReport.from_units(header, units)


# ------------------------------------------------------------------------------------------- grammar


def test_parse_worse_by():
    e = parse("rotation.abs_circulation_ratio worse by 20%")
    assert e.clauses == ((Regression(None, "rotation", "abs_circulation_ratio", 20.0),),)
    e = parse("curl.hutchinson.rel_asym worse by 5.5% at all times or verdict == invalid")
    assert e.clauses[0][0] == Regression("curl", "hutchinson", "rel_asym", 5.5, "all")
    e = parse("loop.*.abs_eq7 worse by 0% at k=500 and loop.rotation.abs_eq7.median > 1")
    assert e.clauses[0][0].at == ("k", 500.0) and e.clauses[0][0].variant == "*" and len(e.clauses[0]) == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("rotation.abs_circulation_ratio.median worse by 20%", "no statistic"),
        ("abs_circulation_ratio worse by 20%", "[DIAGNOSTIC.]VARIANT.COLUMN"),
        ("rotation.abs_circulation_ratio worse 20%", "'by' after 'worse'"),
        ("rotation.abs_circulation_ratio worse by 20", "'%' after the percentage"),
        ("rotation.abs_circulation_ratio worse by -5%", "0 or more"),
        ("loop.rotation.x.median % 3", "a comparison"),
    ],
)
def test_malformed_worse_by(text, message):
    with pytest.raises(UsageError, match="--fail-if") as err:
        parse(text)
    assert message in str(err.value)


def test_worse_by_needs_a_baseline_and_a_known_unambiguous_series():
    new = _report([0.01, 0.01])
    with pytest.raises(UsageError, match="compares the report with a baseline"):
        evaluate(parse("rotation.abs_circulation_ratio worse by 20%"), new)
    with pytest.raises(UsageError, match="the report has no brownian.abs_circulation_ratio"):
        evaluate(parse("brownian.abs_circulation_ratio worse by 20%"), new, new)
    with pytest.raises(UsageError, match="no column abs_eq8"):
        evaluate(parse("rotation.abs_eq8 worse by 20%"), new, new)
    signed = _report([0.01, 0.01])
    signed.rows["abs_circulation_ratio"] *= -1
    with pytest.raises(UsageError, match="negative values"):
        evaluate(parse("rotation.abs_circulation_ratio worse by 20%"), signed, signed)
    with pytest.raises(UsageError, match="no time point k=250"):
        evaluate(parse("rotation.abs_circulation_ratio worse by 20% at k=250"), new, new)


# --------------------------------------------------------------------------------------- statistics


def test_the_bootstrap_lower_bound_is_calibrated_and_powerful():
    """Independent lognormal samples (n = 32, σ_log = 0.5, about the spread of loop ratios in one time
    point): with no change, the one-sided 95% bound exceeds 1 in about 5% of draws (a nominal 5% test; 9%
    allows for the percentile bootstrap's small-sample optimism at n = 32 and the 300 draws' binomial
    noise) and exceeds 1.2 — a 'worse by 20%' failure — in under 1%; a true 2.5× regression is caught in
    more than 98% of draws (measured: 5%, 0% and 99.7%)."""
    gen = np.random.default_rng(0)
    n, reps, sd = 32, 300, 0.5

    def bound(true_ratio: float, key: int) -> float:
        old = np.exp(sd * gen.standard_normal(n))
        new = true_ratio * np.exp(sd * gen.standard_normal(n))
        draws, _ = ratio_draws(new, old, "calibration", key, resamples=2000)
        return float(np.quantile(draws, 0.05))

    null = np.array([bound(1.0, i) for i in range(reps)])
    assert (null > 1.0).mean() < 0.09
    assert (null > 1.2).mean() < 0.01
    worse = np.array([bound(2.5, i) for i in range(reps)])
    assert (worse > 1.2).mean() > 0.98


def test_resamples_are_seeded_and_paired_when_the_sizes_agree():
    a, b = np.linspace(1, 2, 32), np.linspace(1.5, 3, 32)
    d1, paired = ratio_draws(a, b, "x", 1)
    d2, _ = ratio_draws(a, b, "x", 1)
    assert paired and np.array_equal(d1, d2)
    # Paired resampling of identical samples gives ratio 1 in every resample; unpaired does not.
    same, _ = ratio_draws(a, a.copy(), "x", 2)
    assert np.all(same == 1.0)
    _, unpaired = ratio_draws(a, b[:20], "x", 3)
    assert not unpaired


def test_noise_passes_and_a_regression_fails_on_synthetic_reports():
    old = _report([0.01, 0.002], draw_seed=1)
    noise = _report([0.01, 0.002], draw_seed=2)
    worse = _report([0.01, 0.006], draw_seed=3)
    expr = parse("rotation.abs_circulation_ratio worse by 20%")
    assert not evaluate(expr, noise, old).holds
    result = evaluate(expr, worse, old)
    assert result.holds and len(result.details) == 1 and "at k=500" in result.details[0]
    # At k=10 the two are alike: the condition scoped there does not hold, nor does 'at all times'.
    assert not evaluate(parse("rotation.abs_circulation_ratio worse by 20% at k=10"), worse, old).holds
    assert not evaluate(parse("rotation.abs_circulation_ratio worse by 20% at all times"), worse, old).holds
    # A 3× worse median is not 'worse by 400%'.
    assert not evaluate(parse("rotation.abs_circulation_ratio worse by 400%"), worse, old).holds


def test_a_time_point_without_values_fails_closed_and_a_bad_baseline_is_refused():
    old = _report([0.01, 0.002], draw_seed=1)
    broken = _report([0.01, 0.002], draw_seed=2, status="nonfinite")
    result = evaluate(parse("rotation.abs_circulation_ratio worse by 20%"), broken, old)
    assert result.holds and "has no value (nonfinite)" in result.details[0]
    with pytest.raises(UsageError, match=r"the baseline has no loop.rotation.abs_circulation_ratio at k=500"):
        compare_metric(old, broken, "loop", "rotation", "abs_circulation_ratio")


# --------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(seed=1), "the seeds differ (1 here, 0 in the baseline)"),
        (dict(options={"n_points": 256}), "the loops differ (n_points 256 here, 128 in the baseline)"),
        (dict(options={"n_probes": 8}), "the probe settings differ (n_probes 8 here, 16 in the baseline)"),
        (dict(indices=(10, 250)), "the time points differ (k=10, k=250 here; k=10, k=500 in the baseline)"),
    ],
)
def test_reports_that_measured_different_things_are_refused(change, message):
    old = _report([0.01, 0.002])
    new = _report([0.01, 0.002], **change)
    with pytest.raises(UsageError) as err:
        check_comparable(new, old)
    assert message in str(err.value)
    with pytest.raises(UsageError):
        evaluate(parse("rotation.abs_circulation_ratio worse by 20%"), new, old)


def test_another_seed_on_request():
    old, new = _report([0.01, 0.002]), _report([0.01, 0.002], seed=1, draw_seed=5)
    check_comparable(new, old, allow_seed_change=True)
    assert not evaluate(parse("rotation.abs_circulation_ratio worse by 20%"), new, old, allow_seed_change=True).holds


# -------------------------------------------------------------------------------- real reports, CLI


def test_same_checkpoint_other_seed_passes(funnel_reports):
    """Noise: two audits of the embedded funnel with seeds 0 and 1 (independent x0, loops and noise)."""
    r = cc(
        "gate",
        funnel_reports["seed1"],
        "--baseline",
        funnel_reports["seed0"],
        "--allow-seed-change",
        "--fail-if",
        "rotation.abs_circulation_ratio worse by 20%",
    )
    assert r.exit_code == 0, r.output
    assert "gate ok: rotation.abs_circulation_ratio worse by 20%" in r.stdout
    assert "loop.rotation.abs_circulation_ratio: median against the baseline's" in r.stdout


def test_same_checkpoint_other_seed_is_refused_without_the_flag(funnel_reports):
    r = cc(
        "gate",
        funnel_reports["seed1"],
        "--baseline",
        funnel_reports["seed0"],
        "--fail-if",
        "rotation.abs_circulation_ratio worse by 20%",
    )
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot compare with the baseline: the seeds differ")
    assert "--allow-seed-change" in lines[0]


def test_injected_non_conservative_error_fails(funnel_reports, tmp_path):
    junit = tmp_path / "gate.xml"
    r = cc(
        "gate",
        funnel_reports["injected"],
        "--baseline",
        funnel_reports["seed0"],
        "--fail-if",
        "rotation.abs_circulation_ratio worse by 20%",
        "--junit",
        junit,
    )
    assert r.exit_code == 1, r.output
    assert "gate FAIL: rotation.abs_circulation_ratio worse by 20%" in r.stdout
    assert "vs baseline" in r.stdout and "% confidence) > 1.2" in r.stdout
    assert "<failure" in junit.read_text()


def test_absolute_and_relative_conditions_combine_and_audit_takes_a_baseline(funnel_reports, tmp_path):
    data = json.loads(funnel_reports["seed0"].read_text())
    r = cc(
        "gate",
        funnel_reports["seed0"],
        "--baseline",
        funnel_reports["seed0"],
        "--fail-if",
        "rotation.abs_circulation_ratio worse by 0% or verdict == invalid",
    )
    assert r.exit_code == 0 and data["verdict"]["status"] != "invalid", r.output
    r = cc("gate", funnel_reports["seed0"], "--fail-if", "rotation.abs_circulation_ratio worse by 20%")
    assert r.exit_code == 2 and "add --baseline OLD.json" in r.stderr
    other = copy.deepcopy(data)
    other["options"]["n_points"] = 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    r = cc("report", funnel_reports["seed0"], "--baseline", tmp_path / "other.json")
    assert r.exit_code == 2 and "the loops differ (n_points 32 here, 64 in the baseline)" in r.stderr
