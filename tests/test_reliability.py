"""Reliability: bad models, out-of-memory back-off, budgets, interruption and resume, atomic reports, and
sharded audits merged into the report of a single run.

Bad models are plain :class:`VectorFieldProbe` objects, or ``module:factory`` references to this module
(tests/ is put on the path of the subprocesses). Interruption tests run the real ``conservcheck audit``
command in a subprocess and stop it with SIGKILL or SIGINT once units are on disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from conftest import assert_reproducible
from typer.testing import CliRunner

import conservcheck
from conservcheck import OUProcess, VectorFieldProbe
from conservcheck.analytic.fields import GaussianMixture, LinearField
from conservcheck.cli.app import app
from conservcheck.contract import TIME_IGNORED
from conservcheck.diagnostics.loop_integral import loop_bytes_per_element, loop_chunk_elements
from conservcheck.errors import UsageError
from conservcheck.files import write_atomic
from conservcheck.runner.audit import audit
from conservcheck.runner.merge import merge

TESTS = Path(__file__).resolve().parent
SCHEMA = conservcheck.report_schema()
CLI = Path(sys.executable).with_name("conservcheck")
KAPPA = 0.7
#: Seconds each model call of :func:`slow_mixture` sleeps in a subprocess (CC_TEST_DELAY), so a kill lands mid-run.
DELAY_ENV = "CC_TEST_DELAY"


# ---------------------------------------------------------------------------------------- factories


def _mixture() -> GaussianMixture:
    return GaussianMixture(torch.tensor([[0.5, 0.0, -0.5], [-0.5, 0.3, 0.2]], dtype=torch.float64), 0.3)


def mixture_probe(device="cpu", dtype=torch.float64, **_) -> VectorFieldProbe:
    """The exact score of a two-component Gaussian mixture in D = 3 (conservative)."""
    return VectorFieldProbe(
        _mixture().score, process=OUProcess(), sample_shape=(3,), data_range=(-5.0, 5.0), device=device, dtype=dtype
    )


def slow_mixture(device="cpu", dtype=torch.float64, **_) -> VectorFieldProbe:
    """:func:`mixture_probe` sleeping $CC_TEST_DELAY seconds per call of more than 4 rows (the contract
    check's calls stay fast); the values do not depend on the delay."""
    gm, delay = _mixture(), float(os.environ.get(DELAY_ENV, "0"))

    def fn(x, t):
        if x.shape[0] > 4:
            time.sleep(delay)
        return gm.score(x, t)

    return VectorFieldProbe(
        fn, process=OUProcess(), sample_shape=(3,), data_range=(-5.0, 5.0), device=device, dtype=dtype
    )


def linear_probe(device="cpu", dtype=torch.float64, **_) -> VectorFieldProbe:
    """s(y, t) = (1 + t)(−I + K) y with K = κ [[0, 1], [−1, 0]]: not conservative, uses its time input."""
    lin = LinearField(
        -torch.eye(2, dtype=torch.float64), torch.tensor([[0.0, KAPPA], [-KAPPA, 0.0]], dtype=torch.float64)
    )
    return VectorFieldProbe(
        lambda x, t: lin(x) * (1 + t)[:, None], process=OUProcess(), sample_shape=(2,), device=device, dtype=dtype
    )


def nan_late_probe(device="cpu", dtype=torch.float64, **_) -> VectorFieldProbe:
    """−x (1 + t) for t ≤ 0.5, NaN after."""

    def fn(x, t):
        return torch.where((t > 0.5)[:, None], torch.full_like(x, torch.nan), -x * (1 + t)[:, None])

    return VectorFieldProbe(fn, process=OUProcess(), sample_shape=(2,), device=device, dtype=dtype)


def _probe(fn, dtype=torch.float64) -> VectorFieldProbe:
    return VectorFieldProbe(fn, process=OUProcess(), sample_shape=(2,), dtype=dtype)


def _good(x, t):
    return -x * (1 + t)[:, None]


# ------------------------------------------------------------------------------------------ helpers


runner = CliRunner()


def cc(*args):
    return runner.invoke(app, [str(a) for a in args])


def _comparable(report) -> dict:
    """The report's JSON without the documented ``run`` object (as written to a file)."""
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    data.pop("run")
    return data


def _without_run(path: Path) -> dict:
    data = json.loads(path.read_text())
    data.pop("run")
    return data


@pytest.fixture
def files(tmp_path):
    """A D = 2 x0 file (rows 0.1), a D = 3 mixture x0 file, and a cache folder."""
    np.save(tmp_path / "x2.npy", np.full((4, 2), 0.1))
    np.save(tmp_path / "mix.npy", _mixture().sample(4, torch.Generator().manual_seed(0)).numpy())
    return {
        "x2": str(tmp_path / "x2.npy"),
        "mix": str(tmp_path / "mix.npy"),
        "cache": str(tmp_path / "cache"),
        "dir": tmp_path,
    }


def _bad(fn, files, **kw):
    """A 2-D probe audited at t = 0.1 (clean side) and t = 1 (noisy side) with loops and the sub-Jacobian."""
    opts = dict(
        paths="rotation",
        curl="subjacobian",
        times=[0.1, 1.0],
        n_samples=4,
        n_points=16,
        data=files["x2"],
        cache_dir=files["cache"],
    )
    return audit(_probe(fn), **{**opts, **kw})


def _status(rep) -> dict[tuple[str, str, str], str]:
    return {(u["field"], f"{u['diagnostic']}.{u['variant']}", u["time_key"]): u["status"] for u in rep.units}


def _no_number_from_nan(rep) -> None:
    """Every statistic of a unit that did not finish cleanly is empty, in the table and in the JSON."""
    s = rep.summary(None)
    bad = s[s["status"] != "ok"]
    assert bad[["median", "q25", "q75", "mean", "ci_low", "ci_high"]].isna().all().all()
    for row in rep.to_dict()["summary"]:
        if row["status"] != "ok":
            assert all(row[k] is None for k in ("n", "median", "q25", "q75", "mean", "ci_low", "ci_high"))
    for c in rep.verdict.checks:
        if c["status"] == "invalid":
            assert c["median"] is None and c["ratio"] is None


# ------------------------------------------------------------------------------------------ bad models


def test_nan_everywhere_is_invalid_and_computes_nothing(files):
    rep = _bad(lambda x, t: torch.full_like(x, torch.nan), files)
    assert rep.verdict.status == "invalid"
    assert rep.verdict.reason.startswith(
        "model output has NaN/Inf at t = 0.001252, 0.1438, 1.164 "
        "(check the weights and the precision; try --precision fp32)"
    )
    st = _status(rep)
    assert [st[("model", "loop.rotation", k)] for k in ("t0.1", "t1")] == ["nonfinite", "nonfinite"]
    assert [st[("model", "curl.subjacobian", k)] for k in ("t0.1", "t1")] == ["error", "error"]
    assert {st[k] for k in st if k[0] == "control"} == {"ok"}  # the floor is still measured
    assert (
        "loop.rotation (model) at t=1: NaN/Inf values in 4 of 4 samples (the model's output is not finite there)"
        in rep.header["problems"]
    )
    assert (
        "curl.subjacobian (model) at t=0.1: the field is not finite near the Jacobian check points"
        in rep.header["problems"]
    )
    assert rep.summary()["median"].isna().all() and rep.summary("control")["median"].notna().all()
    assert {c["status"] for c in rep.verdict.checks} == {"invalid"}
    _no_number_from_nan(rep)


def test_nan_only_at_late_times_is_reported_per_time_point(files):
    rep = _bad(lambda x, t: torch.where((t > 0.5)[:, None], torch.full_like(x, torch.nan), _good(x, t)), files)
    st = _status(rep)
    assert st[("model", "loop.rotation", "t0.1")] == "ok" and st[("model", "curl.subjacobian", "t0.1")] == "ok"
    assert st[("model", "loop.rotation", "t1")] == "nonfinite" and st[("model", "curl.subjacobian", "t1")] == "error"
    s = rep.summary()
    assert s[s["time_key"] == "t0.1"]["median"].notna().all() and s[s["time_key"] == "t1"]["median"].isna().all()
    checks = {(c["variant"], c["time_key"]): c for c in rep.verdict.checks}
    # −x(1 + t) is a gradient: the clean-side checks are numbers (and pass), the NaN side is invalid.
    assert checks[("rotation", "t0.1")]["status"] == "pass" and checks[("rotation", "t1")]["status"] == "invalid"
    assert rep.verdict.status == "invalid"
    assert rep.verdict.reason == (
        "model output has NaN/Inf at t = 1.164 (check the weights and the precision; try --precision fp32) (+2 more)"
    )
    _no_number_from_nan(rep)


def test_inf_in_some_samples_empties_the_whole_unit(files):
    """Inf for the samples with x₁ > 0.3 only: the other samples' values are finite, but statistics over a
    subset would be biased by which samples failed, so the unit's statistics are all empty."""
    rep = _bad(
        lambda x, t: torch.where(x[:, 1:] > 0.3, torch.full_like(x, torch.inf), _good(x, t)),
        files,
        curl="none",
        times=[1.0],
    )
    (unit,) = [u for u in rep.units if u["field"] == "model"]
    assert unit["status"] == "nonfinite" and unit["message"].startswith("NaN/Inf values in ")
    n_bad = int(unit["message"].split()[3])
    assert 0 < n_bad < 4  # some loops stayed below x₁ = 0.3
    rows = rep.rows[rep.rows["field"] == "model"]
    assert np.isfinite(rows["abs_circulation_ratio"]).sum() == 4 - n_bad  # per-sample rows keep what was finite
    _no_number_from_nan(rep)
    assert rep.verdict.status == "invalid"


def test_wrong_output_shape(files):
    rep = _bad(lambda x, t: x[:, :1] * t[:, None], files)
    assert rep.verdict.status == "invalid"
    assert rep.verdict.reason.startswith(
        "model output has shape (4, 1), expected (4, 2) (the wrapped callable must return one vector per input sample)"
    )
    assert {s for (f, _, _), s in _status(rep).items() if f == "model"} == {"error"}
    assert {s for (f, _, _), s in _status(rep).items() if f == "control"} == {"ok"}
    _no_number_from_nan(rep)


def test_exact_time_independent_score_is_valid(files):
    """The exact score of N(0, I) under the OU process is −x at every time: time independence is its exact
    answer, not a broken contract — the audit measures it and passes it, without a remark."""
    rep = _bad(lambda x, t: -x, files)
    assert rep.verdict.status == "pass" and rep.header["warnings"] == []
    assert {s for s in _status(rep).values()} == {"ok"}


def test_epsilon_network_ignoring_time_is_measured_with_a_warning(files):
    """An ε-network that ignores its time input gives a score −ε̂(x)/σ(t) that does change with t, so the
    old check on the score let it pass unremarked; the check on the network's own output warns, the report
    records the warning, and the diagnostics still measure the field (a warning never makes it invalid)."""
    probe = VectorFieldProbe(
        lambda x, t: 0.5 * x, process=OUProcess(), sample_shape=(2,), parameterization="epsilon", dtype=torch.float64
    )
    rep = audit(
        probe,
        paths="rotation",
        curl="subjacobian",
        times=[0.1, 1.0],
        n_samples=4,
        n_points=16,
        data=files["x2"],
        cache_dir=files["cache"],
    )
    assert rep.header["warnings"] == [TIME_IGNORED] and rep.header["problems"] == []
    assert rep.verdict.status == "pass"  # −0.5x/σ(t) is a gradient at every t


def test_zero_field_is_finite_and_passes(files):
    """A zero field is exactly conservative: its circulation ratio and curl are 0 (0/0 is no circulation),
    not "not finite"."""
    rep = _bad(lambda x, t: torch.zeros_like(x), files)
    assert {s for s in _status(rep).values()} == {"ok"}
    assert rep.summary().query("metric == 'abs_circulation_ratio' or metric == 'curl_rel_fro'")["median"].eq(0).all()
    assert rep.verdict.status == "pass" and rep.header["problems"] == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), ZeroDivisionError("boom"), AssertionError("boom")])
def test_model_raising_at_some_times(files, error):
    def fn(x, t):
        if bool((t > 0.5).any()):
            raise error
        return _good(x, t)

    rep = _bad(fn, files)
    name = type(error).__name__
    assert rep.verdict.status == "invalid"
    assert rep.verdict.reason == (
        f"model raised {name} at t = 1.164: boom (run the model on its own at that time to debug it) (+2 more)"
    )
    st = _status(rep)
    assert st[("model", "loop.rotation", "t0.1")] == "ok" and st[("model", "curl.subjacobian", "t0.1")] == "ok"
    assert st[("model", "loop.rotation", "t1")] == "error"
    assert f"loop.rotation (model) at t=1: {name}: boom" in rep.header["problems"]
    assert rep.summary().query("time_key == 't0.1'")["median"].notna().all()
    _no_number_from_nan(rep)


def test_model_failing_while_drawing_x0(files):
    def fn(x, t):
        if bool((t > 0.5).any()):
            raise RuntimeError("boom")
        return _good(x, t)

    rep = audit(
        _probe(fn),
        paths="rotation",
        curl="none",
        times=[0.1],
        n_samples=2,
        n_points=8,
        sampler_steps=4,
        cache_dir=files["cache"],
    )
    assert rep.verdict.status == "invalid" and rep.units == []
    assert rep.header["data_source"]["error"] == (
        "sampling x0 from the model failed: RuntimeError: boom (pass clean samples with --data)"
    )


def test_bad_model_on_the_command_line_exits_0_and_gates_fail_closed(files):
    args = [
        "audit",
        "test_reliability:nan_late_probe",
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
        files["x2"],
        "--cache-dir",
        files["cache"],
    ]
    out = files["dir"] / "bad.json"
    r = cc(*args, "--json", out)
    assert r.exit_code == 0, r.output
    assert "verdict: invalid: model output has NaN/Inf at t = 1.164" in r.stdout
    assert "problem: loop.rotation (model) at t=1: NaN/Inf values in 4 of 4 samples" in r.stdout
    data = json.loads(out.read_text())  # valid JSON: NaN is written as null, never as a bare NaN
    assert all(row["median"] is None for row in data["summary"] if row["time_key"] == "t1" and row["field"] == "model")
    gate = cc(*args, "--fail-if", "loop.rotation.abs_circulation_ratio.median > 0.5")
    assert gate.exit_code == 1 and "gate FAIL" in gate.stdout  # an empty statistic holds: the gate fails closed


# ------------------------------------------------------------------------------------- out of memory


def test_out_of_memory_halves_the_batch_and_changes_no_number(files, torch_threads):
    """A model that runs out of memory above 8 rows: the audit backs off to 8 and gives the numbers of a
    run with batch size 8; one that runs out of memory even for one row is an error at that unit."""
    seen: list[int] = []

    def fn(x, t, limit=8):
        seen.append(x.shape[0])
        if x.shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return _good(x, t)

    kw = dict(curl="subjacobian", block=2)
    backed_off = _bad(fn, files, batch_size=64, **kw)
    first = seen.index(64)  # the first call through the batcher (the contract check's calls come before)
    assert seen[first : first + 4] == [64, 32, 16, 8]  # halved until it fits
    assert max(seen[first + 3 :]) == 8  # and kept for the rest of the audit
    # The failed chunk is retried from its start at 32, 16, then 8 rows, and 8 is kept: every call that
    # returned saw the rows a batch-size-8 run gives it, so the numbers are the same bits.
    assert _comparable(backed_off) == _comparable(_bad(_good, files, batch_size=8, **kw))
    assert backed_off.verdict.status == "pass"

    rep = _bad(lambda x, t: fn(x, t, limit=0) if bool((t > 0.5).any()) else _good(x, t), files, batch_size=4)
    assert _status(rep)[("model", "loop.rotation", "t1")] == "error"
    assert (
        "loop.rotation (model) at t=1: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
        in rep.header["problems"]
    )
    assert rep.verdict.status == "invalid"


# ------------------------------------------------------------------------------------------ budgets


def test_memory_budget_bounds_the_loops_held_at_once_and_changes_no_number(files, torch_threads):
    # Peak bytes per loop node component: float64 geometry and sums (5 × 8) + scores (+ their float64 copy).
    assert loop_bytes_per_element(torch.float64) == 48 and loop_bytes_per_element(torch.float32) == 52
    assert loop_chunk_elements(4096, torch.float64) == 85 and loop_chunk_elements(4096, torch.float32) == 78
    calls: list[int] = []
    gm = _mixture()

    def fn(x, t):
        if bool((t == 0.5).all()):  # the loops' calls (the contract check and the plan's timing run elsewhere)
            calls.append(x.shape[0])
        return gm.score(x, t)

    probe = VectorFieldProbe(fn, process=OUProcess(), sample_shape=(3,), data_range=(-5.0, 5.0), dtype=torch.float64)
    kw = dict(
        paths="rotation",
        curl="none",
        times=[0.5],
        n_samples=4,
        n_points=16,
        data=files["mix"],
        cache_dir=files["cache"],
        batch_size=10**6,
    )
    full = audit(probe, **kw)
    assert max(calls) == 4 * 16  # all four 16-node loops in one call
    calls.clear()
    # 7 KB / 48 bytes = 149 components = 3 loops of 16 nodes × D = 3 (48 components each) at a time.
    small = audit(probe, memory_budget="7KB", **kw)
    assert sorted(c for c in calls if c > 4) == [16, 48]  # chunks of 3 and 1 loops (contract calls have 4 rows)
    # Other model batches (48 and 16 rows instead of 64) may round differently: the float64
    # reproducibility tolerance (docs/report.md#reproducibility).
    assert_reproducible(_comparable(full), _comparable(small), "fp64")
    assert small.run["options"]["memory_budget"] == 7 * 1024


def test_time_budget_skips_units_and_resume_completes_them(files):
    """The progress callback (called after each unit) sleeps past the deadline after the first group, so
    the remaining units are skipped deterministically."""
    budget = 1.5

    def stall(done, total, text):
        if text.startswith("loop.rotation control t0.1"):
            time.sleep(budget + 0.1)

    # 32 nodes: at 16 the periodic rule has not converged at t = 0.1 and the check is not resolved.
    kw = dict(paths="rotation", curl="none", times=[0.1, 1.0], n_samples=4, n_points=32, cache_dir=files["cache"])
    journal = files["dir"] / "budget.jsonl"
    # Conservative model: the measured check passes, yet an incomplete audit must not read as pass.
    part = audit(mixture_probe(), data=files["mix"], time_budget=budget, resume=str(journal), progress=stall, **kw)
    assert [u["status"] for u in part.units] == ["ok", "ok", "skipped", "skipped"]
    assert part.header["complete"] is False and part.verdict.status == "invalid"
    jsonschema.validate(json.loads(json.dumps(part.to_dict(), allow_nan=False)), SCHEMA)
    assert part.verdict.reason.startswith(
        "incomplete: 2 of 4 units not run (time budget exhausted — run again with --resume to finish), "
        "unmeasured: loop.rotation at t=1; the 1 measured checks are within 10× the numerical floor (largest "
    )
    assert [c["status"] for c in part.verdict.checks] == ["pass", "skipped"]
    resumed = audit(mixture_probe(), data=files["mix"], resume=str(journal), **kw)
    fresh = audit(mixture_probe(), data=files["mix"], **kw)
    assert resumed.run["units_reused"] == 2 and resumed.verdict.status == "pass"
    assert _comparable(resumed) == _comparable(fresh)
    # A violation found before the deadline is reported as one, with what was left unmeasured.
    lin = audit(linear_probe(), data=files["x2"], time_budget=budget, progress=stall, **kw)
    assert lin.verdict.status == "violation"
    assert lin.verdict.reason.endswith(
        "(1 of 1 checks above 10×); incomplete: 2 of 4 units not run (time budget "
        "exhausted — run again with --resume to finish), unmeasured: loop.rotation at t=1"
    )


def test_a_skipped_control_leaves_its_check_unmeasured(files):
    """The deadline passes between a model unit and its control: without its floor the check is skipped."""

    def stall(done, total, text):
        if text.startswith("loop.rotation model t0.1"):
            time.sleep(1.1)

    rep = audit(
        linear_probe(),
        paths="rotation",
        curl="none",
        times=[0.1],
        n_samples=4,
        n_points=16,
        data=files["x2"],
        cache_dir=files["cache"],
        time_budget=1.0,
        progress=stall,
    )
    assert [u["status"] for u in rep.units] == ["ok", "skipped"] and rep.verdict.checks[0]["status"] == "skipped"
    assert rep.verdict.status == "invalid"
    assert rep.verdict.reason == (
        "incomplete: 1 of 2 units not run (time budget exhausted — run again with --resume "
        "to finish), unmeasured: loop.rotation at t=0.1"
    )


# ---------------------------------------------------------------------------------- journals, atomic files


def test_torn_last_line_is_tolerated_and_cut_off(files):
    kw = dict(
        paths="rotation,brownian",
        curl="none",
        times=[0.2, 1.0],
        n_samples=4,
        n_points=16,
        data=files["mix"],
        cache_dir=files["cache"],
    )
    journal = files["dir"] / "torn.jsonl"
    calls = []

    def interrupt(done, total, text):
        calls.append(text)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        audit(mixture_probe(), resume=str(journal), progress=interrupt, **kw)
    with open(journal, "a") as f:
        f.write('{"key": "model/loop/brownian/t0.2", "field": "mo')  # the kill landed mid-write
    resumed = audit(mixture_probe(), resume=str(journal), **kw)
    assert resumed.run["units_reused"] == 3
    lines = journal.read_text().splitlines()
    assert len(lines) == 1 + 8 and all(json.loads(line) for line in lines)  # head + 8 whole units
    assert _comparable(resumed) == _comparable(audit(mixture_probe(), **kw))


def test_journal_mistakes_are_usage_errors(files, tmp_path):
    kw = dict(
        paths="rotation", curl="none", times=[0.5], n_samples=2, n_points=8, data=files["mix"], cache_dir=files["cache"]
    )
    other = tmp_path / "other.txt"
    other.write_text("hello\n")
    with pytest.raises(
        UsageError, match=r"other.txt is not a conservcheck partial-results file \(pass the file an audit wrote\)"
    ):
        audit(mixture_probe(), resume=str(other), **kw)
    with pytest.raises(UsageError, match=r"no partial-results file .*nope.jsonl \(pass the file an audit wrote"):
        merge([tmp_path / "nope.jsonl"])


def test_reports_are_written_atomically(files):
    """A write that fails half-way (here: text that cannot be encoded, after part of it was written)
    leaves the existing report untouched and no temporary file behind."""
    out = files["dir"] / "report.json"
    rep = audit(
        mixture_probe(),
        paths="rotation",
        curl="none",
        times=[0.5],
        n_samples=2,
        n_points=32,
        data=files["mix"],
        cache_dir=files["cache"],
    )
    rep.to_json(out)
    before = out.read_bytes()
    with pytest.raises(UnicodeEncodeError):
        write_atomic(out, "x" * 1_000_000 + "\ud800")
    assert out.read_bytes() == before and json.loads(before)["verdict"]["status"] == "pass"
    assert sorted(p.name for p in files["dir"].iterdir() if p.name.startswith(".report.json")) == []


# ------------------------------------------------------------------------------- interruption (subprocess)


ARGS = [
    "test_reliability:slow_mixture",
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
]


def _spawn(files, *extra, delay: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(TESTS), DELAY_ENV: str(delay)}
    cmd = [str(CLI), "audit", *map(str, ARGS), "--data", files["mix"], "--cache-dir", files["cache"], *map(str, extra)]
    # SIGINT at its default, whatever the parent ignores, so Python turns it into KeyboardInterrupt.
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for_units(journal: Path, proc: subprocess.Popen, n: int, timeout: float = 60.0) -> None:
    """Wait until ``n`` whole unit lines are in the journal (head line not counted)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if journal.exists() and journal.read_text().count("\n") >= 1 + n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the audit wrote no units in time")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """x0 and cache shared by the subprocess audits (the data path is part of the report), and the JSON
    report (without ``run``) of the audit run to the end."""
    d = tmp_path_factory.mktemp("interrupt")
    np.save(d / "mix.npy", _mixture().sample(4, torch.Generator().manual_seed(0)).numpy())
    files = {"mix": str(d / "mix.npy"), "cache": str(d / "cache")}
    proc = _spawn(files, "--json", d / "fresh.json")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return files, _without_run(d / "fresh.json")


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_report(shared, tmp_path):
    files, uninterrupted = shared
    journal, out = tmp_path / "killed.jsonl", tmp_path / "resumed.json"
    proc = _spawn(files, "--resume", journal, delay=0.15)
    _wait_for_units(journal, proc, 3)
    proc.kill()
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    n_saved = journal.read_text().count("\n") - 1
    assert 3 <= n_saved < 12
    resumed = _spawn(files, "--resume", journal, "--json", out)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert f"({n_saved} finished units reused)" in err
    assert _without_run(out) == uninterrupted


def test_sigint_exits_130_naming_the_resume_file_then_resume_gives_the_same_report(shared, tmp_path):
    files, uninterrupted = shared
    journal, out = tmp_path / "stopped.jsonl", tmp_path / "resumed.json"
    proc = _spawn(files, "--resume", journal, delay=0.15)
    _wait_for_units(journal, proc, 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    n_saved = journal.read_text().count("\n") - 1
    assert err.strip().splitlines()[-1] == (
        f"error: interrupted; {n_saved} finished units are saved — resume with --resume {journal}"
    )
    resumed = _spawn(files, "--resume", journal, "--json", out)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert f"({n_saved} finished units reused)" in err
    assert _without_run(out) == uninterrupted


# ------------------------------------------------------------------------------------------- shards


def _shard_kw(files):
    return dict(
        paths="rotation,projection",
        curl="subjacobian",
        block=2,
        times=[0.2, 1.0],
        n_samples=4,
        n_points=16,
        data=files["mix"],
        cache_dir=files["cache"],
        precision="fp64",
    )


def test_shards_merge_to_the_single_run_report(files, torch_threads):
    kw = _shard_kw(files)
    single = audit(mixture_probe(), **kw)
    paths = [files["dir"] / f"s{i}.jsonl" for i in range(3)]
    parts = [audit(mixture_probe(), shard=f"{i}/3", resume=str(p), **kw) for i, p in enumerate(paths)]
    # 6 groups (3 diagnostics × 2 times), each a model unit and its control: shard i runs groups i, i + 3.
    for part in parts:
        ran = [u for u in part.units if u["status"] != "skipped"]
        assert len(ran) == 4 and part.verdict.status == "invalid" and part.header["complete"] is False
        assert "left to the other shards — combine their files with conservcheck merge" in part.verdict.reason
    merged = merge(paths)
    # Units are whole per shard and run with the same batch size: the single run's bits, not a tolerance.
    assert _comparable(merged) == _comparable(single) and merged.verdict.status == "pass"
    for rep in (*parts, merged):
        jsonschema.validate(json.loads(json.dumps(rep.to_dict(), allow_nan=False)), SCHEMA)
    assert [m["units"] for m in merged.run["merged_from"]] == [4, 4, 4]
    assert _comparable(merge([paths[2], paths[0], paths[1]])) == _comparable(single)


def test_merged_report_of_a_bad_model_keeps_its_problems(files, torch_threads):
    kw = dict(
        paths="rotation",
        curl="subjacobian",
        block=2,
        times=[0.1, 1.0],
        n_samples=4,
        n_points=16,
        data=files["x2"],
        cache_dir=files["cache"],
    )
    single = audit(nan_late_probe(), **kw)
    paths = [files["dir"] / f"n{i}.jsonl" for i in range(2)]
    for i, p in enumerate(paths):
        audit(nan_late_probe(), shard=f"{i}/2", resume=str(p), **kw)
    merged = merge(paths)
    assert merged.verdict.status == "invalid" and merged.verdict.reason == single.verdict.reason
    assert merged.header["problems"][0].startswith("model output has NaN/Inf at t = 1.164")
    assert _comparable(merged) == _comparable(single)


def test_merge_names_the_missing_shard_and_the_fix(files):
    kw = _shard_kw(files)
    p0, p1 = files["dir"] / "a.jsonl", files["dir"] / "b.jsonl"
    audit(mixture_probe(), shard="0/2", resume=str(p0), **kw)
    with pytest.raises(UsageError) as err:
        merge([p0])
    assert str(err.value) == (
        "the files hold 6 of the audit's 12 units; missing 6 (model/loop/projection/t0.2, "
        "control/loop/projection/t0.2, model/loop/rotation/t1, …) of shard 1/2 (rerun that shard with the same "
        "options and --shard 1/2 --resume <shard 1 file>, then merge again)"
    )
    audit(mixture_probe(), shard="1/2", resume=str(p1), **{**kw, "seed": 1})
    with pytest.raises(
        UsageError,
        match=r"b.jsonl and .*a.jsonl hold partial results of different audits "
        r"\(options.seed: 0 vs 1\)",
    ):
        merge([p0, p1])


def test_shards_draw_identical_x0_from_the_model(files, tmp_path, torch_threads):
    """x0 drawn from the model is deterministic: shards with separate caches (different machines) draw
    the same bits, so their files share a fingerprint and merge to the single run's report."""
    kw = dict(paths="rotation", curl="none", times=[0.3, 1.0], n_samples=4, n_points=16, sampler_steps=8)
    single = audit(mixture_probe(), cache_dir=str(tmp_path / "c"), **kw)
    paths = [tmp_path / f"x{i}.jsonl" for i in range(2)]
    for i, p in enumerate(paths):
        audit(mixture_probe(), shard=f"{i}/2", resume=str(p), cache_dir=str(tmp_path / f"c{i}"), **kw)
    merged = merge(paths)
    assert merged.header["data_source"]["sha256"] == single.header["data_source"]["sha256"]
    assert _comparable(merged) == _comparable(single)


def test_shards_on_the_command_line(files):
    args = [
        "audit",
        "test_reliability:mixture_probe",
        "--paths",
        "rotation",
        "--curl",
        "subjacobian",
        "--block",
        2,
        "--times",
        "0.2,1",
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
    single, merged = files["dir"] / "single.json", files["dir"] / "merged.json"
    assert cc(*args, "--json", single).exit_code == 0
    r0 = cc(*args, "--shard", "0/2")  # default file: in the cache folder, named after the shard
    assert r0.exit_code == 0, r0.output
    (p0,) = Path(files["cache"]).rglob("*.shard0of2.jsonl")
    assert f"shard 0/2: 4 of 8 units are in {p0}" in r0.stderr  # groups 0 and 2: model + control each
    assert "verdict: invalid: incomplete: 4 of 8 units not run (left to the other shards" in r0.stdout
    p1 = files["dir"] / "shard1.jsonl"
    assert cc(*args, "--shard", "1/2", "--resume", p1).exit_code == 0
    missing = cc("merge", p0)
    assert missing.exit_code == 2
    assert missing.stderr.strip().endswith(
        "of shard 1/2 (rerun that shard with the same options and --shard 1/2 --resume <shard 1 "
        "file>, then merge again)"
    )
    r = cc("merge", p0, p1, "--json", merged)
    assert r.exit_code == 0, r.output
    assert "verdict: pass" in r.stdout
    assert _without_run(merged) == _without_run(single)
    bad = cc(*args, "--shard", "2/2")
    assert bad.exit_code == 2
    assert bad.stderr.strip() == (
        "error: --shard: expected i/n with 0 ≤ i < n, such as 0/4, got '2/2' "
        "(number the shards of an n-way split 0/n … (n-1)/n)"
    )


def test_interrupted_shard_names_its_shard_in_the_resume_command(files):
    def interrupt(done, total, text):
        raise KeyboardInterrupt

    from conservcheck.runner.audit import AuditInterrupted

    journal = files["dir"] / "s.jsonl"
    with pytest.raises(AuditInterrupted) as stop:
        audit(mixture_probe(), shard="1/2", resume=str(journal), progress=interrupt, **_shard_kw(files))
    assert stop.value.resume_flags == f"--shard 1/2 --resume {journal}" and stop.value.n_done == 1
