"""The verdict of an audit: each headline metric against the numerical floor measured in the same audit.

For every (diagnostic, variant, time point) — and, for a conditional model, every guidance scale w —
with a *headline* metric (each registered diagnostic names its own: scale-free numbers in [0, 1]) the
model's median is compared with the numerical floor

    floor = max(control median, the diagnostic's own floor, precision floor)

where the control median is the same metric on the conservative control field, computed with the method
the model's value was (the curl's Jacobian strategy: a model whose Jacobian needs finite differences is
judged against the floor of finite differences, measured on the control; the control does not depend on
the guidance scale w, so one control unit is the floor of the checks at every w), the diagnostic's own
floor is what its values say they cannot resolve (the loop integral: the median of its nested-rule
quadrature error relative to ∮|s||dy|), and the precision floor is the smallest resolvable relative value
of the forward precision (:func:`conservcheck.precision.floor_rel`). Each check is

* ``violation`` when the median exceeds :data:`FLOOR_FACTOR` × floor;
* ``unresolved`` — *not resolved at this node count* — when only the diagnostic's own discretisation
  floor keeps it from being a violation: the median exceeds :data:`FLOOR_FACTOR` × max(control median,
  precision floor) but not :data:`FLOOR_FACTOR` × its own floor. Such a value is of the size of the
  discretisation error and says nothing either way; more nodes lower that floor (a Brownian bridge at
  few nodes). A median small even against the control and precision floors is a pass whatever the
  discretisation error estimate says (the nested-rule estimate is that of the coarser rule);
* ``pass`` otherwise.

The verdict is

* ``invalid`` when the model broke its contract (NaN/Inf, wrong shape, non-determinism, batch
  dependence) or any unit failed — no number computed from NaNs is used;
* ``violation`` when any check is a violation (an incomplete audit says what it left unmeasured);
* ``invalid`` when units were skipped (time budget, or a shard's partial report) and no measured check
  is a violation — an incomplete audit never passes; the reason names the unmeasured diagnostics;
* ``invalid`` when no check is resolved at its node count;
* ``pass`` otherwise; its reason names the checks that were not resolved, if any.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from conservcheck import diagnostics
from conservcheck.files import json_safe
from conservcheck.precision import PRECISIONS
from conservcheck.report.summary import guidance_label, time_label

FLOOR_FACTOR = 10.0

#: A unit record's key: field, diagnostic, variant, time key and guidance weight (None: unguided).
_UnitKey = tuple[str, str, str, str, float | None]


@dataclass
class Verdict:
    """``status`` is pass, violation or invalid; ``reason`` is one line; ``checks`` one dict per check."""

    status: str
    reason: str
    checks: list[dict[str, Any]] = field(default_factory=list)
    rule: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = json_safe(asdict(self))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verdict:
        return cls(data["status"], data["reason"], list(data.get("checks", [])), dict(data.get("rule", {})))


def _median(units: dict[_UnitKey, dict[str, Any]], key: _UnitKey, metric: str) -> float | None:
    u = units.get(key)
    if u is None or u["status"] != "ok" or metric not in u["values"]:
        return None
    return float(np.median(np.asarray(u["values"][metric], dtype=np.float64)))


def _own_floor(unit: dict[str, Any]) -> float:
    spec = diagnostics.registered().get(unit["diagnostic"])
    return spec.floor(unit["values"]) if spec is not None and spec.floor is not None else 0.0


def _unmeasured(units: list[dict[str, Any]], checks: list[dict[str, Any]], time_name: str) -> str:
    """``loop.rotation at t=1, t=2; stein.funnel at t=2``: the model diagnostics a skipped unit left
    unmeasured (the model unit itself, or the control unit its check needs)."""
    where: dict[str, list[str]] = {}
    seen: set[tuple[str, str, str, float | None]] = set()
    for item in [u for u in units if u["field"] == "model" and u["status"] == "skipped"] + [
        c for c in checks if c["status"] == "skipped"
    ]:
        time = item.get("time") or {"index": item["time_index"], "t": item["t"]}
        w = item.get("guidance")
        key = (item["diagnostic"], item["variant"], item.get("time_key") or item["time"]["key"], w)
        if key not in seen:
            seen.add(key)
            where.setdefault(f"{key[0]}.{key[1]}", []).append(time_label(time, time_name) + guidance_label(w))
    return "; ".join(f"{name} at {', '.join(labels)}" for name, labels in where.items())


def _incomplete(units: list[dict[str, Any]], checks: list[dict[str, Any]], time_name: str) -> str:
    """One clause saying how many units did not run, why, and which diagnostics that leaves unmeasured
    (empty when no unit was planned: the reason is then the problem that stopped the audit)."""
    skipped = [u for u in units if u["status"] == "skipped"]
    if not skipped:
        return "" if not units else "incomplete"
    why = "; ".join(dict.fromkeys(u.get("message") or "skipped" for u in skipped))
    text = f"incomplete: {len(skipped)} of {len(units)} units not run ({why})"
    unmeasured = _unmeasured(units, checks, time_name)
    return f"{text}, unmeasured: {unmeasured}" if unmeasured else text


def decide_verdict(
    units: list[dict[str, Any]], problems: list[str], precision: str, time_name: str = "t", complete: bool = True
) -> Verdict:
    """The verdict of an audit from its unit records (rule in the module docstring).

    A unit that did not run (status ``skipped``: time budget, or another shard's unit) leaves its check
    ``skipped``; an audit with skipped units (or ``complete=False``) is never ``pass``: without a
    violation among the measured checks it is ``invalid``, and every reason names what is unmeasured.
    """
    spec = PRECISIONS.get(precision)
    precision_floor = spec.floor_rel if spec is not None else 0.0
    rule = {"factor": FLOOR_FACTOR, "headline": diagnostics.headline_rule(), "precision_floor": precision_floor}
    by_key = {(u["field"], u["diagnostic"], u["variant"], u["time"]["key"], u.get("guidance")): u for u in units}
    checks: list[dict[str, Any]] = []
    for u in units:
        metric = diagnostics.headline_metric(u["diagnostic"], u["variant"])
        if u["field"] != "model" or metric is None:
            continue
        key = (u["diagnostic"], u["variant"], u["time"]["key"])
        w = u.get("guidance")
        check = {
            "diagnostic": u["diagnostic"],
            "variant": u["variant"],
            "time_key": u["time"]["key"],
            "time_index": u["time"]["index"],
            "t": u["time"]["t"],
            "sigma": u["time"]["sigma"],
            "guidance": w,
            "metric": metric,
        }
        control_unit = by_key.get(("control", *key, None))
        if u["status"] == "skipped" or (control_unit is not None and control_unit["status"] == "skipped"):
            # Without its own values or its floor, the check cannot be judged either way.
            checks.append({**check, "status": "skipped", "median": None, "floor": None, "ratio": None})
            continue
        median = _median(by_key, ("model", *key, w), metric)
        if median is None:
            checks.append({**check, "status": "invalid", "median": None, "floor": None, "ratio": None})
            continue
        control = _median(by_key, ("control", *key, None), metric) or 0.0
        quad = _own_floor(u)
        floor = max(control, quad, precision_floor)
        ratio = median / floor if floor > 0 else math.inf
        status = "violation" if median > FLOOR_FACTOR * floor else "pass"
        if status == "pass" and median > FLOOR_FACTOR * max(control, precision_floor):
            # Only the discretisation floor keeps it from being a violation: not resolved at this node count.
            status = "unresolved"
        method = (u.get("meta") or {}).get("strategy")
        checks.append(
            {
                **check,
                "status": status,
                "median": median,
                "control": control,
                "quadrature": quad,
                "floor": floor,
                "ratio": ratio,
                **({"method": method} if method is not None else {}),
            }
        )
    measured = [c for c in checks if c["status"] != "skipped"]
    incomplete = not complete or any(u["status"] == "skipped" for u in units)
    clause = _incomplete(units, checks, time_name) if incomplete else ""
    suffix = f"; {clause}" if clause else ""
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return Verdict("invalid", f"{problems[0]}{more}{suffix}", checks, rule)
    if not measured:
        return Verdict("invalid", clause or "no diagnostic finished", checks, rule)

    def where(c: dict[str, Any]) -> str:
        when = time_label({"index": c["time_index"], "t": c["t"]}, time_name) + guidance_label(c.get("guidance"))
        return f"{c['diagnostic']}.{c['variant']} {c['metric']} at {when}"

    bad = [c for c in measured if c["status"] == "violation"]
    resolved = [c for c in measured if c["status"] == "pass"]
    unresolved = [c for c in measured if c["status"] == "unresolved"]
    note = _unresolved_note(unresolved, time_name)
    if bad:
        worst = max(bad, key=lambda c: c["ratio"])
        return Verdict(
            "violation",
            f"{where(worst)}: median {worst['median']:.3g} is {worst['ratio']:.3g}× the numerical floor "
            f"{worst['floor']:.2g} ({len(bad)} of {len(measured)} checks above {FLOOR_FACTOR:g}×){suffix}",
            checks,
            rule,
        )
    top = max(measured, key=lambda c: c["ratio"])
    largest = f"largest {top['ratio']:.2g}× for {where(top)}"
    if incomplete:
        # Unmeasured diagnostics could hold a violation: an incomplete audit never passes.
        return Verdict(
            "invalid",
            f"{clause}; the {len(measured)} measured checks are within {FLOOR_FACTOR:g}× the "
            f"numerical floor ({largest})",
            checks,
            rule,
        )
    if not resolved:
        return Verdict("invalid", f"no check is resolved: {note}", checks, rule)
    if unresolved:
        top = max(resolved, key=lambda c: c["ratio"])
        return Verdict(
            "pass",
            f"all {len(resolved)} resolved checks within {FLOOR_FACTOR:g}× the numerical floor (largest "
            f"{top['ratio']:.2g}× for {where(top)}); {note}",
            checks,
            rule,
        )
    return Verdict(
        "pass", f"all {len(measured)} checks within {FLOOR_FACTOR:g}× the numerical floor ({largest})", checks, rule
    )


def _unresolved_note(unresolved: list[dict[str, Any]], time_name: str) -> str:
    """``2 not resolved at this node count (loop.brownian at k=10, k=100: …)``, or "" for none."""
    if not unresolved:
        return ""
    where: dict[str, list[str]] = {}
    for c in unresolved:
        label = time_label({"index": c["time_index"], "t": c["t"]}, time_name)
        where.setdefault(f"{c['diagnostic']}.{c['variant']}", []).append(label)
    names = "; ".join(f"{name} at {', '.join(labels)}" for name, labels in where.items())
    return (
        f"{len(unresolved)} not resolved at this node count ({names}: their floor is the discretisation "
        "error; raise --points)"
    )
