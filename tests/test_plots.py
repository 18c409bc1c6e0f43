"""Figures read at a glance: log axes for quantities that span decades (curl included), the control visible
even where it is exactly 0, and points the audit could not resolve drawn open; the rule that says which."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conservcheck.report import AuditReport

pytest.importorskip("matplotlib")
from conservcheck.report.plots import _box_figure, _time_figure, plot_report  # noqa: E402

KEYS = {10: 0.0468, 100: 0.324, 500: 0.96, 990: 1.0}  # time index → σ


def _unit(field, diagnostic, variant, k, values):
    return {
        "field": field,
        "diagnostic": diagnostic,
        "variant": variant,
        "status": "ok",
        "message": None,
        "meta": {},
        "time": {"key": f"k{k}", "index": k, "t": k / 1000, "sigma": KEYS[k], "alpha": math.sqrt(1 - KEYS[k] ** 2)},
        "values": {name: [float(v)] * 4 for name, v in values.items()},
    }


def _report():
    """The digits DDPM's shape of numbers: a curl falling from 1.1 to 0.0013 over the time points, its
    control exactly 0; rotation loops resolved; Brownian loops whose quadrature error is the size of their
    value at k=10 and k=100 (not resolved) and 100× below it later."""
    units = []
    for k, curl in zip(KEYS, (1.1, 0.024, 0.0019, 0.0013)):
        units.append(_unit("model", "curl", "subjacobian", k, {"curl_mean_abs": curl, "curl_rel_fro": 0.02}))
        units.append(_unit("control", "curl", "subjacobian", k, {"curl_mean_abs": 0.0, "curl_rel_fro": 0.0}))
    for variant, quad in (
        ("rotation", {k: 1e-9 for k in KEYS}),
        ("brownian", {10: 3e-4, 100: 4e-4, 500: 1e-6, 990: 1e-6}),
    ):
        for k in KEYS:
            model = {
                "abs_circulation": 0.5,
                "abs_circulation_ratio": 3e-4,
                "quad_error": quad[k],
                "abs_score_length": 1.0,
            }
            units.append(_unit("model", "loop", variant, k, model))
            units.append(
                _unit("control", "loop", variant, k, {"abs_circulation": 1e-7, "abs_circulation_ratio": 1e-10})
            )
    header = {
        "model": {"name": "synthetic", "precision": "fp32"},
        "process": {"name": "ou", "time": "t"},
        "options": {"seed": 0},
        "time_points": [{"key": f"k{k}", "index": k, "t": k / 1000} for k in KEYS],
        "problems": [],
        "complete": True,
    }
    return AuditReport.from_units(header, units)


def test_a_pass_over_a_discretisation_floor_is_not_resolved():
    """The Brownian loops whose quadrature error is the size of their value (k=10, k=100) are not resolved;
    where the quadrature error is 300× below the value (k=500, k=990, and every rotation loop) the value,
    300× the precision floor, is a violation."""
    checks = {(c["variant"], c["time_key"]): c["status"] for c in _report().verdict.checks if c["diagnostic"] == "loop"}
    assert checks == {
        **{("rotation", f"k{k}"): "violation" for k in KEYS},
        ("brownian", "k10"): "unresolved",
        ("brownian", "k100"): "unresolved",
        ("brownian", "k500"): "violation",
        ("brownian", "k990"): "violation",
    }


def test_curl_on_a_log_axis_with_its_exactly_zero_control_on_the_bottom_edge():
    report = _report()
    fig = _time_figure(report, "curl", "curl_mean_abs", "mean |∂ᵢsⱼ − ∂ⱼsᵢ|", True)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    low, high = ax.get_ylim()
    assert low < 0.0013 and high > 1.1  # four decades, all on the axis
    edge = [ln for ln in ax.get_lines() if ln.get_marker() == "v" and len(ln.get_xdata())]
    assert len(edge) == 1 and np.allclose(edge[0].get_xdata(), list(KEYS))
    assert all(low <= y < 0.0013 for y in edge[0].get_ydata())  # at the bottom, below every model value
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "subjacobian: conservative control" in labels and "control exactly 0 (bottom edge)" in labels


def test_unresolved_points_are_drawn_open_and_resolved_ones_filled():
    report = _report()
    unresolved = {(c["variant"], c["time_key"]) for c in report.verdict.checks if c["status"] == "unresolved"}
    assert unresolved == {("brownian", "k10"), ("brownian", "k100")}
    ax = _time_figure(report, "loop", "abs_circulation", "|∮ s·dy|", True).axes[0]
    open_ = [ln for ln in ax.get_lines() if ln.get_markerfacecolor() == "white" and len(ln.get_xdata())]
    assert len(open_) == 1 and list(open_[0].get_xdata()) == [10, 100]
    assert ax.get_yscale() == "log"
    assert "open: not resolved (more nodes)" in [t.get_text() for t in ax.get_legend().get_texts()]
    # the control, seven decades below the model, stays on the axis
    controls = [ln for ln in ax.get_lines() if ln.get_label().endswith("conservative control")]
    assert len(controls) == 2 and ax.get_ylim()[0] < 1e-7


def test_every_figure_is_written(tmp_path):
    names = {p.name for p in plot_report(_report(), tmp_path)}
    assert {"curl_curl_mean_abs.png", "loop_abs_circulation.png"} <= names


def test_box_plots_have_one_box_per_time_point():
    """Rows without a guidance scale (NaN in the table) are one group per time point, not one per row."""
    report = _report()
    fig = _box_figure(report, "loop", "abs_circulation")
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels == [report.time_label(f"k{k}") for k in KEYS]


def test_the_y_axis_names_the_metric():
    ax = _time_figure(_report(), "loop", "abs_circulation", "|∮ s·dy|", True).axes[0]
    assert ax.get_ylabel() == "|∮ s·dy|"
