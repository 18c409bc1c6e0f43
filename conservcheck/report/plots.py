"""The paper's figure types from a report (matplotlib, the ``plots`` extra).

* *metric vs time* (Fig. 2, 3, 6, 8, 10): for each metric, the median over samples against the time
  index k (or t, or σ for VE) with the q25–q75 band, one line per loop type (or curl / Stein variant),
  and the conservative control's median dashed with crosses — the audit's numerical floor. A metric that
  spans decades is on a log axis (a control that is exactly 0 sits on its bottom edge as a triangle);
  points whose check is not resolved at the audit's node count (status ``unresolved``) are drawn open;
* *box plots* (Fig. 5, 7, 9, 11, 12): for each loop metric, one panel per loop type with one box of the
  per-sample values per time point;
* for a conditional model audited at several guidance scales, *metric vs w*: for each metric, one panel
  per variant with the median against w, one line per time point, and the control's median dashed (it
  does not depend on w). The metric-vs-time figures then have one line per (variant, w).

Which metrics are drawn, and how, each registered diagnostic says (:class:`conservcheck.diagnostics.Figure`).

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot state, no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from conservcheck import diagnostics
from conservcheck.errors import UsageError
from conservcheck.report.audit_report import AuditReport


def _figure(**kw: Any) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(
            "plotting needs matplotlib, which is not installed", "pip install matplotlib (the plots extra)"
        ) from None
    return Figure(**kw)


def _axis(report: AuditReport) -> tuple[str, str, bool]:
    """(summary column for x, its label, log scale) for the report's time convention."""
    if any(t.get("index") is not None for t in report.header["time_points"]):
        return "time_index", "time index k", False
    if report.header["process"].get("time") == "sigma":
        return "sigma", "σ", True
    return "t", "t (canonical time)", False


def _unresolved(report: AuditReport) -> set[tuple[str, str, str, float | None]]:
    """(diagnostic, variant, time key, guidance) of the checks not resolved at the audit's node count."""
    return {
        (c["diagnostic"], c["variant"], c["time_key"], None if c.get("guidance") is None else float(c["guidance"]))
        for c in report.verdict.checks
        if c["status"] == "unresolved"
    }


def _time_figure(report: AuditReport, diagnostic: str, metric: str, label: str, log: bool) -> Any | None:
    s = report.summary(field=None)
    s = s[(s["diagnostic"] == diagnostic) & (s["metric"] == metric) & (s["status"] == "ok")]
    if s.empty:
        return None
    xcol, xlabel, xlog = _axis(report)
    # A quantity spanning decades is drawn on a log axis whatever its control does: values ≤ 0 (an exactly
    # conservative control's curl, say) sit on the axis's bottom edge, drawn as downward triangles.
    values = s[["median", "q25", "q75"]].astype(float).to_numpy()
    positive = values[values > 0]
    log = log and positive.size > 0
    bottom = float(positive.min()) / 3 if log else None
    unresolved = _unresolved(report)
    fig = _figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    marked = False
    model = s[s["field"] == "model"]
    guided = len(report.guidance_scales) > 1
    for (variant, w), rows in model.groupby(["variant", "guidance"], sort=False, dropna=False):
        rows = rows.sort_values("t")
        name = f"{variant}, w={w:g}" if guided else variant
        x = rows[xcol].astype(float).to_numpy()
        med = rows["median"].astype(float).to_numpy()
        line = ax.plot(x, med, marker="o", ms=4, label=name)[0]
        color = line.get_color()
        low, high = rows["q25"].astype(float).to_numpy(), rows["q75"].astype(float).to_numpy()
        if bottom is not None:
            low = np.maximum(low, bottom)
        ax.fill_between(x, low, high, color=color, alpha=0.2, lw=0)
        guidance = None if pd.isna(w) else float(w)
        open_ = np.array([(diagnostic, variant, k, guidance) in unresolved for k in rows["time_key"]])
        if open_.any():
            marked = True
            ax.plot(x[open_], med[open_], ls="none", marker="o", ms=8, mfc="white", mec=color, mew=1.5, zorder=3)
        ctrl = s[(s["field"] == "control") & (s["variant"] == variant)].sort_values("t")
        if not ctrl.empty and (not guided or w == min(report.guidance_scales)):
            cx = ctrl[xcol].astype(float).to_numpy()
            cy = ctrl["median"].astype(float).to_numpy()
            ax.plot(cx, cy, ls="--", lw=1.2, marker="x", ms=5, color=color, label=f"{variant}: conservative control")
            if bottom is not None and (cy <= 0).any():
                ax.plot(cx[cy <= 0], np.full(int((cy <= 0).sum()), bottom), ls="none", marker="v", ms=6, color=color)
    if bottom is not None:
        ax.set_yscale("log")
        ax.set_ylim(bottom=bottom / 1.5)
    if xlog:
        ax.set_xscale("log")
    if marked:
        ax.plot([], [], ls="none", marker="o", ms=8, mfc="white", mec="0.3", label="open: not resolved (more nodes)")
    if log and bool((s[s["field"] == "control"]["median"].astype(float) <= 0).any()):
        ax.plot([], [], ls="none", marker="v", color="0.3", label="control exactly 0 (bottom edge)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(label)
    ax.set_title(f"{diagnostic}: {metric} — median, q25–q75 band", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if log:
        ax.grid(alpha=0.1, which="minor")
    return fig


def _guidance_figure(report: AuditReport, diagnostic: str, metric: str, label: str, log: bool) -> Any | None:
    """The metric's median against the guidance scale w: a panel per variant, a line per time point."""
    if len(report.guidance_scales) < 2:
        return None
    s = report.summary(field=None)
    s = s[(s["diagnostic"] == diagnostic) & (s["metric"] == metric) & (s["status"] == "ok")]
    model = s[s["field"] == "model"]
    variants = list(dict.fromkeys(model["variant"]))
    if not variants:
        return None
    fig = _figure(figsize=(4.2 * len(variants) + 1, 4.0), layout="constrained")
    axes = fig.subplots(1, len(variants), squeeze=False)[0]
    for ax, variant in zip(axes, variants):
        rows = model[model["variant"] == variant]
        for key, by_w in rows.groupby("time_key", sort=False):
            by_w = by_w.sort_values("guidance")
            line = ax.plot(by_w["guidance"], by_w["median"], marker="o", ms=3, label=report.time_label(key))[0]
            ctrl = s[(s["field"] == "control") & (s["variant"] == variant) & (s["time_key"] == key)]
            if not ctrl.empty:
                ax.axhline(float(ctrl["median"].iloc[0]), ls="--", lw=1, color=line.get_color(), alpha=0.6)
        if log and bool((rows["median"] > 0).all()):
            ax.set_yscale("log")
        ax.set_xlabel("guidance scale w")
        ax.set_title(variant, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(label)
    fig.suptitle(f"{diagnostic}: {metric} against w — median (dashed: conservative control)", fontsize=10)
    return fig


def _box_figure(report: AuditReport, diagnostic: str, metric: str) -> Any | None:
    rows = report.rows
    if metric not in rows.columns:
        return None
    rows = rows[(rows["field"] == "model") & (rows["diagnostic"] == diagnostic)]
    variants = list(dict.fromkeys(rows["variant"]))
    if not variants:
        return None
    fig = _figure(figsize=(3.2 * len(variants) + 1, 3.8), layout="constrained")
    axes = fig.subplots(1, len(variants), squeeze=False)[0]
    for ax, variant in zip(axes, variants):
        sub = rows[rows["variant"] == variant]
        w = sub["guidance"] if "guidance" in sub else pd.Series([None] * len(sub), index=sub.index, dtype=object)
        order = sub.assign(_w=w.astype(float)).sort_values(["t", "_w"])
        # NaN (no guidance) never equals itself: keyed as None, so each time point is one box.
        keys = list(
            dict.fromkeys((k, None if pd.isna(g) else float(g)) for k, g in zip(order["time_key"], order["_w"]))
        )
        data = [sub[(sub["time_key"] == k) & _same(w, g)][metric].dropna().to_numpy() for k, g in keys]
        ax.boxplot(data, showfliers=True, flierprops={"markersize": 2})
        ax.set_xticks(range(1, len(keys) + 1), [report.time_label(k, g) for k, g in keys], rotation=45, fontsize=7)
        if all(len(d) and (d > 0).all() for d in data):
            ax.set_yscale("log")
        ax.set_title(variant, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    return fig


def _same(column: Any, w: float | None) -> Any:
    """Rows whose guidance scale is w (None: no guidance)."""
    values = column.astype(float)
    return values.isna() if w is None else values == w


def plot_report(report: AuditReport, out_dir: str | Path, fmt: str = "png") -> list[Path]:
    """Write the report's figures to ``out_dir`` as ``fmt`` (png or svg); returns the files written."""
    if fmt not in ("png", "svg"):
        raise UsageError(f"unknown figure format {fmt!r}", "use png or svg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    specs = diagnostics.registered().values()
    figures = [
        (f"{d.name}_{f.metric}", _time_figure(report, d.name, f.metric, f.label, f.log))
        for d in specs
        for f in d.figures
    ]
    figures += [
        (f"{d.name}_{f.metric}_vs_w", _guidance_figure(report, d.name, f.metric, f.label, f.log))
        for d in specs
        for f in d.figures
    ]
    figures += [(f"{d.name}_{m}_box", _box_figure(report, d.name, m)) for d in specs for m in d.box_metrics]
    for name, fig in figures:
        if fig is None:
            continue
        path = out / f"{name}.{fmt}"
        fig.savefig(path, dpi=150, metadata={"Software": None} if fmt == "png" else {"Date": None})
        written.append(path)
    if not written:
        raise UsageError("the report has no finished diagnostic to plot", "plot a report whose verdict is not empty")
    return written


__all__ = ["plot_report"]
