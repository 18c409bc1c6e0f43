"""AuditReport: summary statistics, the verdict rule, JSON round trip against the schema, CSV, compare, plots."""

from __future__ import annotations

import json
import math

import jsonschema
import numpy as np
import pytest
import torch

import conservcheck
from conservcheck.analytic.fields import GaussianMixture, as_probe
from conservcheck.errors import UsageError
from conservcheck.precision import floor_rel
from conservcheck.report import FLOOR_FACTOR, SCHEMA_VERSION, AuditReport, compare
from conservcheck.report.summary import BOOTSTRAP_RESAMPLES, summarize, time_label
from conservcheck.runner.audit import audit

SCHEMA = conservcheck.report_schema()


def _unit(values, field="model", diagnostic="loop", variant="rotation", key="t0.5", status="ok", t=0.5):
    return {
        "field": field,
        "diagnostic": diagnostic,
        "variant": variant,
        "status": status,
        "message": None if status == "ok" else "NaN/Inf values",
        "meta": {"n_evals": 1},
        "time": {"key": key, "index": None, "t": t, "sigma": math.sqrt(1 - math.exp(-2 * t)), "alpha": math.exp(-t)},
        "values": values,
    }


def _header(precision="fp32", seed=0):
    return {
        "model": {"name": "synthetic", "precision": precision},
        "process": {"name": "ou", "time": "t"},
        "options": {"seed": seed},
        "time_points": [],
        "problems": [],
        "complete": True,
    }


def test_summary_statistics_known_answers():
    vals = [float(v) for v in range(1, 10)]  # 1 … 9
    s = summarize([_unit({"abs_circulation_ratio": vals})], seed=0).iloc[0]
    # numpy's linear quantiles of 1…9: q25 = 3, median = 5, q75 = 7; mean 5.
    assert (s["n"], s["median"], s["q25"], s["q75"], s["mean"]) == (9, 5.0, 3.0, 7.0, 5.0)
    # Percentile bootstrap of the mean: inside the sample range and around the mean. With sd = 2.74 and
    # n = 9 the standard error is 0.91, so the 95% interval spans ≈ ±1.8 (±25% for 1000 resamples).
    assert 1.0 < s["ci_low"] < 5.0 < s["ci_high"] < 9.0
    assert 2 * 1.96 * 0.913 * 0.75 < s["ci_high"] - s["ci_low"] < 2 * 1.96 * 0.913 * 1.25


def test_bootstrap_is_seeded_and_exact_for_constants():
    rng = np.random.default_rng(1)
    vals = rng.normal(size=256).tolist()
    a = summarize([_unit({"m": vals})], seed=3).iloc[0]
    b = summarize([_unit({"m": vals})], seed=3).iloc[0]
    c = summarize([_unit({"m": vals})], seed=4).iloc[0]
    assert (a["ci_low"], a["ci_high"]) == (b["ci_low"], b["ci_high"])
    assert (a["ci_low"], a["ci_high"]) != (c["ci_low"], c["ci_high"])
    # Width ≈ 2·1.96·sd/√n; the percentile interval from 1000 resamples is within ~10% of it.
    width = 2 * 1.96 * np.std(vals) / math.sqrt(256)
    assert abs((a["ci_high"] - a["ci_low"]) / width - 1) < 0.1
    const = summarize([_unit({"m": [0.25] * 7})], seed=0).iloc[0]
    assert (const["ci_low"], const["ci_high"], const["median"]) == (0.25, 0.25, 0.25)
    assert BOOTSTRAP_RESAMPLES == 1000


def test_unfinished_units_have_no_statistics():
    units = [_unit({"m": [1.0, 2.0]}), _unit({"m": [1.0, float("nan")]}, key="t1", t=1.0, status="nonfinite")]
    s = summarize(units, seed=0)
    bad = s[s["time_key"] == "t1"].iloc[0]
    assert bad["status"] == "nonfinite" and all(
        bad[c] is None or np.isnan(bad[c]) for c in ("median", "mean", "ci_low")
    )


@pytest.mark.parametrize(
    "model, control, expected",
    [
        (100, 1, "violation"),  # 100× the floor (control at the precision floor)
        (5, 1, "pass"),  # 5× the floor
        (5, 0.1, "pass"),  # control below the precision floor: the floor is the precision floor
        (20, 0.1, "violation"),  # 20× the precision floor
        (50, 10, "pass"),  # a noisy control raises the floor: 5×
    ],
)
def test_verdict_rule(model, control, expected):
    p = floor_rel("fp32")  # values in units of the fp32 precision floor
    units = [
        _unit({"abs_circulation_ratio": [model * p] * 3}),
        _unit({"abs_circulation_ratio": [control * p] * 3}, field="control"),
    ]
    rep = AuditReport.from_units(_header("fp32"), units)
    assert rep.verdict.status == expected
    check = rep.verdict.checks[0]
    assert check["floor"] == pytest.approx(max(control, 1) * p)
    assert check["ratio"] == pytest.approx(model / max(control, 1))
    assert FLOOR_FACTOR == 10.0


def test_quadrature_error_raises_the_floor_and_a_pass_over_it_is_not_resolved():
    """|ratio| median 1e-3 with a relative quadrature error of 2e-4 (quad_error / ∮|s||dy|): 5× its own
    discretisation floor. That is no evidence of a score: at this node count a violation below 2e-3 could
    not be seen, so the check is not resolved (and with no resolved check the verdict cannot pass). Ten
    times larger, the same floor is a resolved violation; below a control floor, a resolved pass."""
    p = floor_rel("fp64")

    def check(median, quad, control=None):
        units = [
            _unit({"abs_circulation_ratio": [median] * 3, "quad_error": [quad] * 3, "abs_score_length": [1.0] * 3})
        ]
        if control is not None:
            units.append(_unit({"abs_circulation_ratio": [control] * 3}, field="control"))
        rep = AuditReport.from_units(_header("fp64"), units)
        return rep.verdict, rep.verdict.checks[0]

    verdict, c = check(1e-3, 2e-4)
    assert c["status"] == "unresolved" and c["quadrature"] == pytest.approx(2e-4) and c["floor"] == pytest.approx(2e-4)
    assert verdict.status == "invalid"
    assert verdict.reason == (
        "no check is resolved: 1 not resolved at this node count (loop.rotation at t=0.5: their floor is the "
        "discretisation error; raise --points)"
    )
    verdict, c = check(1e-2, 2e-4)
    assert c["status"] == "violation" and verdict.status == "violation"
    verdict, c = check(1e-3, 2e-4, control=5e-4)  # the control's own value sets the floor: resolved
    assert c["status"] == "pass" and verdict.status == "pass"
    verdict, c = check(1e-3, p / 2)  # discretisation below the precision floor: resolved
    assert c["status"] == "violation"


def test_a_pass_beside_unresolved_checks_names_them():
    units = [
        _unit({"abs_circulation_ratio": [1e-13] * 3, "quad_error": [0.0] * 3, "abs_score_length": [1.0] * 3}),
        _unit(
            {"abs_circulation_ratio": [1e-3] * 3, "quad_error": [2e-4] * 3, "abs_score_length": [1.0] * 3},
            variant="brownian",
        ),
    ]
    rep = AuditReport.from_units(_header("fp64"), units)
    assert [c["status"] for c in rep.verdict.checks] == ["pass", "unresolved"]
    assert rep.verdict.status == "pass"
    assert rep.verdict.reason == (
        "all 1 resolved checks within 10× the numerical floor (largest 0.1× for loop.rotation "
        "abs_circulation_ratio at t=0.5); 1 not resolved at this node count (loop.brownian at t=0.5: their "
        "floor is the discretisation error; raise --points)"
    )


def test_nonfinite_unit_makes_the_verdict_invalid():
    units = [_unit({"abs_circulation_ratio": [1.0, float("nan")]}, status="nonfinite")]
    rep = AuditReport.from_units(_header(), units)
    assert rep.verdict.status == "invalid"
    assert "loop.rotation (model) at t=0.5: NaN/Inf values" in rep.verdict.reason
    assert "\n" not in rep.verdict.reason


@pytest.fixture(scope="module")
def mixture_report(tmp_path_factory):
    gm = GaussianMixture(torch.tensor([[0.5, 0.0, -0.5], [-0.5, 0.3, 0.2]]), 0.3)
    x0 = gm.sample(6, torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("data") / "x0.npy"
    np.save(path, x0.numpy())
    return audit(
        as_probe(gm, (3,)),
        paths="rotation,projection",
        curl="none",
        n_samples=6,
        n_points=32,
        times=[0.1, 1.0],
        data=str(path),
        cache_dir=str(tmp_path_factory.mktemp("cache")),
    )


def test_json_round_trip_matches_the_schema(mixture_report, tmp_path):
    path = tmp_path / "report.json"
    text = mixture_report.to_json(path)
    data = json.loads(text)
    jsonschema.validate(data, SCHEMA)
    assert data["schema_version"] == SCHEMA_VERSION and data["data_source"]["kind"] == "array"
    back = AuditReport.from_json(path)
    assert back.to_dict() == data
    assert back.to_json(tmp_path / "again.json") == text  # byte for byte
    assert back.verdict.status == mixture_report.verdict.status == "pass"
    assert list(back.rows.columns) == list(mixture_report.rows.columns)
    assert np.allclose(back.rows["circulation"], mixture_report.rows["circulation"], rtol=0, atol=0)


def test_rows_go_to_a_side_file_when_asked(mixture_report, tmp_path):
    path = tmp_path / "big.json"
    data = json.loads(mixture_report.to_json(path, inline_rows=False))
    jsonschema.validate(data, SCHEMA)
    assert data["rows"]["file"] == "big.rows.csv" and data["rows"]["n_rows"] == len(mixture_report.rows)
    back = AuditReport.from_json(path)
    # The side file keeps every float64 bit (pandas writes the shortest round-trip repr).
    assert np.array_equal(back.rows["circulation"].to_numpy(), mixture_report.rows["circulation"].to_numpy())
    (tmp_path / "big.rows.csv").unlink()
    with pytest.raises(UsageError, match="rows file"):
        AuditReport.from_json(path)


def test_nan_is_written_as_null_and_versions_are_checked(tmp_path):
    units = [_unit({"abs_circulation_ratio": [1.0, float("nan")]}, status="nonfinite")]
    header = {**_header(), "time_points": [{"key": "t0.5", "index": None, "t": 0.5, "sigma": 0.795, "alpha": 0.607}]}
    rep = AuditReport.from_units(header, units)
    data = rep.to_dict()
    assert [row[-1] for row in data["rows"]["data"]] == [1.0, None]
    json.dumps(data, allow_nan=False)
    bad = tmp_path / "old.json"
    bad.write_text(json.dumps({**data, "schema_version": "0.3"}))
    with pytest.raises(UsageError, match="schema version 0.3"):
        AuditReport.from_json(bad)
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(UsageError, match="not a JSON report"):
        AuditReport.from_json(tmp_path / "x.json")


def test_csv_tables(mixture_report, tmp_path):
    import pandas as pd

    mixture_report.to_csv(tmp_path / "s.csv")
    mixture_report.to_csv(tmp_path / "r.csv", table="rows")
    s, r = pd.read_csv(tmp_path / "s.csv"), pd.read_csv(tmp_path / "r.csv")
    assert set(s["field"]) == {"model", "control"} and "ci_high" in s.columns
    assert len(r) == len(mixture_report.rows)


def test_compare_headline_metrics(mixture_report):
    frame = compare(mixture_report, mixture_report)
    assert set(frame["metric"]) == {"abs_circulation_ratio"}
    assert set(frame["variant"]) == {"rotation", "projection"}
    finite = frame["median_a"] > 0
    assert np.allclose(frame.loc[finite, "ratio"], 1.0)


def test_plots_in_both_formats(mixture_report, tmp_path):
    pytest.importorskip("matplotlib")
    from conservcheck.report.plots import plot_report

    png = plot_report(mixture_report, tmp_path / "png", "png")
    svg = plot_report(mixture_report, tmp_path / "svg", "svg")
    names = {p.name for p in png}
    assert {"loop_abs_circulation.png", "loop_abs_eq7.png", "loop_abs_circulation_box.png"} <= names
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in png)
    assert all("<svg" in p.read_text()[:2000] for p in svg)
    with pytest.raises(UsageError, match="png or svg"):
        plot_report(mixture_report, tmp_path, "jpg")


def test_time_labels_follow_the_process():
    assert time_label({"index": 10, "t": 0.001}) == "k=10"
    assert time_label({"index": None, "t": 0.25}) == "t=0.25"
    assert time_label({"index": None, "t": 2.0}, "sigma") == "σ=2"
