"""--format github: workflow commands escaped as the runner parses them, the job summary appended to
$GITHUB_STEP_SUMMARY (or printed without it), refusals annotated, and audit --html straight from an audit."""

from __future__ import annotations

from typer.testing import CliRunner

from conservcheck.cli.app import app
from conservcheck.report.github import command, escape_data, escape_property

runner = CliRunner()


def cc(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def test_workflow_commands_are_escaped():
    assert escape_data("worse by 20%\nnext\rline") == "worse by 20%25%0Anext%0Dline"
    assert escape_property("a: b, c%") == "a%3A b%2C c%25"
    assert command("error", "x: 5%", "gate: k=1, t=2") == "::error title=gate%3A k=1%2C t=2::x: 5%25"


def test_refused_baseline_is_an_error_annotation(funnel_reports):
    r = cc(
        "gate",
        funnel_reports["seed1"],
        "--baseline",
        funnel_reports["seed0"],
        "--fail-if",
        "rotation.abs_circulation_ratio worse by 20%",
        "--format",
        "github",
    )
    assert r.exit_code == 2
    assert r.stdout.startswith("::error title=conservcheck::cannot compare with the baseline: the seeds differ")
    assert len(r.stderr.strip().splitlines()) == 1


def test_summary_is_appended_and_printed_without_the_variable(funnel_reports, tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    env = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)}
    args = ["gate", funnel_reports["seed0"], "--fail-if", "verdict == invalid", "--format", "github"]
    r = cc(*args, env=env)
    assert r.exit_code == 0, r.output
    text = summary.read_text()
    assert text.startswith("earlier step\n## conservcheck: ✅ gate passed — `embedded:funnel`")
    assert "### Headline metrics" in text and "<details><summary>Model and provenance</summary>" in text
    assert "::warning title=conservcheck verdict::embedded:funnel: verdict violation" in r.stdout
    r = cc(*args, env={"GITHUB_STEP_SUMMARY": ""})
    assert r.exit_code == 0
    assert "GITHUB_STEP_SUMMARY is not set" in r.stderr and "## conservcheck: ✅ gate passed" in r.stdout
    r = cc(*args[:-1], "gitlab")
    assert r.exit_code == 2 and "--format: expected text or github" in r.stderr


def test_audit_writes_html_and_github_output(tmp_path):
    html = tmp_path / "audit.html"
    summary = tmp_path / "summary.md"
    r = cc(
        "audit",
        "test_cli:linear_probe",
        "--paths",
        "rotation",
        "--curl",
        "none",
        "--times",
        "0.5",
        "--samples",
        3,
        "--points",
        8,
        "--precision",
        "fp64",
        "--data",
        _zeros(tmp_path),
        "--cache-dir",
        tmp_path / "cache",
        "--html",
        html,
        "--format",
        "github",
        env={"GITHUB_STEP_SUMMARY": str(summary)},
    )
    assert r.exit_code == 0, r.output
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") and '<section id="figures">' in page
    assert "## conservcheck: ⚠️ violation — `test_cli:linear_probe`" in summary.read_text()


def _zeros(folder):
    import numpy as np

    path = folder / "x0.npy"
    np.save(path, np.zeros((3, 2)))
    return path
