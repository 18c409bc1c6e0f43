"""The audit's plan said before it starts (nodes per loop type, model evaluations, time) and its progress."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

import conservcheck
from conservcheck import OUProcess, VectorFieldProbe
from conservcheck.analytic.fields import GaussianMixture
from conservcheck.contract import CHECK_EVALS
from conservcheck.diagnostics.loop_integral import PAPER_POINTS, loop_points
from conservcheck.geometry import loops
from conservcheck.geometry.jacobian import PRODUCT_COST
from conservcheck.runner import progress as progress_module
from conservcheck.runner.estimate import Estimate, duration_text, forward_seconds, plan_evals
from conservcheck.runner.options import device_defaults, resolve_options
from conservcheck.runner.progress import ProgressLog
from conservcheck.runner.units import CONTROL_COST, plan_units
from conservcheck.timepoints import time_points

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def _mixture() -> GaussianMixture:
    return GaussianMixture(torch.tensor([[0.5, 0.0, -0.5], [-0.5, 0.3, 0.2]], dtype=torch.float64), 0.3)


def _probe(counter: list[int] | None = None) -> VectorFieldProbe:
    gm = _mixture()

    def fn(x, t):
        if counter is not None:
            counter.append(x.shape[0])
        return gm.score(x, t)

    return VectorFieldProbe(fn, process=OUProcess(), sample_shape=(3,), data_range=(-5.0, 5.0), dtype=torch.float64)


# --------------------------------------------------------------------------------------- nodes per loop


def test_each_loop_type_has_its_own_cpu_default_and_points_overrides_all():
    paths = ("rotation", "brownian", "projection", "rectangle")
    cpu = loop_points(None, paths, CPU)
    assert cpu == {p: loops.get(p).cpu_points for p in paths}
    # The periodic rule reaches the paper's 1,000-node polygon accuracy at 48 nodes (benchmarks/RESULTS.md);
    # a Brownian bridge, integrated by the polygon rule on a rough path, needs the most.
    assert cpu["rotation"] == 48 and cpu["brownian"] == max(cpu.values())
    assert loop_points(None, paths, GPU) == dict.fromkeys(paths, PAPER_POINTS)
    assert loop_points(200, paths, CPU) == dict.fromkeys(paths, 200)
    assert loop_points("auto", ("rotation",), GPU) == {"rotation": "auto"}


def test_the_plan_runs_each_loop_type_at_its_own_node_count():
    probe = _probe()
    opts, scaled = device_defaults(resolve_options({"paths": "rotation,brownian", "curl": "none"}), probe.device)
    assert scaled and opts["n_points"] is None
    assert opts["loop_points"] == {"rotation": 48, "brownian": loops.get("brownian").cpu_points}
    plan = plan_units(probe, opts, time_points(probe, [0.5], None, None))
    model = {u.variant: u for u in plan if u.field == "model"}
    for path, n in opts["loop_points"].items():
        assert model[path].kwargs["n_points"] == n and model[path].cost == opts["n_samples"] * n
    given, _ = device_defaults(resolve_options({"paths": "rotation", "n_points": 64}), probe.device)
    assert given["loop_points"] == {"rotation": 64}


# ------------------------------------------------------------------------------------------- estimate


def test_plan_evals_counts_every_phase():
    probe = _probe()
    opts = resolve_options({"paths": "rotation,projection", "curl": "subjacobian", "n_samples": 4, "n_points": 32})
    opts, _ = device_defaults(opts, probe.device)
    points = time_points(probe, [0.2, 1.0], None, None)
    plan = plan_units(probe, opts, points)
    phases = {p.name: p for p in plan_evals(plan, sampling_evals=4 * 50)}
    assert phases["x0"].evals == 200 and phases["checks"].evals == CHECK_EVALS
    for path in ("rotation", "projection"):
        # model and control units at two time points; the control is counted at its share of the work
        assert phases[f"loop.{path}"].units == 4
        assert math.isclose(phases[f"loop.{path}"].evals, 2 * 4 * 32 * (1 + CONTROL_COST))
    # the block is capped at D = 3; one vjp row per block index (the plan counts double_vjp's costs)
    assert math.isclose(phases["curl.subjacobian"].evals, 2 * 4 * 3 * PRODUCT_COST["double_vjp"]["vjp"] * 1.02)
    assert list(phases)[:2] == ["x0", "checks"]


def test_estimate_line_and_dict():
    phases = plan_evals([], sampling_evals=1600)
    est = Estimate(phases, 6, 0.001, 256)
    assert est.evals == 1600 + CHECK_EVALS and math.isclose(est.seconds, est.evals * 0.001)
    line = est.line()
    assert line.startswith("plan: 0 units over 6 time points, 1,624 model evaluations (x0 1,600, checks 24)")
    assert "1 ms per sample at batch 256" in line and line.endswith("about 2 s")
    assert "no time estimate" in Estimate(phases, 6, None, 256).line()
    d = est.to_dict()
    assert d["model_evals"] == 1624 and d["phases"] == {"x0": 1600, "checks": 24} and d["batch_size"] == 256


@pytest.mark.parametrize(
    "seconds, text", [(0.4, "0 s"), (44.6, "45 s"), (60, "1 min 00 s"), (200, "3 min 20 s"), (7500, "2 h 05 min")]
)
def test_duration_text(seconds, text):
    assert duration_text(seconds) == text


def test_forward_timing_grows_the_batch_up_to_the_audit_batch_and_no_further():
    calls: list[int] = []
    per_sample = forward_seconds(_probe(calls), batch_size=100)
    assert per_sample > 0
    # An untimed first pass, then 32, 64, 100 rows: a cheap field never reaches the time target, so the
    # batch stops at the audit's, where the better of two passes counts.
    assert calls == [32, 32, 64, 100, 100]
    calls.clear()
    forward_seconds(_probe(calls), batch_size=8)
    assert calls == [8, 8, 8]
    calls.clear()
    forward_seconds(_probe(calls), batch_size=10**6)
    assert max(calls) == 1024 and calls[-2:] == [1024, 1024]
    calls.clear()
    # An audit of 82 model evaluations is timed on a quarter of them, 21 rows, not on the 32 of a larger one:
    # the three passes cost less than the audit.
    forward_seconds(_probe(calls), batch_size=256, rows=82)
    assert calls == [21, 21, 21]


# ------------------------------------------------------------------------------------------- progress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_at_most_every_interval_with_time_left(caplog):
    clock, seen = Clock(), []
    log = ProgressLog(100, 4, lambda d, t, s: seen.append((d, t, s)), seconds_per_eval=0.5, interval=10, clock=clock)
    with caplog.at_level(logging.INFO, logger="conservcheck.progress"):
        log.begin("loop.rotation model k10", 25)
        clock.now = 2
        log.tick(10)  # rows of the running unit count as they are evaluated
        assert log.progress == 10
        clock.now = 5
        log.advance(25, "loop.rotation model k10")
        log.tick()
        assert not caplog.records  # 5 s since the start: no line yet
        assert log.left() == pytest.approx(75 * 5 / 25)  # the rate so far: 0.2 s per evaluation
        log.begin("loop.rotation control k10", 25)
        clock.now = 12
        log.tick(100)  # never more than the unit's planned work
        log.tick()
    assert [r.getMessage() for r in caplog.records] == [
        "progress 50%: 1 of 4 units, now loop.rotation control k10; 12 s elapsed, about 12 s left"
    ]
    assert seen == [(25.0, 100.0, "loop.rotation model k10")]  # the callback hears of finished units
    # before any work, the estimate's rate
    assert ProgressLog(100, 4, seconds_per_eval=0.5, clock=Clock()).left() == 50


def test_audit_says_its_plan_first_then_progress(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(progress_module, "INTERVAL", 0.0)
    data = tmp_path / "mix.npy"
    np.save(data, _mixture().sample(4, torch.Generator().manual_seed(0)).numpy())
    seen: list[tuple[float, float, str]] = []
    with caplog.at_level(logging.INFO, logger="conservcheck"):
        rep = conservcheck.audit(
            _probe(),
            paths="rotation,brownian",
            curl="subjacobian",
            times=[0.2, 1.0],
            n_samples=4,
            precision="fp64",
            data=str(data),
            cache_dir=str(tmp_path / "cache"),
            progress=lambda d, t, s: seen.append((d, t, s)),
        )
    messages = [(r.name, r.getMessage()) for r in caplog.records]
    plan = next(i for i, (_, m) in enumerate(messages) if m.startswith("plan: "))
    lines = [i for i, (name, _) in enumerate(messages) if name == "conservcheck.progress"]
    assert lines and plan < lines[0]
    assert "12 units over 2 time points" in messages[plan][1] and "about" in messages[plan][1]
    assert messages[lines[-1]][1].startswith("progress 100%: 12 of 12 units")
    est = rep.run["estimate"]
    assert est["phases"]["loop.brownian"] == round(2 * 4 * loops.get("brownian").cpu_points * (1 + CONTROL_COST))
    assert est["seconds_per_eval"] > 0  # each phase and the total are rounded on their own
    assert abs(est["model_evals"] - sum(est["phases"].values())) <= len(est["phases"]) / 2
    assert {"load", "checks", "loop.rotation", "loop.brownian", "curl.subjacobian"} <= set(rep.run["phase_seconds"])
    assert len(seen) == 12 and seen[-1][0] == pytest.approx(seen[-1][1])  # once per unit, as it finishes
    assert all(a[0] < b[0] for a, b in zip(seen, seen[1:]))
    assert rep.header["options"]["loop_points"] == {"rotation": 48, "brownian": loops.get("brownian").cpu_points}
