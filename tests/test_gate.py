"""The --fail-if grammar: parsing, evaluation on a report both ways, scopes, missing values, JUnit XML."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from conservcheck.errors import UsageError
from conservcheck.report.audit_report import AuditReport
from conservcheck.report.gate import Condition, VerdictCondition, evaluate, junit_xml, parse, write_junit


def _unit(variant, index, values, status="ok", diagnostic="loop"):
    t = 0.001 * index
    return {
        "field": "model",
        "diagnostic": diagnostic,
        "variant": variant,
        "status": status,
        "message": None if status == "ok" else "NaN/Inf values",
        "meta": {},
        "time": {
            "key": f"k{index}",
            "index": index,
            "t": t,
            "sigma": math.sqrt(-math.expm1(-2 * t)),
            "alpha": math.exp(-t),
        },
        "values": values,
    }


@pytest.fixture(scope="module")
def report():
    """Rotation |ratio| medians 0.01 at k=10 and 0.2 at k=500; brownian 0.03 and 0.04; curl 0.5 at k=500."""
    units = [
        _unit("rotation", 10, {"abs_circulation_ratio": [0.0, 0.01, 0.02]}),
        _unit("rotation", 500, {"abs_circulation_ratio": [0.1, 0.2, 0.3]}),
        _unit("brownian", 10, {"abs_circulation_ratio": [0.03, 0.03, 0.03]}),
        _unit("brownian", 500, {"abs_circulation_ratio": [0.04, 0.04, 0.04]}),
        _unit("hutchinson", 500, {"rel_asym": [0.5, 0.5, 0.5]}, diagnostic="curl"),
    ]
    points = [u["time"] for u in units[:2]]
    header = {
        "model": {"name": "synthetic", "precision": "fp32"},
        "process": {"name": "ou", "time": "t"},
        "options": {"seed": 0},
        "time_points": points,
        "problems": [],
        "complete": True,
    }
    return AuditReport.from_units(header, units)


def test_parse_examples():
    e = parse("loop.rotation.circulation_ratio.median > 0.05")
    assert e.clauses == ((Condition("loop", "rotation", "circulation_ratio", "median", ">", 0.05),),)
    e = parse("curl.hutchinson.rel_asym.mean > 0.2 at any time")
    assert e.clauses[0][0].scope == "any"
    e = parse("loop.*.abs_eq7.q75 >= 1e-3 at all times or verdict == invalid")
    assert e.clauses[0][0].variant == "*" and e.clauses[0][0].scope == "all"
    assert e.clauses[1] == (VerdictCondition("==", "invalid"),)
    e = parse("loop.rotation.x.median < 1 at k=500 and verdict != pass")
    assert e.clauses[0][0].at == ("k", 500.0) and len(e.clauses[0]) == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("loop.rotation.x > 1", "DIAGNOSTIC.VARIANT.COLUMN.STATISTIC"),
        ("loop.rotation.x.p99 > 1", "a statistic"),
        ("loop.rotation.x.median >", "expected a number, got 'the end'"),
        ("loop.rotation.x.median = 3", "a comparison"),
        ("verdict == good", "pass, violation, invalid"),
        ("loop.rotation.x.median > 1 at noon", "after 'at'"),
        ("loop.rotation.x.median > 1 extra", "'and', 'or'"),
        ("loop.rotation.x.median > 1 at k=0.5", "must be an integer"),
        ("__import__('os').system('true')", "cannot read"),
    ],
)
def test_parse_errors_are_one_line_usage_errors(text, message):
    with pytest.raises(UsageError, match="--fail-if") as err:
        parse(text)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "text, holds",
    [
        ("loop.rotation.abs_circulation_ratio.median > 0.05", True),  # 0.2 at k=500
        ("loop.rotation.abs_circulation_ratio.median > 0.5", False),
        ("loop.rotation.abs_circulation_ratio.median > 0.005 at all times", True),  # 0.01 and 0.2
        ("loop.rotation.abs_circulation_ratio.median > 0.05 at all times", False),  # 0.01 at k=10
        ("loop.rotation.abs_circulation_ratio.median > 0.05 at k=10", False),
        ("loop.rotation.abs_circulation_ratio.median > 0.05 at k=500", True),
        ("loop.rotation.abs_circulation_ratio.median > 0.05 at t=0.5", True),
        ("loop.*.abs_circulation_ratio.median > 0.035 at all times", False),  # brownian k=10 is 0.03
        ("loop.brownian.abs_circulation_ratio.mean <= 0.04 at all times", True),
        ("loop.rotation.abs_circulation_ratio.q75 >= 0.25", True),  # q75 of 0.1, 0.2, 0.3 is 0.25
        ("loop.rotation.abs_circulation_ratio.n != 3", False),
        ("curl.hutchinson.rel_asym.mean > 0.2 at any time", True),
        # The fixture's verdict is "violation"; "and" binds tighter than "or".
        ("curl.hutchinson.rel_asym.mean > 0.6 or verdict == violation", True),
        ("curl.hutchinson.rel_asym.mean > 0.6 or verdict == invalid", False),
        ("curl.hutchinson.rel_asym.mean > 0.2 and verdict != invalid", True),
        ("verdict == invalid and loop.rotation.abs_circulation_ratio.median > 0.1 or verdict == pass", False),
        ("verdict == violation and loop.rotation.abs_circulation_ratio.median > 0.1 or verdict == pass", True),
    ],
)
def test_evaluate_both_ways(report, text, holds):
    assert evaluate(parse(text), report).holds is holds


def test_fixture_verdict_is_a_violation(report):
    # No control units: the floor is the fp32 precision floor, far below the synthetic ratios.
    assert report.verdict.status == "violation"


def test_missing_metric_and_time_point_are_usage_errors(report):
    with pytest.raises(UsageError, match="no loop.projection.abs_circulation_ratio") as err:
        evaluate(parse("loop.projection.abs_circulation_ratio.median > 0"), report)
    assert "loop.rotation.abs_circulation_ratio" in err.value.hint
    with pytest.raises(UsageError, match="no time point k=20"):
        evaluate(parse("loop.rotation.abs_circulation_ratio.median > 0 at k=20"), report)


def test_units_without_values_make_conditions_hold():
    units = [_unit("rotation", 10, {"abs_circulation_ratio": [0.0, float("nan")]}, status="nonfinite")]
    header = {
        "model": {"name": "m", "precision": "fp32"},
        "process": {"name": "ou", "time": "t"},
        "options": {"seed": 0},
        "time_points": [units[0]["time"]],
        "problems": [],
        "complete": True,
    }
    rep = AuditReport.from_units(header, units)
    result = evaluate(parse("loop.rotation.abs_circulation_ratio.median > 100"), rep)
    assert result.holds and "has no value (nonfinite)" in result.details[0]


def test_junit_xml_one_case_per_condition(report, tmp_path):
    exprs = [parse("loop.rotation.abs_circulation_ratio.median > 0.05"), parse("verdict == pass")]
    results = [evaluate(e, report) for e in exprs]
    path = tmp_path / "gate.xml"
    write_junit(path, results, report)
    root = ET.parse(path).getroot()
    suite = root.find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [e.text for e in exprs]
    failure = cases[0].find("failure")
    assert failure is not None and "at k=500 = 0.2 > 0.05" in failure.text
    assert cases[1].find("failure") is None
    assert junit_xml(results, report).startswith('<?xml version="1.0"')


def test_a_time_typed_as_printed_names_its_time_point():
    """The tables print t = 0.0204081… as t=0.02041: typed back, it names that time point (it was refused by
    a message listing t=0.02041 as available); a value that rounds to two time points is refused."""
    t1, t2 = 1 / 49, 0.02043
    units = []
    for key, t, v in (("a", t1, 0.5), ("b", t2, 0.1)):
        unit = _unit("rotation", 0, {"abs_circulation_ratio": [v] * 3})
        unit["time"] = {"key": key, "index": None, "t": t, "sigma": math.sqrt(-math.expm1(-2 * t)), "alpha": 1.0}
        units.append(unit)
    header = {
        "model": {"name": "m", "precision": "fp32"},
        "process": {"name": "ou", "time": "t"},
        "options": {"seed": 0},
        "time_points": [u["time"] for u in units],
        "problems": [],
        "complete": True,
    }
    rep = AuditReport.from_units(header, units)
    assert rep.time_label("a") == "t=0.02041"
    assert evaluate(parse("loop.rotation.abs_circulation_ratio.median > 0.2 at t=0.02041"), rep).holds
    assert not evaluate(parse("loop.rotation.abs_circulation_ratio.median > 0.2 at t=0.02043"), rep).holds
    with pytest.raises(UsageError, match=r"t=0.0204 matches 2 time points \(t=0.02041, t=0.02043\)"):
        evaluate(parse("loop.rotation.abs_circulation_ratio.median > 0.2 at t=0.0204"), rep)
