"""The examples run, in their quick forms, as a user runs them: ``python examples/<script>.py`` in a
subprocess, with the Hugging Face cache in a temporary folder and the Hub switched off.

Default run: what examples may and may not do (a missing extra is one line, the shipped models cannot be
overwritten, the CI recipe installs from the repository). Marked slow, as each runs a whole example for
5–20 s (``reproduce_figures.py --quick`` and ``latent_diffusion.py --quick`` about a minute): the two
training scripts with a few steps (and the conservativity metric logged to TensorBoard), the evaluation
pipeline on the embedded funnel, the CI workflow of ``examples/ci_gate.md`` with its own ``--fail-if``
conditions, and the rebuilt published-checkpoint cache read by the CLI offline.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run(args: list[str], tmp_path: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command in tmp_path with an empty, offline Hugging Face cache, on one CPU thread (the tiny
    models gain nothing from a second, and on a shared CPU thread hand-offs cost more than the work)."""
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


def example(name: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    proc = run([sys.executable, str(EXAMPLES / name), *args], tmp_path)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "conservcheck.cli.app", *args], tmp_path)


@pytest.mark.slow
def test_train_funnel_quick(tmp_path):
    example("train_funnel.py", "--steps", "30", "--log-every", "10", "--out", "funnel", tmp_path=tmp_path)
    record = json.loads((tmp_path / "funnel" / "config.json").read_text())
    assert (tmp_path / "funnel" / "model.safetensors").stat().st_size > 0
    errors = record["training"]["relative_score_error"]
    assert sorted(map(float, errors)) == [0.01, 0.05, 0.2, 0.5, 1.0, 2.0]
    # After 30 steps the network is far from the score, but its error is bounded: the relative error of
    # the zero field is 1, and a network that moved the wrong way would exceed it at every t.
    assert all(0 < e["median"] < 1.5 for e in errors.values())
    assert min(e["median"] for e in errors.values()) < 1.0
    assert math.isfinite(record["training"]["final_train_loss"])


@pytest.mark.slow
def test_train_digits_quick_loads_as_a_diffusers_model(tmp_path):
    import torch

    from conservcheck.adapters.resolve import load_reference

    example(
        "train_digits.py",
        "--steps",
        "10",
        "--batch-size",
        "32",
        "--warmup",
        "5",
        "--log-every",
        "5",
        "--eval-draws",
        "1",
        "--out",
        "digits",
        "--samples",
        "",
        tmp_path=tmp_path,
    )
    record = json.loads((tmp_path / "digits" / "training.json").read_text())
    probe = load_reference(str(tmp_path / "digits"))
    assert probe.info.adapter == "diffusers" and probe.sample_shape == (1, 16, 16)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(probe.score(x, torch.tensor([0.1, 1.0]))).all())
    # ε-prediction MSE: 1 for the zero predictor (E ε² = 1); 10 steps already beat it (measured 0.22).
    assert record["ema_eval_loss"] < 1.0 and record["parameters"] > 0


@pytest.mark.slow
def test_train_digits_logs_conservativity_to_tensorboard(tmp_path):
    """--metric-every: ConservativityMetric on the EMA network every 2 steps, logged to TensorBoard, read back
    from the event file and drawn; the metric changes no weight (the same run without it saves the same)."""
    pytest.importorskip("torchmetrics")
    pytest.importorskip("tensorboard")
    common = ["--steps", "4", "--log-every", "2", "--eval-draws", "1", "--samples", ""]
    tracking = ["--metric-every", "2", "--metric-samples", "2", "--metric-points", "16", "--metric-times", "10,500"]
    proc = example(
        "train_digits.py",
        *common,
        *tracking,
        "--tensorboard",
        "tb",
        "--curve",
        "curve.png",
        "--out",
        "tracked",
        tmp_path=tmp_path,
    )
    assert "loop.rotation.abs_circulation_ratio" in proc.stdout
    sys.path.insert(0, str(EXAMPLES))
    try:
        from train_digits import logged_scalars
    finally:
        sys.path.remove(str(EXAMPLES))
    logged = logged_scalars(tmp_path / "tb")
    for tag in ("loop.rotation.abs_circulation_ratio", "loop.rotation.abs_circulation_ratio/k=500"):
        steps, values = zip(*logged[tag])
        assert steps == (2, 4) and all(0 < v < 1 for v in values)  # a ratio |∮ s·dy| / ∮|s||dy|
    record = json.loads((tmp_path / "tracked" / "training.json").read_text())
    assert [e["step"] for e in record["conservativity_log"]] == [2, 4]
    headline = "loop.rotation.abs_circulation_ratio"
    # TensorBoard keeps float32.
    assert record["conservativity_log"][1][headline] == pytest.approx(logged[headline][1][1], rel=1e-6)
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    example("train_digits.py", *common, "--out", "plain", tmp_path=tmp_path)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "tracked" / weights).read_bytes() == (tmp_path / "plain" / weights).read_bytes()


@pytest.mark.slow
def test_evaluation_pipeline_on_the_funnel(tmp_path):
    proc = example(
        "evaluation_pipeline.py",
        "embedded:funnel",
        "--samples",
        "4",
        "--points",
        "32",
        "--out",
        "table.md",
        tmp_path=tmp_path,
    )
    assert "embedded:funnel" in proc.stdout
    lines = (tmp_path / "table.md").read_text().splitlines()
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    row = dict(zip(header, (c.strip() for c in lines[4].strip("|").split("|"))))
    assert row["checkpoint"] == "`embedded:funnel`"
    # The verdict rule: a violation is a check whose median exceeds 10× its floor.
    assert (row["verdict"] == "violation") == (float(row["worst / floor"]) > 10)
    assert float(row["max curl"]) > 0 and float(row["max Eq. 7"]) > 0


def _workflow_audit_command() -> list[str]:
    """The ``conservcheck audit`` command of the workflow in examples/ci_gate.md, as argv."""
    text = (EXAMPLES / "ci_gate.md").read_text(encoding="utf-8")
    block = re.search(r"- name: Audit\n\s+run: \|\n(.*?)\n\s+- name:", text, flags=re.S).group(1)
    return shlex.split(block.replace("\\\n", " "))


@pytest.mark.slow
def test_ci_gate_workflow_on_the_funnel(tmp_path):
    """The workflow's own command, on the embedded funnel with fewer samples, nodes and time points."""
    argv = _workflow_audit_command()
    assert argv[:3] == ["conservcheck", "audit", "./checkpoints/my-ddpm"]
    argv[2] = "embedded:funnel"
    argv[argv.index("--samples") + 1] = "4"
    argv[argv.index("--points") + 1] = "32"
    proc = cli(*argv[1:], "--times", "0.05,1", "--quiet", tmp_path=tmp_path)
    report = json.loads((tmp_path / "audit.json").read_text())
    # Evaluate the two metric conditions from the report's summary, independently of the gate code.
    summary = [r for r in report["summary"] if r["field"] == "model"]
    rot = max(r["median"] for r in summary if r["variant"] == "rotation" and r["metric"] == "abs_circulation_ratio")
    asym = max(r["mean"] for r in summary if r["variant"] == "hutchinson" and r["metric"] == "rel_asym")
    holds = report["verdict"]["status"] == "invalid" or rot > 0.05 or asym > 0.2
    assert proc.returncode == (1 if holds else 0), proc.stderr
    junit = (tmp_path / "audit.xml").read_text()
    assert junit.count("<testcase") == 3 and junit.count("<failure") == int(rot > 0.05) + int(asym > 0.2)
    # The workflow's later steps, in-process (the audit above ran as the workflow runs it).
    from typer.testing import CliRunner

    from conservcheck.cli.app import app

    runner = CliRunner()
    figures = runner.invoke(app, ["plot", str(tmp_path / "audit.json"), "--out", str(tmp_path / "figures")])
    assert figures.exit_code == 0 and (tmp_path / "figures" / "curl_rel_asym.png").exists()
    eq7 = {}
    for r in summary:
        if r["diagnostic"] == "loop" and r["metric"] == "abs_eq7":
            eq7[r["time_key"]] = max(eq7.get(r["time_key"], 0.0), r["median"])
    gate = runner.invoke(
        app, ["gate", str(tmp_path / "audit.json"), "--fail-if", "loop.*.abs_eq7.median > 1 at all times"]
    )
    assert gate.exit_code == (1 if min(eq7.values()) > 1 else 0)


@pytest.mark.slow
def test_reproduce_figures_quick(tmp_path):
    example("reproduce_figures.py", "--quick", "--out", "paper", tmp_path=tmp_path)
    out = tmp_path / "paper"
    numbers = (out / "numbers.md").read_text()
    assert "## Figs. 2, 5, 7 — embedded:digits" in numbers and "## Figs. 3, 4, 12 — embedded:funnel" in numbers
    for name, figures in (
        ("digits", ("loop_abs_circulation.png", "loop_abs_circulation_box.png", "curl_curl_mean_abs.png")),
        ("funnel", ("loop_abs_eq7.png", "stein_err_norm.png", "stein_stein.png")),
    ):
        assert all((out / name / f).stat().st_size > 0 for f in figures)
        report = json.loads((out / f"{name}.json").read_text())
        # The rotation loop's control is exactly conservative and integrated by a spectral rule: its
        # medians sit far below the model's (at least 100×, measured ≥ 10⁴×).
        med = {
            (r["field"], r["time_key"]): r["median"]
            for r in report["summary"]
            if r["variant"] == "rotation" and r["metric"] == "abs_circulation"
        }
        for (field, key), value in med.items():
            if field == "model":
                assert value > 100 * med[("control", key)]
    digits = json.loads((out / "digits.json").read_text())
    assert [t["index"] for t in digits["time_points"]] == [10, 500]
    assert digits["data_source"]["kind"] == "array"


@pytest.mark.slow
def test_latent_diffusion_quick(tmp_path):
    example("latent_diffusion.py", "--quick", "--out", "latent", tmp_path=tmp_path)
    out = tmp_path / "latent"
    for part in (
        "model_index.json",
        "vae/config.json",
        "unet/config.json",
        "scheduler/scheduler_config.json",
        "samples.png",
        "audit.json",
        "numbers.md",
        "figures/loop_abs_circulation.png",
        "figures/stein_err_norm.png",
    ):
        assert (out / part).exists(), part
    # scaling_factor = 1 / std of the latent means: the scaled training latents have unit std.
    latents = np.load(out / "latents.npy")
    assert latents.shape == (1797, 2, 8, 8) and abs(float(latents.std()) - 1.0) < 1e-5
    report = json.loads((out / "audit.json").read_text())
    assert report["model"]["adapter"] == "latent" and report["model"]["sample_shape"] == [2, 8, 8]
    assert {u["diagnostic"] + "." + u["variant"] for u in report["units"]} >= {
        "loop.rotation",
        "curl.subjacobian",
        "stein.data",
    }
    assert "## Figs. 2 b, d and 4 — latent space" in (out / "numbers.md").read_text()


# ------------------------------------------------------------------------------- what examples may do


def _blocked(module: str, script: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run an example as a user without ``module`` installed would (the import system finds nothing)."""
    code = (
        f"import runpy, sys; sys.modules[{module!r}] = None; sys.path.insert(0, {str(EXAMPLES)!r}); "
        f"sys.argv = [{script!r}, *{list(args)!r}]; runpy.run_path({str(EXAMPLES / script)!r}, run_name='__main__')"
    )
    return run([sys.executable, "-c", code], tmp_path)


@pytest.mark.parametrize(
    "module, script, extra",
    [
        ("sklearn", "train_digits.py", "train"),
        ("sklearn", "latent_diffusion.py", "examples"),
        ("matplotlib", "reproduce_figures.py", "examples"),
    ],
)
def test_a_missing_extra_is_one_line_naming_the_install_command(module, script, extra, tmp_path):
    proc = _blocked(module, script, "--quick" if script != "train_digits.py" else "--steps=1", tmp_path=tmp_path)
    dist = {"sklearn": "scikit-learn"}.get(module, module)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f'error: examples/{script} needs {dist}: pip install -e ".[{extra}]" (in the repository root)'
    ]
    assert {p.name for p in tmp_path.iterdir()} <= {"hf"}  # nothing written


def test_examples_write_under_an_ignored_folder_and_never_over_the_shipped_models(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import _extras
    finally:
        sys.path.remove(str(EXAMPLES))
    assert _extras.OUT == ROOT / "out" and "/out/" in (ROOT / ".gitignore").read_text().splitlines()
    assets = ROOT / "conservcheck" / "assets"
    for script, asset in (("train_digits.py", "digits-ddpm"), ("train_funnel.py", "funnel-mlp")):
        before = {p: p.stat().st_mtime_ns for p in (assets / asset).rglob("*")}
        proc = run([sys.executable, str(EXAMPLES / script), "--steps", "1", "--out", str(assets / asset)], tmp_path)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
        assert "models shipped with the package" in proc.stderr and "--replace-shipped" in proc.stderr
        assert {p: p.stat().st_mtime_ns for p in (assets / asset).rglob("*")} == before


def _workflow_step(name: str) -> list[str]:
    """The command lines of the workflow step ``name`` in examples/ci_gate.md."""
    text = (EXAMPLES / "ci_gate.md").read_text(encoding="utf-8")
    block = re.search(rf"- name: {name}\n\s+run: \|\n(.*?)\n\s+- (?:name|uses):", text, flags=re.S).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_ci_gate_installs_from_the_repository_checkout(tmp_path):
    """The workflow's install lines: torch from the CPU index (a hosted runner has no GPU), conservcheck from
    the checkout of its repository — which, given this repository, pip resolves to conservcheck with the extra."""
    pytest.importorskip("setuptools")
    text = (EXAMPLES / "ci_gate.md").read_text(encoding="utf-8")
    checkout = re.search(r"repository: \$\{\{ vars.CONSERVCHECK_REPOSITORY \}\}\n.*?path: (\S+)", text, re.S).group(1)
    torch_line, package_line = (shlex.split(line) for line in _workflow_step("Install"))
    assert torch_line == ["pip", "install", "torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cpu"]
    assert package_line[:2] == ["pip", "install"] and len(package_line) == 3
    spec = package_line[2]
    assert spec == f"./{checkout}[plots]"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation", "--quiet"]
        + ["--report", "-", str(ROOT) + spec[len(f"./{checkout}") :]],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    (item,) = json.loads(proc.stdout)["install"]
    assert item["metadata"]["name"] == "conservcheck" and item["requested_extras"] == ["plots"]
    assert "plots" in item["metadata"]["provides_extra"]


@pytest.mark.slow
def test_published_checkpoints_rebuilds_a_cache_the_cli_reads_offline(tmp_path):
    """examples/published_checkpoints.py writes google/ncsnpp-celebahq-256's layout into a hub cache; with
    HF_HUB_CACHE pointing there, ``conservcheck fetch`` and ``audit`` find it with HF_HUB_OFFLINE=1 and no
    --cache-dir, as the closing commands of docs/checkpoints.md do. It refuses huggingface_hub's default
    cache."""
    cache = tmp_path / "published-hub"
    proc = example(
        "published_checkpoints.py",
        "--cache-dir",
        str(cache),
        "--size",
        "small",
        "google/ncsnpp-celebahq-256",
        tmp_path=tmp_path,
    )
    snap = Path(proc.stdout.strip())
    assert snap.parent.parent == cache / "models--google--ncsnpp-celebahq-256"
    assert sorted(p.name for p in snap.iterdir()) == [
        "README.md",
        "config.json",
        "diffusion_pytorch_model.bin",
        "model_index.json",
        "scheduler_config.json",
    ]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    fetched = subprocess.run(
        [sys.executable, "-m", "conservcheck.cli.app", "fetch", "google/ncsnpp-celebahq-256"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert fetched.returncode == 0 and fetched.stdout.strip() == str(snap), fetched.stderr
    refused = run(
        [
            sys.executable,
            str(EXAMPLES / "published_checkpoints.py"),
            "--cache-dir",
            str(tmp_path / "hf" / "hub"),
            "google/ddpm-cifar10-32",
        ],
        tmp_path,
    )
    assert refused.returncode == 2 and "huggingface_hub's default cache" in refused.stderr
