"""`--fail-if` conditions on a report's summary: a small grammar, parsed by hand (never ``eval``).

Grammar (keywords are case-insensitive; ``and`` binds tighter than ``or``)::

    expression := clause ("or" clause)*
    clause     := condition ("and" condition)*
    condition  := metric OP NUMBER [scope]
                | series "worse" "by" NUMBER "%" [scope]                needs a baseline report
                | "verdict" ("==" | "!=") ("pass" | "violation" | "invalid")
    metric     := DIAGNOSTIC "." VARIANT "." COLUMN "." STATISTIC      VARIANT may be "*" (any)
    series     := [DIAGNOSTIC "."] VARIANT "." COLUMN                  DIAGNOSTIC may be left out when
                                                                        the variant names one diagnostic
    OP         := ">" | ">=" | "<" | "<=" | "==" | "!="
    scope      := "at" when [guidance] | "at" guidance
    when       := "any" "time" | "all" "times" | "k" "=" INTEGER | "t" "=" NUMBER | "sigma" "=" NUMBER
    guidance   := "w" "=" NUMBER

STATISTIC is one of the summary's ``n, median, q25, q75, mean, ci_low, ci_high, pooled`` (``pooled``
only for the metrics pooled over samples: the curl's ratios); the scope defaults to ``at any time`` (and,
for a conditional model, any guidance scale w; ``w=…`` narrows the condition to one). Examples::

    loop.rotation.abs_circulation_ratio.median > 0.05
    curl.hutchinson.rel_asym.mean > 0.2 at any time
    loop.*.abs_eq7.q75 > 1 at all times or verdict == invalid
    curl.subjacobian.curl_rel_fro.median > 0.1 at all times w=7.5
    rotation.abs_circulation_ratio worse by 20%
    curl.hutchinson.rel_asym worse by 50% at all times

``worse by P%`` compares the report with a baseline report, sample by sample
(:mod:`conservcheck.report.baseline`): it holds at a time point when the ratio of medians
median(report) / median(baseline) exceeds 1 + P/100 with 95% confidence (a seeded bootstrap; Bonferroni
over the time points of ``at any time``), so sampling noise does not make it hold and a real regression
does. A time point where the report has no values makes it hold (fail closed).

A time given as ``t=…`` or ``sigma=…`` names the time point it equals, or that rounds to it as the tables
print it (3 to 6 significant digits); a value that names two time points is refused.

A condition on a (diagnostic, variant, time point) whose statistics are empty because the unit did not
finish cleanly (NaN/Inf output, an error) *holds*: a gate fails closed. A metric the report does not
contain is a usage error (exit code 2), as is a malformed expression.
"""

from __future__ import annotations

import math
import operator
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from conservcheck import diagnostics
from conservcheck.errors import UsageError
from conservcheck.files import write_atomic
from conservcheck.report import baseline as baselines
from conservcheck.report.audit_report import AuditReport
from conservcheck.report.summary import STAT_COLUMNS

OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
VERDICTS = ("pass", "violation", "invalid")
_TOKEN = re.compile(r"\s*(?:(>=|<=|==|!=|>|<|=|%)|([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?![\w.*]))|([\w.*-]+))")
HINT = "write e.g. 'loop.rotation.abs_circulation_ratio.median > 0.05 at any time'; the grammar is in docs/cli.md"


@dataclass(frozen=True)
class Condition:
    """``metric OP value`` over the time points named by ``scope`` (``any``, ``all``, or a time point), at
    the guidance scale ``w`` (None: every guidance scale in the report)."""

    diagnostic: str
    variant: str
    column: str
    statistic: str
    op: str
    value: float
    scope: str = "any"
    at: tuple[str, float] | None = None
    w: float | None = None

    @property
    def metric(self) -> str:
        return f"{self.diagnostic}.{self.variant}.{self.column}.{self.statistic}"


@dataclass(frozen=True)
class Regression:
    """``series worse by P%``: the ratio of medians against a baseline report exceeds 1 + P/100 with
    confidence :data:`conservcheck.report.baseline.CONFIDENCE` at the time points named by ``scope``.
    ``diagnostic`` is None when the expression named only the variant."""

    diagnostic: str | None
    variant: str
    column: str
    percent: float
    scope: str = "any"
    at: tuple[str, float] | None = None

    @property
    def series(self) -> str:
        return ".".join(p for p in (self.diagnostic, self.variant, self.column) if p)


@dataclass(frozen=True)
class VerdictCondition:
    op: str
    status: str


Atom = Condition | Regression | VerdictCondition


@dataclass(frozen=True)
class Expression:
    """Disjunction of conjunctions of atoms, with the text it was parsed from."""

    text: str
    clauses: tuple[tuple[Atom, ...], ...]


@dataclass
class GateResult:
    """Whether one expression holds on a report, and the values that made it hold."""

    expression: Expression
    holds: bool
    details: list[str] = field(default_factory=list)


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise UsageError(f"--fail-if {text!r}: cannot read {text[pos:].strip()!r}", HINT)
        op, num, word = m.groups()
        out.append(("op", op) if op else ("num", num) if num else ("word", word))
        pos = m.end()
    return out


def parse(text: str) -> Expression:
    """Parse one ``--fail-if`` expression; raises :class:`UsageError` naming what is wrong."""
    toks = _tokens(text)
    pos = 0

    def fail(what: str) -> UsageError:
        got = toks[pos][1] if pos < len(toks) else "the end"
        return UsageError(f"--fail-if {text!r}: expected {what}, got {got!r}", HINT)

    def peek_word(*words: str) -> bool:
        return pos < len(toks) and toks[pos][0] == "word" and toks[pos][1].lower() in words

    def take(kind: str, what: str) -> str:
        nonlocal pos
        if pos >= len(toks) or toks[pos][0] != kind:
            raise fail(what)
        pos += 1
        return toks[pos - 1][1]

    def expect_word(word: str, what: str) -> None:
        nonlocal pos
        if not peek_word(word):
            raise fail(what)
        pos += 1

    def number(what: str) -> float:
        nonlocal pos
        if peek_word("inf", "-inf", "+inf"):
            pos += 1
            return float(toks[pos - 1][1])
        return float(take("num", what))

    def atom() -> Atom:
        nonlocal pos
        if peek_word("verdict"):
            pos += 1
            op = take("op", "== or != after verdict")
            status = take("word", "pass, violation or invalid").lower()
            if op not in ("==", "!=") or status not in VERDICTS:
                pos -= 1
                raise fail("verdict == or != one of pass, violation, invalid")
            return VerdictCondition(op, status)
        name = take("word", "a metric such as loop.rotation.abs_circulation_ratio.median")
        parts = name.split(".")
        if peek_word("worse"):
            return regression(parts)
        if len(parts) != 4 or not all(parts):
            pos -= 1
            raise fail("a metric DIAGNOSTIC.VARIANT.COLUMN.STATISTIC")
        if parts[3] not in STAT_COLUMNS:
            pos -= 1
            raise fail(f"a statistic ({', '.join(STAT_COLUMNS)}) at the end of the metric")
        op = take("op", "a comparison (>, >=, <, <=, ==, !=)")
        if op in ("=", "%"):
            pos -= 1
            raise fail("a comparison (>, >=, <, <=, ==, !=)")
        value = number("a number")
        diagnostic, variant, column, statistic = parts
        return Condition(diagnostic, variant, column, statistic, op, value, *scope())

    def regression(parts: list[str]) -> Regression:
        nonlocal pos
        if not 2 <= len(parts) <= 3 or not all(parts) or parts[-1] in STAT_COLUMNS:
            pos -= 1
            raise fail("a series [DIAGNOSTIC.]VARIANT.COLUMN before 'worse by' (no statistic: medians are compared)")
        pos += 1
        expect_word("by", "'by' after 'worse'")
        percent = number("a percentage")
        if take("op", "'%' after the percentage") != "%":
            pos -= 1
            raise fail("'%' after the percentage")
        if not 0 <= percent < math.inf:
            raise UsageError(f"--fail-if {text!r}: the percentage must be 0 or more", HINT)
        diagnostic = parts[0] if len(parts) == 3 else None
        when, at, w = scope()
        if w is not None:
            raise UsageError(f"--fail-if {text!r}: 'worse by' compares every guidance scale; drop 'w=…'", HINT)
        return Regression(diagnostic, parts[-2], parts[-1], percent, when, at)

    def equals(what: str) -> float:
        nonlocal pos
        if take("op", "=") != "=":
            pos -= 1
            raise fail("=")
        return number(what)

    def scope() -> tuple[str, tuple[str, float] | None, float | None]:
        nonlocal pos
        scope, at, w = "any", None, None
        if peek_word("at"):
            pos += 1
            if peek_word("any"):
                pos += 1
                expect_word("time", "'time' after 'at any'")
            elif peek_word("all"):
                pos += 1
                expect_word("times", "'times' after 'at all'")
                scope = "all"
            elif peek_word("k", "t", "sigma", "σ"):
                axis = take("word", "k, t or sigma").lower().replace("σ", "sigma")
                v = equals("a time")
                if axis == "k" and not float(v).is_integer():
                    raise UsageError(f"--fail-if {text!r}: a time index k must be an integer", HINT)
                scope, at = "point", (axis, v)
            elif not peek_word("w"):
                raise fail("'any time', 'all times', 'k=…', 't=…', 'sigma=…' or 'w=…' after 'at'")
            if peek_word("w"):
                pos += 1
                w = equals("a guidance scale")
        return scope, at, w

    clauses: list[tuple[Atom, ...]] = []
    clause = [atom()]
    while pos < len(toks):
        if peek_word("and"):
            pos += 1
            clause.append(atom())
        elif peek_word("or"):
            pos += 1
            clauses.append(tuple(clause))
            clause = [atom()]
        else:
            raise fail("'and', 'or' or the end of the condition")
    clauses.append(tuple(clause))
    return Expression(text, tuple(clauses))


def _select(cond: Condition, summary: pd.DataFrame, label: Callable[[str], str]) -> pd.DataFrame:
    if cond.statistic == "pooled" and diagnostics.pooled_metric(cond.diagnostic, cond.column) is None:
        raise UsageError(
            f"--fail-if: {cond.diagnostic}.{cond.variant}.{cond.column} has no pooled value",
            "pooled values exist for curl.subjacobian.curl_rel_fro and curl.hutchinson.rel_asym",
        )
    s = summary[(summary["diagnostic"] == cond.diagnostic) & (summary["metric"] == cond.column)]
    if cond.variant != "*":
        s = s[s["variant"] == cond.variant]
    if s.empty:
        ran = sorted({f"{d}.{v}.{m}" for d, v, m in zip(summary["diagnostic"], summary["variant"], summary["metric"])})
        hint = "metrics in this report: " + ", ".join(ran[:12]) + (" …" if len(ran) > 12 else "")
        raise UsageError(f"--fail-if: the report has no {cond.diagnostic}.{cond.variant}.{cond.column}", hint)
    if cond.at is not None:
        axis, v = cond.at
        if axis == "k":
            s = s[s["time_index"] == int(v)]
        else:
            s = s[[same_time(x, v) for x in s["t" if axis == "t" else "sigma"]]]
        if s.empty:
            points = sorted({label(k) for k in summary["time_key"]})
            raise UsageError(
                f"--fail-if: the report has no time point {axis}={v:g}", "time points: " + ", ".join(points)
            )
        if s["time_key"].nunique() > 1:
            points = sorted({label(k) for k in s["time_key"]})
            raise UsageError(
                f"--fail-if: {axis}={v:g} matches {len(points)} time points ({', '.join(points)})",
                "give the time with more digits",
            )
    if cond.w is not None:
        scales = sorted({float(w) for w in summary["guidance"].dropna()})
        s = s[[not pd.isna(g) and math.isclose(g, cond.w, rel_tol=1e-9, abs_tol=1e-12) for g in s["guidance"]]]
        if s.empty:
            found = ", ".join(f"{w:g}" for w in scales) if scales else "none (an unconditional model)"
            raise UsageError(f"--fail-if: the report has no guidance scale w={cond.w:g}", f"guidance scales: {found}")
    return s


def same_time(x: float, v: float) -> bool:
    """Whether a time typed as ``v`` names the time ``x``: equal to 1e-6, or ``x`` rounded to 3–6
    significant digits (``t=0.02041`` as the tables print it names t = 0.020408…)."""
    return math.isclose(x, v, rel_tol=1e-6) or any(float(f"{x:.{k}g}") == v for k in range(3, 7))


def _series(cond: Regression, report: AuditReport) -> list[tuple[str, str]]:
    """The (diagnostic, variant) pairs of the report's model units that ``cond`` names."""
    pairs = list(dict.fromkeys((u["diagnostic"], u["variant"]) for u in report.units if u["field"] == "model"))
    found = [
        (d, v)
        for d, v in pairs
        if (cond.diagnostic is None or d == cond.diagnostic) and (cond.variant == "*" or v == cond.variant)
    ]
    if not found:
        ran = ", ".join(f"{d}.{v}" for d, v in pairs)
        raise UsageError(f"--fail-if: the report has no {cond.series}", f"diagnostics in this report: {ran}")
    if cond.diagnostic is None and cond.variant != "*" and len({d for d, _ in found}) > 1:
        names = " or ".join(f"{d}.{v}.{cond.column}" for d, v in found)
        raise UsageError(f"--fail-if: {cond.series} is ambiguous", f"write {names}")
    return found


def _at(
    comparisons: list[baselines.Comparison], at: tuple[str, float], report: AuditReport
) -> list[baselines.Comparison]:
    axis, v = at
    if axis == "k":
        out = [c for c in comparisons if c.time_index is not None and c.time_index == int(v)]
    else:
        out = [c for c in comparisons if same_time(c.t if axis == "t" else c.sigma, v)]
    if not out:
        points = ", ".join(report.time_label(t["key"]) for t in report.header["time_points"])
        raise UsageError(f"--fail-if: the report has no time point {axis}={v:g}", "time points: " + points)
    return out


def _regressed(
    cond: Regression, report: AuditReport, baseline: AuditReport | None, text: str
) -> tuple[bool, list[str]]:
    if baseline is None:
        raise UsageError(
            f"--fail-if {text!r}: 'worse by' compares the report with a baseline report", "pass --baseline OLD.json"
        )
    comps = [c for d, v in _series(cond, report) for c in baselines.compare_metric(report, baseline, d, v, cond.column)]
    if cond.at is not None:
        comps = _at(comps, cond.at, report)
    # One-sided tests; Bonferroni over the time points of "any" keeps the family-wise false-alarm rate.
    alpha = (1.0 - baselines.CONFIDENCE) / (len(comps) if cond.scope == "any" else 1)
    threshold = 1.0 + cond.percent / 100.0
    hits: list[bool] = []
    details: list[str] = []
    for c in comps:
        where = f"{c.metric} at {report.time_label(c.time_key)}"
        if c.status != "ok":
            hits.append(True)
            details.append(f"{where} has no value ({c.status})")
            continue
        bound = c.lower(alpha)
        hits.append(bound > threshold)
        if hits[-1]:
            details.append(
                f"{where}: median {c.median_new:.4g} vs baseline {c.median_baseline:.4g}, ratio {c.ratio:.3g} "
                f"(≥ {bound:.3g} with {100 * (1 - alpha):.3g}% confidence) > {threshold:g}"
            )
    holds = all(hits) if cond.scope == "all" else any(hits)
    return holds, details if holds else []


def _holds(
    cond: Atom, report: AuditReport, baseline: AuditReport | None = None, text: str = ""
) -> tuple[bool, list[str]]:
    if isinstance(cond, VerdictCondition):
        same = report.verdict.status == cond.status
        ok = same if cond.op == "==" else not same  # parse admits only == and != after verdict
        return ok, [f"verdict is {report.verdict.status}"] if ok else []
    if isinstance(cond, Regression):
        return _regressed(cond, report, baseline, text)
    s = _select(cond, report.summary(), report.time_label)
    hits: list[bool] = []
    details: list[str] = []
    for _, row in s.iterrows():
        value = row[cond.statistic]
        metric = f"{row['diagnostic']}.{row['variant']}.{cond.column}.{cond.statistic}"
        where = f"{metric} at {report.time_label(row['time_key'], row['guidance'])}"
        if pd.isna(value):
            hits.append(True)
            details.append(f"{where} has no value ({row['status']})")
        elif OPS[cond.op](float(value), cond.value):
            hits.append(True)
            details.append(f"{where} = {float(value):.4g} {cond.op} {cond.value:g}")
        else:
            hits.append(False)
    holds = all(hits) if cond.scope == "all" else any(hits)
    return holds, details if holds else []


def needs_baseline(expr: Expression) -> bool:
    """Whether ``expr`` has a ``worse by`` condition (which compares with a baseline report)."""
    return any(isinstance(a, Regression) for clause in expr.clauses for a in clause)


def evaluate(
    expr: Expression,
    report: AuditReport,
    baseline: AuditReport | None = None,
    *,
    allow_seed_change: bool = False,
) -> GateResult:
    """Whether ``expr`` holds on ``report`` (see the module doc for missing values).

    ``worse by`` conditions compare with ``baseline``, which must have measured the same thing
    (:func:`conservcheck.report.baseline.check_comparable`; a different seed only with ``allow_seed_change``).
    """
    if baseline is not None and needs_baseline(expr):
        baselines.check_comparable(report, baseline, allow_seed_change=allow_seed_change)
    for clause in expr.clauses:
        results = [_holds(atom, report, baseline, expr.text) for atom in clause]
        if all(ok for ok, _ in results):
            return GateResult(expr, True, [d for _, ds in results for d in ds])
    return GateResult(expr, False, [])


def junit_xml(results: list[GateResult], report: AuditReport) -> str:
    """JUnit XML with one test case per condition (a failure when the condition holds)."""
    suite = ET.Element(
        "testsuite",
        name="conservcheck",
        tests=str(len(results)),
        failures=str(sum(r.holds for r in results)),
        errors="0",
    )
    model = report.header.get("model", {})
    suite.set("hostname", str(model.get("reference") or model.get("name") or "model"))
    for r in results:
        case = ET.SubElement(suite, "testcase", classname="conservcheck.report.gate", name=r.expression.text)
        if r.holds:
            fail = ET.SubElement(case, "failure", message=f"condition holds: {r.expression.text}", type="gate")
            fail.text = "\n".join(r.details)
    ET.SubElement(suite, "system-out").text = report.verdict.reason
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(path: str | Path, results: list[GateResult], report: AuditReport) -> None:
    write_atomic(path, junit_xml(results, report))


__all__ = [
    "Condition",
    "Expression",
    "GateResult",
    "Regression",
    "VerdictCondition",
    "evaluate",
    "junit_xml",
    "needs_baseline",
    "parse",
    "write_junit",
]
