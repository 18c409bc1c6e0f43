"""GitHub Actions output: workflow-command annotations and a Markdown job summary.

``--format github`` (``conservcheck gate``, ``audit``, ``merge``) prints, besides the usual lines,

* one ``::error`` annotation per ``--fail-if`` condition that holds (it fails the step), naming the
  condition and the values that made it hold;
* one ``::warning`` annotation when the verdict is not ``pass`` (the model is measurably not a score, or
  the audit is invalid), with the verdict's reason;

and appends a Markdown summary to the file named by ``$GITHUB_STEP_SUMMARY`` (the runner shows it on the
run's page): the gate's result, the verdict, the headline medians per time point, the ratios against the
baseline when one was given, and the model's provenance. Messages are escaped as the runner's
workflow-command parser expects (``%``, CR and LF in messages; also ``:`` and ``,`` in properties).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from conservcheck.report.audit_report import AuditReport
from conservcheck.report.baseline import Comparison
from conservcheck.report.views import TextTable, comparison_tables, headline_table, provenance

if TYPE_CHECKING:
    from conservcheck.report.gate import GateResult

TITLE = "conservcheck"


def escape_data(text: str) -> str:
    """A workflow command's message: ``%``, CR and LF percent-encoded."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """A workflow command's property value: as :func:`escape_data`, and ``:`` and ``,`` too."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def command(kind: str, message: str, title: str) -> str:
    """``::kind title=…::message`` (kind: error, warning or notice)."""
    return f"::{kind} title={escape_property(title)}::{escape_data(message)}"


def workflow_commands(report: AuditReport, results: Sequence[GateResult]) -> list[str]:
    """The workflow commands for a report and its gate results (module doc)."""
    name = _model(report)
    out = []
    for r in results:
        if r.holds:
            detail = "; ".join(r.details[:5]) + (f" (+{len(r.details) - 5} more)" if len(r.details) > 5 else "")
            message = f"{name}: condition holds: {r.expression.text}" + (f" — {detail}" if detail else "")
            out.append(command("error", message, f"{TITLE} gate"))
    if report.verdict.status != "pass":
        out.append(command("warning", f"{name}: verdict {report.verdict}", f"{TITLE} verdict"))
    return out


def _model(report: AuditReport) -> str:
    m = report.header.get("model", {})
    return str(m.get("reference") or m.get("name") or "model")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(table: TextTable) -> str:
    """A GitHub-flavoured Markdown table; flagged cells are bold with a ❌."""
    head = "| " + " | ".join(_cell(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    lines = [head, rule]
    for row, flags in zip(table.rows, table.flags):
        cells = [f"**{_cell(c)}** ❌" if bad and c else _cell(c) for c, bad in zip(row, flags)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_markdown(
    report: AuditReport,
    results: Sequence[GateResult] = (),
    comparisons: Sequence[Comparison] | None = None,
    baseline_name: str | None = None,
) -> str:
    """The job summary (module doc) as Markdown."""
    failed = [r for r in results if r.holds]
    status = report.verdict.status
    if results:
        head = "❌ gate failed" if failed else "✅ gate passed"
    else:
        head = {"pass": "✅ pass", "violation": "⚠️ violation", "invalid": "❌ invalid"}.get(status, status)
    parts = [f"## {TITLE}: {head} — `{_model(report)}`", "", f"**Verdict: {status}** — {report.verdict.reason}", ""]
    if results:
        parts += ["| condition | result | values |", "|---|---|---|"]
        for r in results:
            values = "<br>".join(_cell(d) for d in r.details[:6]) or "—"
            result = "❌ holds" if r.holds else "✅ does not hold"
            parts.append(f"| `{_cell(r.expression.text)}` | {result} | {values} |")
        parts.append("")
    if comparisons:
        against = f" `{baseline_name}`" if baseline_name else ""
        parts += [f"### Against the baseline{against}", ""]
        parts.append("Ratio of medians with its 95% bootstrap interval; ❌: the whole interval lies above 1.")
        for table in comparison_tables(report, comparisons):
            parts += ["", f"**{table.title}**", "", markdown_table(table)]
        parts.append("")
    table = headline_table(report)
    if table.rows:
        parts += ["### Headline metrics", "", table.title, "", markdown_table(table), ""]
    if report.header.get("problems"):
        parts += ["### Problems", ""] + [f"- {_cell(p)}" for p in report.header["problems"]] + [""]
    parts += ["<details><summary>Model and provenance</summary>", "", "| | |", "|---|---|"]
    parts += [f"| {_cell(k)} | {_cell(v)} |" for k, v in provenance(report)]
    parts += ["", "</details>", ""]
    return "\n".join(parts)


def write_step_summary(markdown: str, environ: Mapping[str, str] | None = None) -> Path | None:
    """Append ``markdown`` to ``$GITHUB_STEP_SUMMARY``; returns its path, or None when the variable is unset."""
    env = os.environ if environ is None else environ
    target = env.get("GITHUB_STEP_SUMMARY")
    if not target:
        return None
    path = Path(target)
    with path.open("a", encoding="utf-8") as f:
        f.write(markdown if markdown.endswith("\n") else markdown + "\n")
    return path


__all__ = [
    "command",
    "escape_data",
    "escape_property",
    "markdown_table",
    "summary_markdown",
    "workflow_commands",
    "write_step_summary",
]
