"""Each case of the second reliability pass, reproduced: finished work never lost, nothing silently wrong,
verdicts judged against the floor of the method actually used, and exit codes that CI can trust.

The bad-input matrix (every command against forged and unreadable files, aliased outputs, bad options) is
tests/test_adversarial.py; this module holds the cases that need more than one command line: interrupted
and resumed audits, concurrent runs, full disks, changed models, the numbers behind a verdict, closed pipes.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conservcheck import DiscreteSchedule, OUProcess, VectorFieldProbe
from conservcheck.analytic.fields import GaussianMixture, LinearField
from conservcheck.cli.app import app
from conservcheck.errors import UsageError
from conservcheck.files import try_lock, write_atomic
from conservcheck.report.audit_report import AuditReport
from conservcheck.runner.audit import AuditInterrupted, audit
from conservcheck.runner.merge import merge
from conservcheck.x0.data import load_data

TESTS = Path(__file__).resolve().parent
CLI = Path(sys.executable).with_name("conservcheck")
runner = CliRunner()

# ---------------------------------------------------------------------------------------- factories


def _mixture(shift: float = 0.0) -> GaussianMixture:
    return GaussianMixture(torch.tensor([[0.5 + shift, 0.0, -0.5], [-0.5, 0.3, 0.2]], dtype=torch.float64), 0.3)


def mixture(device="cpu", dtype=torch.float64, **_) -> VectorFieldProbe:
    """The exact score of a Gaussian mixture in D = 3; ``CC_MIX_SHIFT`` moves one mean (other weights,
    same code: the factory's identity is then only in the weights it returns)."""
    gm = _mixture(float(os.environ.get("CC_MIX_SHIFT", "0")))
    return VectorFieldProbe(
        gm.score, process=OUProcess(), sample_shape=(3,), data_range=(-5.0, 5.0), device=device, dtype=dtype
    )


def linear(device="cpu", dtype=torch.float64, **_) -> VectorFieldProbe:
    """s(y, t) = (1 + t)(−I + K) y, K = 0.7 [[0, 1], [−1, 0]]: not conservative."""
    lin = LinearField(-torch.eye(2, dtype=torch.float64), torch.tensor([[0.0, 0.7], [-0.7, 0.0]], dtype=torch.float64))
    return VectorFieldProbe(
        lambda x, t: lin(x) * (1 + t)[:, None], process=OUProcess(), sample_shape=(2,), device=device, dtype=dtype
    )


def exits_in_forward(device="cpu", dtype=torch.float64, **_) -> VectorFieldProbe:
    """A model that calls sys.exit() in its forward pass after t = 0.5."""
    gm = _mixture()

    def fn(x, t):
        if bool((t > 0.5).any()):
            sys.exit(0)
        return gm.score(x, t)

    return VectorFieldProbe(
        fn, process=OUProcess(), sample_shape=(3,), data_range=(-5.0, 5.0), device=device, dtype=dtype
    )


D_ENERGY = 16


def _energy_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(D_ENERGY + 1, 32), torch.nn.SiLU(), torch.nn.Linear(32, 1))
    return net.eval().requires_grad_(False)


def energy(device="cpu", dtype=torch.float32, **_) -> VectorFieldProbe:
    """s = −∇E exactly (a conservative field), with the gradient taken without ``create_graph``: autodiff of
    the score is not available, so the audit falls back to finite differences."""
    net = _energy_net(0)

    def fn(x, t):
        with torch.enable_grad():
            y = x.detach().requires_grad_(True)
            e = net(torch.cat([y, t[:, None].to(y.dtype)], 1)).sum() + 0.5 * (y**2).sum()
            (g,) = torch.autograd.grad(e, y)
        return -g

    return VectorFieldProbe(fn, process=OUProcess(), sample_shape=(D_ENERGY,), dtype=dtype)


def unconstrained(device="cpu", dtype=torch.float32, **_) -> VectorFieldProbe:
    """An MLP field (not a gradient) evaluated without autograd: finite differences too."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(D_ENERGY + 1, 32), torch.nn.SiLU(), torch.nn.Linear(32, D_ENERGY))
    net = net.eval().requires_grad_(False)

    def fn(x, t):
        with torch.no_grad():
            return net(torch.cat([x.detach(), t[:, None].to(x.dtype)], 1)) - x.detach()

    return VectorFieldProbe(fn, process=OUProcess(), sample_shape=(D_ENERGY,), dtype=dtype)


# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture
def files(tmp_path):
    np.save(tmp_path / "mix.npy", _mixture().sample(4, torch.Generator().manual_seed(0)).numpy())
    np.save(tmp_path / "x2.npy", np.full((4, 2), 0.1))
    return {"mix": str(tmp_path / "mix.npy"), "x2": str(tmp_path / "x2.npy"), "cache": str(tmp_path / "cache")}


KW = dict(paths="rotation", curl="subjacobian", block=2, times=[0.2, 1.0], n_samples=4, n_points=16, precision="fp64")
ARGS = ["--paths", "rotation", "--curl", "subjacobian", "--block", "2", "--times", "0.2,1", "--samples", "4"]
ARGS += ["--points", "16", "--precision", "fp64"]


def cc(*args):
    return runner.invoke(app, [str(a) for a in args])


def _interrupt_after(n: int):
    calls: list[str] = []

    def progress(done, total, text):
        calls.append(text)
        if len(calls) == n:
            raise KeyboardInterrupt

    return progress


def _without_run(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    data.pop("run")
    return data


# ---------------------------------------------------------------------------------------- lost work


def test_a_failed_report_write_keeps_the_finished_work_and_names_it(files, tmp_path, monkeypatch):
    """On a full disk the report cannot be written: the default partial-results file is not deleted, the
    one line names it, and resuming from it writes the report of an uninterrupted run."""
    out = tmp_path / "r.json"
    args = ["audit", "test_safeguards:mixture", *ARGS, "--data", files["mix"], "--cache-dir", files["cache"]]

    def full_disk(self, path="-", inline_rows=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with monkeypatch.context() as m:
        m.setattr(AuditReport, "to_json", full_disk)
        r = cc(*args, "--json", out, "-q")
    assert r.exit_code == 2
    (journal,) = Path(files["cache"]).rglob("runs/*.jsonl")
    assert r.stderr.strip() == (
        f"error: cannot write {out}: No space left on device; the finished units are kept in {journal} "
        f"(free space or choose another path, then run again with --resume {journal})"
    )
    resumed = cc(*args, "--json", out, "--resume", journal)
    assert resumed.exit_code == 0 and "(8 finished units reused)" in resumed.stderr
    fresh = cc(*args, "--json", tmp_path / "fresh.json")
    assert fresh.exit_code == 0
    assert _without_run(out) == _without_run(tmp_path / "fresh.json")
    # Written successfully, the default file of a complete audit is removed (resume files are kept).
    assert sorted(Path(files["cache"]).rglob("runs/*.jsonl")) == [journal]


def test_an_output_that_cannot_be_written_is_refused_before_any_work(files):
    r = cc(
        "audit",
        "test_safeguards:mixture",
        *ARGS,
        "--data",
        files["mix"],
        "--cache-dir",
        files["cache"],
        "--json",
        "/proc/r.json",
    )
    assert r.exit_code == 2 and r.stderr.startswith("error: cannot write /proc/r.json: ")
    assert not Path(files["cache"]).exists()  # nothing ran, nothing was written


def test_running_again_without_resume_never_truncates_the_saved_journal(files):
    """Each run writes its own default file: a second interrupted run leaves the first one's units intact."""
    kw = {**KW, "data": files["mix"], "cache_dir": files["cache"]}
    paths = []
    for n in (5, 3):
        with pytest.raises(AuditInterrupted) as stop:
            audit("test_safeguards:mixture", progress=_interrupt_after(n), **kw)
        paths.append(stop.value.partial_path)
    first, second = paths
    assert first != second and first.parent == second.parent
    assert len(first.read_text().splitlines()) == 1 + 5 and len(second.read_text().splitlines()) == 1 + 3
    resumed = audit("test_safeguards:mixture", resume=str(first), **kw)
    assert resumed.run["units_reused"] == 5 and resumed.verdict.status == "pass"


def test_two_identical_audits_at_once_write_their_own_files(files):
    """Two identical audits started together shared one default file and interleaved their lines; each now
    writes its own (the fingerprint, the start time, the process and a random token name it), and both
    finish with the same report. Threads of one process share the process id, so only the token tells the
    files apart. (Loops only: torch's forward-mode AD keeps global state, and two curl checks racing in one
    process can see each other's AD levels; docs/api.md says to run concurrent audits as processes.)"""
    kw = {**KW, "curl": "none", "data": files["mix"], "cache_dir": files["cache"]}
    start = threading.Barrier(2)
    results: list[Any] = [None, None]

    def run(i: int) -> None:
        start.wait()
        results[i] = audit("test_safeguards:mixture", keep_partial_results=True, **kw)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    a, b = results
    assert a is not None and b is not None
    assert a.run["partial_results"] != b.run["partial_results"]
    assert a.to_dict()["units"] == b.to_dict()["units"] and a.verdict.status == b.verdict.status == "pass"
    for rep in (a, b):
        assert audit("test_safeguards:mixture", resume=rep.run["partial_results"], **kw).run["units_reused"] == len(
            rep.to_dict()["units"]
        )


def test_a_journal_in_use_is_refused(files, tmp_path):
    """Two audits resuming one file at once would interleave their lines: the second is refused while the
    first holds the file's lock, and can go on once it is released."""
    kw = {**KW, "data": files["mix"], "cache_dir": files["cache"]}
    journal = tmp_path / "j.jsonl"
    with pytest.raises(AuditInterrupted):
        audit("test_safeguards:mixture", resume=str(journal), progress=_interrupt_after(2), **kw)
    fd = os.open(journal, os.O_RDONLY)
    try:
        assert try_lock(fd)  # another audit holds it
        with pytest.raises(UsageError) as err:
            audit("test_safeguards:mixture", resume=str(journal), **kw)
        assert str(err.value) == (
            f"{journal} is in use by another conservcheck audit (wait for that audit to finish, or resume from a "
            "copy of the file)"
        )
    finally:
        os.close(fd)
    assert audit("test_safeguards:mixture", resume=str(journal), **kw).run["units_reused"] == 2


def test_merge_leaves_its_input_files_as_they_are(files, tmp_path):
    """A shard still writing its file may leave a torn last line: merge reads it, never cuts it off."""
    kw = {**KW, "data": files["mix"], "cache_dir": files["cache"]}
    paths = [tmp_path / f"s{i}.jsonl" for i in range(2)]
    for i, p in enumerate(paths):
        audit("test_safeguards:mixture", shard=f"{i}/2", resume=str(p), **kw)
    with open(paths[1], "a") as f:
        f.write('{"record": {"key": "model/lo')
    before = [p.read_bytes() for p in paths]
    rep = merge(paths)
    assert rep.verdict.status == "pass" and [p.read_bytes() for p in paths] == before


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_umask_permissions(files, tmp_path, umask, mode):
    """Reports, rows files, figures' neighbours and partial-results files: 0666 less the umask, as a plain
    open() gives (a shared results folder or a CI artefact upload can read them)."""
    old = os.umask(umask)
    try:
        rep = audit(
            "test_safeguards:mixture",
            resume=str(tmp_path / "j.jsonl"),
            data=files["mix"],
            cache_dir=files["cache"],
            **KW,
        )
        rep.to_json(tmp_path / "r.json")
        rep.to_json(tmp_path / "side.json", inline_rows=False)
        rep.to_csv(tmp_path / "s.csv")
        write_atomic(tmp_path / "w.txt", "x")
    finally:
        os.umask(old)
    for name in ("r.json", "side.json", "side.rows.csv", "s.csv", "w.txt", "j.jsonl"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


# ------------------------------------------------------------------------------------- silently wrong


def test_resume_with_another_factory_is_refused_naming_what_differs(files, tmp_path, monkeypatch):
    """A module:factory model is identified by its module file's SHA-256, its name and the SHA-256 of the
    weights it returns: an interrupted run of one field resumed with another is refused, never mixed."""
    kw = {**KW, "data": files["mix"], "cache_dir": files["cache"]}
    journal = tmp_path / "j.jsonl"
    with pytest.raises(AuditInterrupted):
        audit("test_safeguards:mixture", resume=str(journal), progress=_interrupt_after(4), **kw)
    monkeypatch.setenv("CC_MIX_SHIFT", "0.3")  # same code and name, other weights
    with pytest.raises(
        UsageError,
        match=r"holds partial results of a different audit \(model\.identity\.weights_sha256: "
        r"'[0-9a-f]{64}' vs '[0-9a-f]{64}'\)",
    ):
        audit("test_safeguards:mixture", resume=str(journal), **kw)
    # Other code: a module whose file changed between the runs.
    module = tmp_path / "cc_edited_model.py"
    module.write_text("from test_safeguards import mixture as make\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("CC_MIX_SHIFT")
    edited = tmp_path / "e.jsonl"
    with pytest.raises(AuditInterrupted):
        audit("cc_edited_model:make", resume=str(edited), progress=_interrupt_after(2), **kw)
    module.write_text("from test_safeguards import mixture as make  # edited\n")
    sys.modules.pop("cc_edited_model")
    with pytest.raises(UsageError, match=r"different audit \(model\.identity\.module_sha256: '[0-9a-f]{64}' vs"):
        audit("cc_edited_model:make", resume=str(edited), **kw)


def test_batch_size_is_part_of_the_fingerprint(files, tmp_path):
    kw = {**KW, "data": files["mix"], "cache_dir": files["cache"]}
    journal = tmp_path / "j.jsonl"
    with pytest.raises(AuditInterrupted):
        audit("test_safeguards:mixture", resume=str(journal), batch_size=8, progress=_interrupt_after(2), **kw)
    with pytest.raises(UsageError, match=r"different audit \(batch_size: 8 vs 16\)"):
        audit("test_safeguards:mixture", resume=str(journal), batch_size=16, **kw)


def test_times_on_a_discrete_schedule_are_snapped_and_recorded(files):
    """--times between two indices feeds the network the nearest index k, and the conversion uses that
    index's σ_k (never σ(t) of the time asked for); the report records k, t_k, σ_k and the request."""
    sched = DiscreteSchedule.linear()
    seen: list[torch.Tensor] = []

    def fn(x, k):
        seen.append(k.clone())
        return x * 0.5  # an ε-prediction

    probe = VectorFieldProbe(
        fn,
        process=OUProcess(),
        sample_shape=(2,),
        parameterization="epsilon",
        time_convention=sched,
        dtype=torch.float64,
    )
    rep = audit(
        probe,
        paths="rotation",
        curl="none",
        times=[0.05, 0.5],
        n_samples=4,
        n_points=8,
        data=files["x2"],
        cache_dir=files["cache"],
    )
    points = rep.header["time_points"]
    grid = sched.t_grid
    for p, asked in zip(points, (0.05, 0.5)):
        k = int(torch.argmin((grid - asked).abs()))
        assert p["index"] == k and p["key"] == f"k{k}"
        assert p["t"] == pytest.approx(float(grid[k]), rel=1e-12)
        assert p["sigma"] == pytest.approx(math.sqrt(1 - math.exp(-2 * float(grid[k]))), rel=1e-12)
        assert p["requested"] == {"flag": "--times", "value": asked}
    fed = torch.cat(seen).unique()
    assert set(fed.tolist()) >= {float(p["index"]) for p in points}  # the network sees whole indices
    sig = audit(
        probe,
        paths="rotation",
        curl="none",
        sigmas=[0.3],
        n_samples=4,
        n_points=8,
        data=files["x2"],
        cache_dir=files["cache"],
    ).header["time_points"]
    assert sig[0]["requested"] == {"flag": "--sigmas", "value": 0.3} and abs(sig[0]["sigma"] - 0.3) < 2e-3


def test_label_columns_are_never_sample_components(tmp_path):
    """A label column is dropped even when the column count happens to equal D."""
    probe3 = VectorFieldProbe(lambda x, t: -x, process=OUProcess(), sample_shape=(3,), dtype=torch.float64)
    pd.DataFrame({"a": [0.1, 0.2], "b": [0.3, -0.1], "label": [1, 0]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(UsageError, match=r"t.csv has 2 numeric columns, the model's samples have 3 components"):
        load_data(str(tmp_path / "t.csv"), probe3, 2, seed=0)
    probe2 = VectorFieldProbe(lambda x, t: -x, process=OUProcess(), sample_shape=(2,), dtype=torch.float64)
    x, _ = load_data(str(tmp_path / "t.csv"), probe2, 2, seed=0)
    assert torch.equal(x, torch.tensor([[0.1, 0.3], [0.2, -0.1]], dtype=torch.float64))


def test_arrays_of_another_shape_are_refused_not_resized(tmp_path):
    probe = VectorFieldProbe(lambda x, t: -x, process=OUProcess(), sample_shape=(1, 16, 16), dtype=torch.float64)
    np.save(tmp_path / "a.npy", np.zeros((4, 3, 7), dtype=np.float32))
    with pytest.raises(UsageError, match=r"holds samples of shape \(3, 7\), the model expects \(1, 16, 16\)"):
        load_data(str(tmp_path / "a.npy"), probe, 4, seed=0)
    for shape in ((4, 16, 16), (4, 16, 16, 1), (4, 256), (4, 1, 16, 16)):
        np.save(tmp_path / "ok.npy", np.zeros(shape, dtype=np.float32))
        assert load_data(str(tmp_path / "ok.npy"), probe, 4, seed=0)[0].shape == (4, 1, 16, 16)


def test_x0_in_one_half_of_the_range_is_warned_and_recorded(files, tmp_path):
    """Images in [0, 1] given to a model of [−1, 1]: used as given, with a warning the report records next
    to the data's range."""
    np.save(tmp_path / "half.npy", np.linspace(0, 1, 8).reshape(4, 2))
    probe = VectorFieldProbe(
        lambda x, t: -x * (1 + t[:, None]), process=OUProcess(), sample_shape=(2,), dtype=torch.float64
    )
    rep = audit(
        probe,
        paths="rotation",
        curl="none",
        times=[0.5],
        n_samples=4,
        n_points=8,
        data=str(tmp_path / "half.npy"),
        cache_dir=files["cache"],
    )
    warning = (
        f"{tmp_path / 'half.npy'} values span [0, 1], one half of the model's data range [-1, 1] (if the data use "
        "another convention, e.g. images in [0, 1] for a model of [-1, 1], rescale them; 8-bit images are mapped "
        "automatically)"
    )
    assert rep.header["warnings"] == [warning] and rep.header["data_source"]["warning"] == warning
    assert rep.header["data_source"]["value_range"] == [0.0, 1.0]
    full = audit(
        probe,
        paths="rotation",
        curl="none",
        times=[0.5],
        n_samples=4,
        n_points=8,
        data=files["x2"],
        cache_dir=files["cache"],
    )  # 0.1 everywhere: a single value is no range to judge
    assert full.header["warnings"] == []


# ------------------------------------------------------------------------------------------ verdicts


def test_the_curl_floor_is_the_floor_of_the_method_used(files, tmp_path):
    """An exact energy gradient whose Jacobian needs finite differences reads ~1e-5 in float32: judged
    against the 1e-6 autodiff floor it was a violation. The control now runs with the model's method, on
    the Gaussian control turned so every coordinate couples (a diagonal field has an exactly zero
    off-diagonal Jacobian by any method): the floor is the finite-difference floor, the exact gradient
    passes, and an unconstrained field under the same method is still a violation, by orders of magnitude."""
    np.save(tmp_path / "x.npy", np.random.default_rng(0).uniform(-1, 1, (16, D_ENERGY)))
    kw = dict(
        paths="none",
        curl="both",
        times=[0.05, 1.0],
        n_samples=16,
        n_probes=4,
        block=8,
        data=str(tmp_path / "x.npy"),
        cache_dir=files["cache"],
    )
    exact = audit("test_safeguards:energy", **kw)
    assert exact.header["jacobian_strategy"] == {"curl.subjacobian": "fd", "curl.hutchinson": "fd"}
    assert exact.verdict.status == "pass", exact.verdict.reason
    for c in exact.verdict.checks:
        assert c["method"] == "fd" and c["floor"] == c["control"] > 1e-6  # measured, above the autodiff floor
    controls = [u for u in exact.units if u["field"] == "control"]
    assert {u["meta"]["strategy"] for u in controls} == {"fd"}
    free = audit("test_safeguards:unconstrained", **kw)
    assert free.verdict.status == "violation"
    assert min(c["ratio"] for c in free.verdict.checks) > 100
    r = cc(
        "audit",
        "test_safeguards:energy",
        "--paths",
        "none",
        "--curl",
        "subjacobian",
        "--times",
        "0.05",
        "--samples",
        "16",
        "--block",
        "8",
        "--data",
        tmp_path / "x.npy",
        "--cache-dir",
        files["cache"],
    )
    assert r.exit_code == 0
    assert (
        "curl · subjacobian — curl_rel_fro (Jacobian by finite differences; floor measured on the control by "
        "the same method)"
    ) in r.stdout


def test_autodiff_verdicts_keep_the_precision_floor(files):
    """With autodiff the turned control's curl stays far below the precision floor: floors unchanged."""
    rep = audit("test_safeguards:linear", data=files["x2"], cache_dir=files["cache"], **{**KW, "precision": "fp32"})
    curl = [c for c in rep.verdict.checks if c["diagnostic"] == "curl"]
    assert {c["method"] for c in curl} == {"jvp"} and {c["floor"] for c in curl} == {1e-6}
    assert all(c["control"] < 1e-7 for c in curl)


def test_pass_over_a_discretisation_floor_is_not_resolved(files):
    """Brownian-bridge loops of a conservative but curved field at 32 nodes: the polygon rule's error sets
    the floor, and the median is far above the control's and the precision's floors — the check cannot
    tell, so it says so instead of `pass`; the rotation loops of the same audit are resolved and pass (at
    16 nodes the periodic rule has not converged at t = 0.2 yet, and that row says so too)."""
    kw = dict(curl="none", times=[0.2, 1.0], n_samples=4, precision="fp64", data=files["mix"], cache_dir=files["cache"])
    rep = audit("test_safeguards:mixture", paths="rotation,brownian", n_points=32, **kw)
    status = {(c["variant"], c["time_key"]): c["status"] for c in rep.verdict.checks}
    assert {status[("brownian", k)] for k in ("t0.2", "t1")} == {"unresolved"}
    assert {status[("rotation", k)] for k in ("t0.2", "t1")} == {"pass"}
    assert rep.verdict.status == "pass"
    assert rep.verdict.reason.endswith(
        "2 not resolved at this node count (loop.brownian at t=0.2, t=1: their floor is the discretisation "
        "error; raise --points)"
    )
    coarse = audit("test_safeguards:mixture", paths="rotation", n_points=16, **kw)
    assert [c["status"] for c in coarse.verdict.checks] == ["unresolved", "pass"]
    args = ["--curl", "none", "--times", "0.2", "--samples", "4", "--points", "32", "--precision", "fp64"]
    r = cc(
        "audit",
        "test_safeguards:mixture",
        "--paths",
        "brownian",
        *args,
        "--data",
        files["mix"],
        "--cache-dir",
        files["cache"],
    )
    assert r.exit_code == 0 and "not resolved at this node count" in r.stdout
    assert "verdict: invalid: no check is resolved: 1 not resolved at this node count" in r.stdout


def test_the_curl_reports_the_pooled_ratio_beside_the_per_sample_median(files):
    rep = audit(
        "test_safeguards:linear",
        paths="none",
        curl="both",
        block=2,
        times=[0.5],
        n_samples=4,
        data=files["x2"],
        cache_dir=files["cache"],
    )
    s = rep.summary().set_index(["variant", "metric"])
    rows = rep.rows[rep.rows["field"] == "model"]
    hut = rows[rows["variant"] == "hutchinson"]
    pooled = 0.5 * math.sqrt(hut["asym_fro2"].sum() / hut["jac_fro2"].sum())
    assert s.loc[("hutchinson", "rel_asym"), "pooled"] == pytest.approx(pooled, rel=1e-12)
    sub = rows[rows["variant"] == "subjacobian"]
    assert s.loc[("subjacobian", "curl_rel_fro"), "pooled"] == pytest.approx(
        math.sqrt(sub["curl_fro2"].sum() / sub["sym_fro2"].sum()), rel=1e-12
    )
    assert pd.isna(s.loc[("subjacobian", "curl_mean_abs"), "pooled"])
    r = cc(
        "audit",
        "test_safeguards:linear",
        "--paths",
        "none",
        "--curl",
        "hutchinson",
        "--times",
        "0.5",
        "--samples",
        "4",
        "--data",
        files["x2"],
        "--cache-dir",
        files["cache"],
    )
    header = next(line for line in r.stdout.splitlines() if "per-sample median" in line)
    assert "pooled" in header


# -------------------------------------------------------------------------------- exit codes, crashes


def test_a_model_calling_sys_exit_is_reported_and_the_gate_fails(files, tmp_path):
    out = tmp_path / "r.json"
    r = cc(
        "audit",
        "test_safeguards:exits_in_forward",
        *ARGS,
        "--data",
        files["mix"],
        "--cache-dir",
        files["cache"],
        "--json",
        out,
        "--fail-if",
        "verdict != pass",
    )
    assert r.exit_code == 1 and out.exists()
    data = json.loads(out.read_text())
    assert data["verdict"]["status"] == "invalid"
    assert "the model called sys.exit(0) in its forward pass" in data["verdict"]["reason"]


def test_an_internal_error_exits_3_with_one_line_and_a_log(files, tmp_path, monkeypatch):
    from conservcheck.cli import display

    def broken(report, console):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(display, "show", broken)
    args = ["audit", "test_safeguards:mixture", *ARGS, "--data", files["mix"], "--cache-dir", files["cache"], "-q"]
    r = cc(*args)
    assert r.exit_code == 3 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    log = line.split("the traceback is in ")[1].split(";")[0]
    assert line == (
        f"error: internal error: ZeroDivisionError: division by zero (a bug in conservcheck: the traceback is in "
        f"{log}; run with conservcheck --debug to print it, and please report it)"
    )
    assert "Traceback" in Path(log).read_text() and "def broken" not in Path(log).read_text().split("Traceback")[0]
    Path(log).unlink()
    debug = cc("--debug", *args)
    assert debug.exit_code == 3 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("error: internal error: ZeroDivisionError")
    Path(debug.stderr.split("the traceback is in ")[1].split(";")[0]).unlink()


def test_the_failed_sampler_reason_is_the_problem_alone(files):
    def fn(x, t):
        raise RuntimeError("boom")

    probe = VectorFieldProbe(fn, process=OUProcess(), sample_shape=(2,), dtype=torch.float64)
    rep = audit(
        probe,
        paths="rotation",
        curl="none",
        times=[0.5],
        n_samples=2,
        n_points=8,
        sampler_steps=4,
        cache_dir=files["cache"],
    )
    assert rep.verdict.status == "invalid"
    assert "incomplete" not in rep.verdict.reason and "0 of 0" not in rep.verdict.reason


def _pipe(args: list[str], read: int) -> tuple[int, str]:
    """Run the real command with stdout piped to a reader that takes ``read`` bytes and closes its end."""
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    proc = subprocess.Popen([str(CLI), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(read)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    return proc.wait(timeout=300), err


def test_a_closed_stdout_changes_nothing_but_the_output(files, tmp_path):
    """`… | head` closes the pipe early: the command finishes its work and exits with its own code, with
    nothing on stderr."""
    report = tmp_path / "r.json"
    assert (
        cc(
            "audit",
            "test_safeguards:mixture",
            *ARGS,
            "--data",
            files["mix"],
            "--cache-dir",
            files["cache"],
            "--json",
            report,
        ).exit_code
        == 0
    )
    code, err = _pipe(["gate", str(report), "--fail-if", "verdict != pass"], 10)
    assert (code, err) == (0, "")
    code, err = _pipe(["gate", str(report), "--fail-if", "verdict == pass"], 10)
    assert (code, err) == (1, "")
    # With --json - the tables go to stderr: they are there, and no error.
    small = ["--paths", "rotation", "--curl", "none", "--times", "0.5", "--samples", "4", "--points", "32"]
    audit_args = ["audit", "test_safeguards:mixture", *small, "--data", files["mix"], "--cache-dir", files["cache"]]
    junit = ["--junit", str(tmp_path / "j.xml"), "--fail-if", "verdict != pass"]
    code, err = _pipe([*audit_args, "-q", "--json", "-", *junit], 10)
    assert code == 0 and "error:" not in err and err.strip().splitlines()[-1] == "gate ok: verdict != pass"
    assert (tmp_path / "j.xml").exists()


@pytest.mark.slow
def test_selftest_into_a_closed_pipe_keeps_its_exit_code():
    """`conservcheck selftest | head -n 1` exited 1 with nothing on stderr though every check passed."""
    assert _pipe(["selftest"], 10) == (0, "")
