"""The CI examples run as the runners run them: examples/ci/github-actions.yml's ``run`` steps and
examples/ci/gitlab-ci.yml's ``script``, in a fresh workspace holding a real baseline report, with the
environment variables the runners set (GITHUB_ACTIONS, GITHUB_STEP_SUMMARY, … ; GITLAB_CI, CI_PROJECT_DIR,
…) and the job's own variables, scaled down to the embedded funnel. The same checkpoint passes; the funnel
with an injected non-conservative error (examples/ci/injected_error.py) fails the gate, with ``::error``
annotations, a job summary and a JUnit failure.

The install steps are left out (the package is installed here, and the machine has no network); their
lines are checked on their own. The default run has the GitHub job on the injected error; the other three
runs are slow-marked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / "examples" / "ci"
#: The jobs' variables, scaled to the tests' funnel audits (conftest.FUNNEL_AUDIT).
SCALED = {"SAMPLES": "16", "POINTS": "32", "SEED": "0"}
MODELS = {"same": "embedded:funnel", "injected": "injected_error:funnel_rotated"}


def _workspace(tmp_path: Path, baseline: Path) -> Path:
    """A checkout: the baseline report committed at baselines/, and the injected-error module."""
    ws = tmp_path / "workspace"
    (ws / "baselines").mkdir(parents=True)
    shutil.copy(baseline, ws / "baselines" / "conservcheck.json")
    shutil.copy(CI / "injected_error.py", ws / "injected_error.py")
    return ws


def _base_env(tmp_path: Path) -> dict[str, str]:
    """The machine's environment with conservcheck's environment first on PATH, an empty offline
    Hugging Face cache and a non-interactive matplotlib."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "CI", "GITLAB"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    return env


def _run_script(script: str, shell: list[str], cwd: Path, env: dict, tmp: Path) -> subprocess.CompletedProcess:
    path = tmp / f"step-{uuid.uuid4().hex}.sh"
    path.write_text(script)
    return subprocess.run([*shell, str(path)], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


# ------------------------------------------------------------------------------------------- GitHub


def _github_job() -> dict:
    workflow = yaml.safe_load((CI / "github-actions.yml").read_text())
    (job,) = workflow["jobs"].values()
    return job


def _github(case: str, baseline: Path, tmp_path: Path) -> list[dict]:
    """Run the job's ``run`` steps (but the install) as the runner does; one record per step."""
    job = _github_job()
    ws = _workspace(tmp_path, baseline)
    temp = tmp_path / "runner-temp"
    (temp / "_runner_file_commands").mkdir(parents=True)
    env = _base_env(tmp_path)
    env.update({k: str(v) for k, v in job["env"].items()})
    env.update(SCALED, MODEL=MODELS[case])
    env.update(
        CI="true",
        GITHUB_ACTIONS="true",
        GITHUB_WORKSPACE=str(ws),
        GITHUB_REPOSITORY="example/diffusion",
        GITHUB_SHA="0" * 40,
        GITHUB_REF="refs/heads/main",
        GITHUB_JOB="conservativity",
        GITHUB_RUN_ID="1",
        GITHUB_EVENT_NAME="push",
        RUNNER_OS="Linux",
        RUNNER_TEMP=str(temp),
    )
    steps = []
    for step in job["steps"]:
        if "run" not in step or step.get("name") == "Install":
            continue
        if steps and steps[-1]["rc"] != 0 and "always()" not in str(step.get("if", "")):
            break
        # The runner gives every step its own summary and command files.
        files = {
            name: temp / "_runner_file_commands" / f"{name.lower()}_{uuid.uuid4()}"
            for name in ("GITHUB_STEP_SUMMARY", "GITHUB_OUTPUT", "GITHUB_ENV", "GITHUB_PATH")
        }
        for f in files.values():
            f.touch()
        step_env = {**env, **{k: str(v) for k, v in files.items()}}
        proc = _run_script(step["run"], ["bash", "--noprofile", "--norc", "-eo", "pipefail"], ws, step_env, temp)
        steps.append(
            {
                "name": step["name"],
                "rc": proc.returncode,
                "stdout": proc.stdout,
                "stderr": proc.stderr,
                "summary": files["GITHUB_STEP_SUMMARY"].read_text(),
            }
        )
    return steps


@pytest.mark.slow
def test_github_workflow_same_checkpoint_passes(funnel_reports, tmp_path):
    steps = _github("same", funnel_reports["seed0"], tmp_path)
    assert [s["name"] for s in steps] == ["Audit", "Gate against the baseline"]
    audit, gate = steps
    assert audit["rc"] == 0 and gate["rc"] == 0, audit["stderr"] + gate["stderr"]
    # The funnel MLP is not a score: a warning annotation, not an error; the gate passes.
    assert "::warning title=conservcheck verdict::embedded:funnel: verdict violation" in gate["stdout"]
    assert "::error" not in gate["stdout"]
    assert gate["summary"].startswith("## conservcheck: ✅ gate passed — `embedded:funnel`")
    assert "| `loop.rotation.abs_circulation_ratio worse by 20%` | ✅ does not hold |" in gate["summary"]
    assert "### Against the baseline `baselines/conservcheck.json`" in gate["summary"]
    assert audit["summary"].startswith("## conservcheck: ✅ gate passed")  # its --fail-if verdict == invalid
    ws = tmp_path / "workspace"
    assert (ws / "conservcheck.html").stat().st_size > 10_000
    assert ET.parse(ws / "gate.xml").getroot().find("testsuite").get("failures") == "0"


def test_github_workflow_injected_error_fails_with_annotations(funnel_reports, tmp_path):
    steps = _github("injected", funnel_reports["seed0"], tmp_path)
    audit, gate = steps
    assert audit["rc"] == 0, audit["stderr"]
    assert gate["rc"] == 1, gate["stdout"] + gate["stderr"]
    errors = [line for line in gate["stdout"].splitlines() if line.startswith("::error ")]
    assert len(errors) == 1
    assert errors[0].startswith(
        "::error title=conservcheck gate::injected_error:funnel_rotated: condition holds: "
        "loop.rotation.abs_circulation_ratio worse by 20%25 — loop.rotation.abs_circulation_ratio at t="
    )
    summary = gate["summary"]
    assert summary.startswith("## conservcheck: ❌ gate failed — `injected_error:funnel_rotated`")
    assert "| `loop.rotation.abs_circulation_ratio worse by 20%` | ❌ holds |" in summary
    against = summary.split("### Against the baseline")[1].split("### Headline metrics")[0]
    assert "**loop.rotation.abs_circulation_ratio: median against the baseline's**" in against
    assert "❌" in against
    (failure,) = ET.parse(tmp_path / "workspace" / "gate.xml").getroot().iter("failure")
    assert "vs baseline" in failure.text


# ------------------------------------------------------------------------------------------- GitLab


def _gitlab(case: str, baseline: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict, Path]:
    """Run the job's ``script`` as the runner does: one shell, stopping at the first failing line."""
    config = yaml.safe_load((CI / "gitlab-ci.yml").read_text())
    job = config["conservativity"]
    ws = _workspace(tmp_path, baseline)
    env = _base_env(tmp_path)
    env.update({k: str(v) for k, v in job["variables"].items()})
    env.update(SCALED, MODEL=MODELS[case])
    env.update(
        CI="true",
        GITLAB_CI="true",
        CI_SERVER="yes",
        CI_PROJECT_DIR=str(ws),
        CI_BUILDS_DIR=str(tmp_path),
        CI_PROJECT_PATH="example/diffusion",
        CI_JOB_NAME="conservativity",
        CI_JOB_STAGE=job["stage"],
        CI_JOB_ID="1",
        CI_PIPELINE_ID="1",
        CI_COMMIT_SHA="0" * 40,
        CI_COMMIT_REF_NAME="main",
    )
    script = "\n".join(job["script"]) + "\n"
    proc = _run_script(script, ["bash", "-eo", "pipefail"], ws, env, tmp_path)
    return proc, job, ws


@pytest.mark.parametrize(
    "case, code, failures",
    [pytest.param("same", 0, "0", marks=pytest.mark.slow), pytest.param("injected", 1, "1", marks=pytest.mark.slow)],
)
def test_gitlab_job(case, code, failures, funnel_reports, tmp_path):
    proc, job, ws = _gitlab(case, funnel_reports["seed0"], tmp_path)
    assert proc.returncode == code, proc.stdout + proc.stderr
    # What the runner uploads: every artifact path exists, the JUnit report has the gate's test case.
    for path in job["artifacts"]["paths"]:
        assert (ws / path).is_file(), path
    suite = ET.parse(ws / job["artifacts"]["reports"]["junit"]).getroot().find("testsuite")
    assert suite.get("tests") == "1" and suite.get("failures") == failures
    assert "::" not in proc.stdout  # GitHub's annotations only with --format github


# ------------------------------------------------------------------------------------------- install


def test_both_recipes_install_from_a_checkout_of_the_repository_and_torch_from_the_cpu_index():
    """conservcheck is not on a package index: each recipe checks its repository out and installs that
    folder with the plots extra (the HTML report's figures); hosted runners have no GPU, so torch comes from
    PyTorch's CPU index. tests/test_examples.py shows that pip resolves such a folder spec to conservcheck."""
    torch_line = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    job = _github_job()
    (checkout,) = [s for s in job["steps"] if s.get("with", {}).get("repository")]
    assert (
        checkout["uses"].startswith("actions/checkout@") and "CONSERVCHECK_REPOSITORY" in checkout["with"]["repository"]
    )
    (install,) = [s for s in job["steps"] if s.get("name") == "Install"]
    assert install["run"].splitlines() == [torch_line, f'pip install "./{checkout["with"]["path"]}[plots]"']
    gitlab = yaml.safe_load((CI / "gitlab-ci.yml").read_text())["conservativity"]
    clone, torch_step, package = gitlab["before_script"][1:]
    folder = clone.split()[-1]
    assert clone.startswith("git clone") and '"$CONSERVCHECK_REPOSITORY"' in clone and "CONSERVCHECK_REF" in clone
    assert torch_step == torch_line and package == f'pip install "./{folder}[plots]"'
    assert "CONSERVCHECK_REF" in gitlab["variables"]
