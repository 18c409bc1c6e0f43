"""The conservcheck command end to end: JSON against the schema and known answers, gates, reproducibility,
resume after an interruption, one-line usage errors, plots, compare, and a tiny real diffusers UNet.

Analytic probes are reached through ``module:factory`` references to this module (tests/ is on sys.path).
"""

from __future__ import annotations

import json
import math

import jsonschema
import numpy as np
import pytest
import torch
from conftest import assert_reproducible
from typer.testing import CliRunner

import conservcheck
from conservcheck import OUProcess, VectorFieldProbe
from conservcheck.adapters.weights import sha256_file
from conservcheck.analytic.fields import GaussianMixture, LinearField
from conservcheck.cli.app import app
from conservcheck.runner.options import audit_options
from conservcheck.timepoints import TimePoint, forward_samples

SCHEMA = conservcheck.report_schema()
KAPPA = 0.7
#: Canonical time at which :func:`interrupting_probe` raises KeyboardInterrupt (None: never).
STATE: dict[str, float | None] = {"interrupt_at": None}


# ---------------------------------------------------------------------------------------- factories


def linear_probe(device="cpu", dtype=torch.float64, **_) -> VectorFieldProbe:
    """s(y, t) = (1 + t)(−I + K) y, K = κ [[0, 1], [−1, 0]]: not conservative, and it uses its time input."""
    lin = LinearField(
        -torch.eye(2, dtype=torch.float64), torch.tensor([[0.0, KAPPA], [-KAPPA, 0.0]], dtype=torch.float64)
    )
    return VectorFieldProbe(
        lambda x, t: lin(x) * (1 + t)[:, None], process=OUProcess(), sample_shape=(2,), device=device, dtype=dtype
    )


def _mixture() -> GaussianMixture:
    return GaussianMixture(torch.tensor([[0.5, 0.0, -0.5], [-0.5, 0.3, 0.2]], dtype=torch.float64), 0.3)


def mixture_probe(device="cpu", dtype=torch.float64, **_) -> VectorFieldProbe:
    """The exact score of a two-component Gaussian mixture (conservative)."""
    gm = _mixture()
    return VectorFieldProbe(
        gm.score, process=OUProcess(), sample_shape=(3,), data_range=(-5.0, 5.0), device=device, dtype=dtype
    )


def interrupting_probe(device="cpu", dtype=torch.float64, **_) -> VectorFieldProbe:
    """The mixture score, raising KeyboardInterrupt (as Ctrl-C would) at time STATE["interrupt_at"]."""
    gm = _mixture()

    def fn(x, t):
        at = STATE["interrupt_at"]
        if at is not None and bool(((t - at).abs() < 1e-9).all()):
            raise KeyboardInterrupt
        return gm.score(x, t)

    return VectorFieldProbe(
        fn, process=OUProcess(), sample_shape=(3,), data_range=(-5.0, 5.0), device=device, dtype=dtype
    )


# ------------------------------------------------------------------------------------------ helpers


runner = CliRunner()


def cc(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def files(tmp_path):
    """Paths of a zeros x0 file (D = 2), a mixture x0 file (D = 3) and a cache folder."""
    np.save(tmp_path / "zeros.npy", np.zeros((4, 2)))
    np.save(tmp_path / "mix.npy", _mixture().sample(6, torch.Generator().manual_seed(0)).numpy())
    return {"zeros": tmp_path / "zeros.npy", "mix": tmp_path / "mix.npy", "cache": tmp_path / "cache", "dir": tmp_path}


def _mixture_audit(files, *extra):
    return cc(
        "audit",
        "test_cli:mixture_probe",
        "--paths",
        "rotation,projection",
        "--curl",
        "none",
        "--times",
        "0.1,1",
        "--samples",
        6,
        "--points",
        16,
        "--precision",
        "fp64",
        "--data",
        files["mix"],
        "--cache-dir",
        files["cache"],
        *extra,
    )


def _without_run(path):
    data = json.loads(path.read_text())
    data.pop("run")
    return data


# ------------------------------------------------------------------------------------------- audits


def test_linear_field_report_matches_the_closed_form_and_the_schema(files):
    out = files["dir"] / "linear.json"
    r = cc(
        "audit",
        "test_cli:linear_probe",
        "--paths",
        "rotation",
        "--curl",
        "none",
        "--times",
        "0.1,1",
        "--samples",
        4,
        "--points",
        16,
        "--precision",
        "fp64",
        "--data",
        files["zeros"],
        "--cache-dir",
        files["cache"],
        "--json",
        out,
    )
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    jsonschema.validate(data, SCHEMA)
    assert data["verdict"]["status"] == "violation" and data["model"]["reference"] == "test_cli:linear_probe"
    cols = data["rows"]["columns"]
    rows = [dict(zip(cols, row)) for row in data["rows"]["data"]]
    for t in (0.1, 1.0):
        tp = TimePoint.from_t(OUProcess(), t)
        _, eps = forward_samples(torch.zeros(4, 2, dtype=torch.float64), tp, seed=0)
        expected = 2 * math.pi * (1 + t) * KAPPA * tp.sigma**2 * (eps**2).sum(1)
        got = [r_["abs_circulation"] for r_ in rows if r_["field"] == "model" and r_["t"] == t]
        # |∮ s·dy| = 2π (1 + t) κ r² on the circle of radius r = σ|ε| (the −I part is a gradient).
        # Exact periodic quadrature of a degree-2 trigonometric integrand: float64 rounding only.
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-12)
    assert "loop · rotation — abs_circulation_ratio" in r.stdout
    assert "verdict: violation: loop.rotation" in r.stdout
    assert "x0: 4 samples from" in r.stdout


def test_mixture_passes_and_gates_exit_both_ways(files):
    out, junit = files["dir"] / "mix.json", files["dir"] / "gate.xml"
    r = _mixture_audit(
        files,
        "--json",
        out,
        "--fail-if",
        "loop.rotation.abs_circulation_ratio.median > 1e-6",
        "--fail-if",
        "verdict != pass",
        "--junit",
        junit,
    )
    assert r.exit_code == 0, r.output
    assert "verdict: pass" in r.stdout and "gate ok: verdict != pass" in r.stdout
    jsonschema.validate(json.loads(out.read_text()), SCHEMA)
    assert junit.read_text().count("<testcase") == 2 and "<failure" not in junit.read_text()
    holds = cc("gate", out, "--fail-if", "loop.rotation.abs_circulation_ratio.median < 1e-6 at all times")
    assert holds.exit_code == 1 and "gate FAIL" in holds.stdout
    fine = cc("gate", out, "--fail-if", "loop.*.abs_circulation_ratio.median > 0.5 or verdict == invalid")
    assert fine.exit_code == 0, fine.output
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
        2,
        "--points",
        8,
        "--precision",
        "fp64",
        "--data",
        files["zeros"],
        "--cache-dir",
        files["cache"],
        "--fail-if",
        "verdict == violation",
    )
    assert r.exit_code == 1 and "gate FAIL: verdict == violation" in r.stdout


def test_json_to_stdout_pipes_cleanly(files):
    r = _mixture_audit(files, "--json", "-")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    jsonschema.validate(data, SCHEMA)
    assert "verdict: pass" in r.stderr and "loop · rotation" in r.stderr


def test_same_seed_same_json(files):
    a, b = files["dir"] / "a.json", files["dir"] / "b.json"
    assert _mixture_audit(files, "--json", a).exit_code == 0
    assert _mixture_audit(files, "--json", b, "--batch-size", 5).exit_code == 0
    # Another batch size: the float64 reproducibility tolerance (docs/report.md#reproducibility).
    assert_reproducible(_without_run(a), _without_run(b), "fp64")
    assert a.read_text() != b.read_text()  # the run object (times, batch size) differs


def test_resume_after_interruption_gives_the_uninterrupted_report(files):
    args = [
        "--paths",
        "rotation,brownian",
        "--curl",
        "none",
        "--times",
        "0.2,0.6,1",
        "--samples",
        4,
        "--points",
        16,
        "--precision",
        "fp64",
        "--data",
        files["mix"],
        "--cache-dir",
        files["cache"],
    ]
    STATE["interrupt_at"] = 0.6
    try:
        stopped = cc("audit", "test_cli:interrupting_probe", *args)
    finally:
        STATE["interrupt_at"] = None
    assert stopped.exit_code == 130
    line = stopped.stderr.strip().splitlines()[-1]
    assert line.startswith("error: interrupted; 4 finished units are saved — resume with --resume ")
    partial = line.rsplit("--resume ", 1)[1]
    resumed, fresh = files["dir"] / "resumed.json", files["dir"] / "fresh.json"
    r = cc("audit", "test_cli:interrupting_probe", *args, "--resume", partial, "--json", resumed)
    assert r.exit_code == 0, r.output
    assert "(4 finished units reused)" in r.stderr
    assert cc("audit", "test_cli:interrupting_probe", *args, "--json", fresh).exit_code == 0
    assert _without_run(resumed) == _without_run(fresh)
    assert json.loads(resumed.read_text())["run"]["units_reused"] == 4


def test_cpu_scaled_defaults_are_announced(files):
    data = files["dir"] / "z32.npy"
    np.save(data, np.zeros((32, 2)))
    r = cc(
        "audit",
        "test_cli:linear_probe",
        "--paths",
        "rotation",
        "--curl",
        "none",
        "--times",
        "0.5",
        "--precision",
        "fp64",
        "--data",
        data,
        "--cache-dir",
        files["cache"],
    )
    assert r.exit_code == 0, r.output
    assert "CPU-scaled defaults: 32 samples per time point; nodes per loop: rotation 48" in r.stdout


# ---------------------------------------------------------------------------------------- mistakes


@pytest.fixture
def report_file(files):
    out = files["dir"] / "r.json"
    assert _mixture_audit(files, "--json", out).exit_code == 0
    return out


@pytest.mark.parametrize(
    "args, message",
    [
        (["audit", "--bogus"], "No such option: --bogus"),
        (["audit", "--samples", "0"], "--samples: expected an integer ≥ 1"),
        (["audit", "--paths", "circle"], "--paths: expected a comma-separated subset"),
        (["audit", "--precision", "fp16"], "--precision: expected one of fp64, fp32, tf32, bf16"),
        (["audit", "--time-budget", "soon"], "--time-budget: expected a duration"),
        (["audit", "./no/such/model"], "no file or folder './no/such/model'"),
        (
            ["audit", "test_cli:linear_probe", "--time-indices", "5"],
            "--time-indices needs a model with a discrete schedule",
        ),
        (["audit", "test_cli:linear_probe", "--fail-if", "loop.rotation > 1"], "--fail-if 'loop.rotation > 1'"),
        (["audit", "test_cli:linear_probe", "--junit", "x.xml"], "--junit needs at least one --fail-if"),
        (
            ["audit", "test_cli:linear_probe", "--data", "missing.npy", "--times", "0.5", "--curl", "none"],
            "data not found: missing.npy",
        ),
        (["plot", "missing.json"], "no report file missing.json"),
        (["plot", "."], ". is a folder, not a report file"),
        (["audit", "--json", "no/such/folder/r.json"], "cannot write no/such/folder/r.json: folder"),
        (["audit", "--json", "-", "--csv", "-"], "would both write to stdout"),
        (["compare", "a.json"], "Missing argument"),
        (["frobnicate"], "No such command 'frobnicate'"),
    ],
)
def test_mistakes_are_one_line_errors_with_exit_code_2(args, message, files):
    r = cc(*args, "--cache-dir", files["cache"]) if args[0] == "audit" else cc(*args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.output


def test_report_level_mistakes(report_file):
    r = cc("plot", report_file, "--format", "jpg")
    assert r.exit_code == 2 and r.stderr.startswith("error: --format: expected png or svg")
    r = cc("gate", report_file, "--fail-if", "loop.brownian.abs_circulation_ratio.median > 0")
    assert r.exit_code == 2 and "the report has no loop.brownian.abs_circulation_ratio" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# -------------------------------------------------------------------------------- plots and compare


def test_plot_and_compare(report_file, files):
    pytest.importorskip("matplotlib")
    r = cc("plot", report_file, "--out", files["dir"] / "figs", "--format", "svg")
    assert r.exit_code == 0, r.output
    written = r.stdout.split()
    assert any(w.endswith("loop_abs_circulation.svg") for w in written)
    assert all(open(w).read(200).lstrip().startswith("<?xml") for w in written)
    other = files["dir"] / "other.json"
    assert _mixture_audit(files, "--json", other, "--seed", 1).exit_code == 0
    r = cc("compare", report_file, other)
    assert r.exit_code == 0, r.output
    assert "loop · rotation — abs_circulation_ratio (median)" in r.stdout and "B / A" in r.stdout
    assert r.stdout.count("verdict pass") == 2


def test_transport_of_the_exact_score_moves_nothing(files):
    gm = _mixture()
    ref = files["dir"] / "mixture.json"
    ref.write_text(json.dumps({"means": gm.means.tolist(), "stds": [0.3, 0.3]}))
    out = files["dir"] / "transport.json"
    r = cc(
        "transport",
        "test_cli:mixture_probe",
        "--reference",
        f"mixture:{ref}",
        "--samples",
        16,
        "--steps",
        8,
        "--precision",
        "fp64",
        "--json",
        out,
    )
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    # The model is the reference's own score, so both flows are the same computation.
    assert data["paired_distance"] == 0 and data["sliced_wasserstein"] == 0 and data["loglik_gap"] == 0
    assert data["model"]["reference"] == "test_cli:mixture_probe" and "sliced_wasserstein" in r.stdout
    bad = cc("transport", "test_cli:mixture_probe", "--reference", "nonsense")
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1 and bad.stderr.startswith("error: ")


# -------------------------------------------------------------------------------- a real diffusers model


def test_tiny_diffusers_unet_end_to_end(ddpm_folder, tmp_path, single_thread):
    folder = ddpm_folder("linear", "epsilon")
    out1, out2 = tmp_path / "u1.json", tmp_path / "u2.json"
    args = [
        "audit",
        folder,
        "--paths",
        "rotation",
        "--curl",
        "none",
        "--time-indices",
        "10,500",
        "--samples",
        2,
        "--points",
        8,
        "--sampler-steps",
        4,
        "--cache-dir",
        tmp_path / "cache",
    ]
    r = cc(*args, "--json", out1)
    assert r.exit_code == 0, r.output
    data = json.loads(out1.read_text())
    jsonschema.validate(data, SCHEMA)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert data["model"]["adapter"] == "diffusers" and data["model"]["weights_sha256"] == sha256_file(weights)
    assert data["model"]["parameterization"] == "epsilon" and data["time_convention"]["num_steps"] == 1000
    assert [p["index"] for p in data["time_points"]] == [10, 500]
    assert data["data_source"]["kind"] == "model" and data["data_source"]["sampler"] == "dpmpp_2m"
    assert data["verdict"]["status"] in ("pass", "violation")
    r = cc(*args, "--json", out2)
    assert r.exit_code == 0 and "read from the cache" in r.stderr
    assert _without_run(out1) == _without_run(out2)  # the same x0, batches and threads: the same bits


# --------------------------------------------------------------------------------------- structure


def test_every_table_option_is_a_flag_of_the_audit_command():
    import typer

    command = typer.main.get_command(app).commands["audit"]
    flags = {opt for p in command.params for opt in p.opts}
    assert {o.flag for o in audit_options()} <= flags
    assert {"--json", "--csv", "--junit", "--fail-if"} <= flags
