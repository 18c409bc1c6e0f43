"""Units: one diagnostic variant at one time point on one field, planned, run and recorded.

An audit runs every planned variant of every registered diagnostic (:mod:`conservcheck.diagnostics`) at
every time point on two *fields*: ``model`` (the audited probe) and ``control`` (:func:`control_probe`,
an exactly conservative Gaussian score evaluated on the very same loops and probe vectors, whose values
are the audit's numerical floor). A diagnostic with ``coupled_control`` (the curl) gets the Gaussian
turned by a fixed orthogonal map, and one with ``control_follows`` runs its control with the model
unit's method (the curl's Jacobian strategy, :func:`follow_model`), so its floor is the floor of the
method the model's value was computed with. A *group* is one (diagnostic, variant, time point): its model unit and
its control unit, numbered in plan order (the unit of sharding). Each finished unit becomes a JSON-ready
record: its key, field, diagnostic, variant, time point, status (ok / nonfinite / error / skipped),
message, per-sample values and meta.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch
from torch import Tensor

from conservcheck import conditioning, diagnostics
from conservcheck.analytic.fields import GaussianMixture, TurnedGaussian
from conservcheck.batching import Batcher
from conservcheck.diagnostics import DiagnosticResult, RunFn
from conservcheck.errors import ProbeContractError, reason
from conservcheck.files import json_safe
from conservcheck.probe import ProbeInfo, VectorFieldProbe
from conservcheck.report import AuditReport
from conservcheck.timepoints import TimePoint

log = logging.getLogger("conservcheck")

#: Relative cost of a unit on the analytic control field (for the progress bar only).
CONTROL_COST = 0.02


@dataclass
class UnitSpec:
    """One planned unit: which diagnostic variant runs on which field at which time point."""

    field: str
    diagnostic: str
    variant: str
    time: TimePoint
    run: RunFn
    kwargs: dict[str, Any]
    cost: float
    group: int = 0
    guidance: float | None = None
    coupled: bool = False

    @property
    def key(self) -> str:
        return f"{self.field}/{self.diagnostic}/{self.variant}/{self.time.key}" + guidance_suffix(self.guidance)


def guidance_suffix(w: float | None) -> str:
    """``/w7.5`` — the part of a unit key naming its guidance scale (empty for unguided units)."""
    return "" if w is None else f"/w{w:.10g}"


def guidance_cost(w: float | None) -> float:
    """Forward passes per evaluation at guidance scale w: two (unconditional and conditional) unless w is
    None (an unconditional model), 0 (the unconditional field) or 1 (the conditional one)."""
    return 1.0 if w in (None, 0.0, 1.0) else 2.0


def control_probe(probe: VectorFieldProbe, x0: Tensor, coupled: bool = False) -> VectorFieldProbe:
    """The exact score of N(mean(x0), diag var(x0)) under the probe's process, as a probe in the same
    dtype, device and precision: a conservative field of the model's scale (the numerical floor).

    ``coupled``: the same Gaussian turned by a fixed orthogonal map (:class:`TurnedGaussian`, same
    spectrum), whose Jacobian is dense: the control of diagnostics whose method's rounding only shows
    through couplings between coordinates (:attr:`~conservcheck.diagnostics.Diagnostic.coupled_control`).
    """
    flat = x0.detach().to("cpu", torch.float64).reshape(x0.shape[0], -1)
    if coupled:
        field: Any = TurnedGaussian(
            flat.mean(0), flat.std(0, unbiased=False), process=probe.process, sample_shape=probe.sample_shape
        )
    else:
        field = GaussianMixture(
            flat.mean(0, keepdim=True),
            flat.std(0, unbiased=False, keepdim=True),
            process=probe.process,
            sample_shape=probe.sample_shape,
        )
    return VectorFieldProbe(
        field.score,
        process=probe.process,
        sample_shape=probe.sample_shape,
        parameterization="score",
        data_range=probe.data_range,
        device=probe.device,
        dtype=probe.dtype,
        precision=probe.precision,
        info=ProbeInfo(name="turned-gaussian-control" if coupled else "gaussian-control", adapter="control"),
    )


def plan_units(
    probe: VectorFieldProbe,
    opts: dict[str, Any],
    points: list[TimePoint],
    guidance: tuple[float, ...] | None = None,
) -> list[UnitSpec]:
    """Units in run order: for each time point, each registered diagnostic's planned variants, the model
    unit (one per guidance scale of a conditional model) then (for a controlled variant) its control unit;
    a group's index is in ``UnitSpec.group``."""
    variants = [
        (name, v, spec.coupled_control)
        for name, spec in diagnostics.registered().items()
        for v in spec.plan(opts, probe)
    ]
    plan: list[UnitSpec] = []
    groups = ((tp, item) for tp in points for item in variants)
    scales: tuple[float | None, ...] = guidance if guidance else (None,)
    for group, (tp, (diag, v, coupled)) in enumerate(groups):
        for w in scales:
            cost = v.cost * guidance_cost(w)
            plan.append(UnitSpec("model", diag, v.name, tp, v.run, v.kwargs, cost, group, guidance=w))
        if v.controlled:
            plan.append(
                UnitSpec("control", diag, v.name, tp, v.run, v.kwargs, v.cost * CONTROL_COST, group, coupled=coupled)
            )
    return plan


def follow_model(spec: UnitSpec, model_record: dict[str, Any] | None) -> dict[str, Any]:
    """Keywords a control unit takes from its model unit's meta (the diagnostic's ``control_follows``):
    none for a model unit, or when the model unit did not finish cleanly."""
    if spec.field != "control" or model_record is None or model_record.get("status") != "ok":
        return {}
    meta = model_record.get("meta") or {}
    return {k: meta[k] for k in diagnostics.get(spec.diagnostic).control_follows if meta.get(k) is not None}


def unit_record(spec: UnitSpec, status: str, message: str | None = None) -> dict[str, Any]:
    """A unit's record without values (the form of a skipped or failed unit)."""
    return {
        "key": spec.key,
        "field": spec.field,
        "diagnostic": spec.diagnostic,
        "variant": spec.variant,
        "time": {"key": spec.time.key, **spec.time.to_dict()},
        "guidance": spec.guidance,
        "status": status,
        "message": message,
        "values": {},
        "meta": {},
    }


def run_unit(
    spec: UnitSpec,
    probe: VectorFieldProbe,
    x0: Tensor,
    seed: int,
    batcher: Batcher,
    follow: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one unit and return its JSON-ready record (status ok / nonfinite / error); ``follow`` are the
    keywords of :func:`follow_model`."""
    try:
        with conditioning.select(probe, guidance=spec.guidance):
            result = _run_per_condition(spec, probe, x0, seed, batcher, {**spec.kwargs, **(follow or {})})
    except Exception as err:
        # A model that raises at this time point (its own code, or out of memory even at batch size 1) is
        # reported there and the audit goes on; Ctrl-C (not an Exception) still stops it.
        log.debug("unit %s raised", spec.key, exc_info=True)
        msg = err.message if isinstance(err, ProbeContractError) else reason(err)
        return unit_record(spec, "error", (msg.splitlines() or [type(err).__name__])[0])
    values = {k: v.detach().to("cpu", torch.float64) for k, v in result.values.items()}
    for col in diagnostics.get(spec.diagnostic).abs_columns:
        if col in values:
            values[f"abs_{col}"] = values[col].abs()
    bad = torch.zeros(len(x0), dtype=torch.bool)
    for v in values.values():
        bad |= ~torch.isfinite(v)
    record = unit_record(spec, "ok")
    if bool(bad.any()):
        record.update(
            status="nonfinite",
            message=f"NaN/Inf values in {int(bad.sum())} of {len(x0)} samples (the model's output is not finite there)",
        )
    record.update(values={k: v.tolist() for k, v in values.items()}, meta=result.meta)
    # The exact floats a resumed audit reads back from the partial-results file (NaN/Inf as null).
    exact: dict[str, Any] = json.loads(json.dumps(json_safe(record), allow_nan=False))
    return exact


def _run_per_condition(
    spec: UnitSpec, probe: VectorFieldProbe, x0: Tensor, seed: int, batcher: Batcher, kwargs: dict[str, Any]
) -> DiagnosticResult:
    """The unit's diagnostic, run once per condition on that condition's samples (with their global
    indices); values are put back in sample order, meta is the first condition's with ``n_evals`` summed."""
    parts = conditioning.groups(probe, range(len(x0)), seed)
    if len(parts) == 1:
        with conditioning.select(probe, condition=parts[0][0]):
            return spec.run(probe, x0, spec.time, seed=seed, batcher=batcher, **kwargs)
    results = []
    for condition, pos in parts:
        with conditioning.select(probe, condition=condition):
            rows = torch.tensor(pos, device=x0.device)
            results.append(spec.run(probe, x0[rows], spec.time, seed=seed, batcher=batcher, start=pos, **kwargs))
    first = results[0]
    values = {k: torch.empty(len(x0), dtype=v.dtype) for k, v in first.values.items()}
    for (_, pos), r in zip(parts, results):
        for k, v in r.values.items():
            values[k][torch.tensor(pos)] = v.cpu()
    meta = dict(first.meta)
    if "n_evals" in meta:
        meta["n_evals"] = sum(r.meta.get("n_evals", 0) for r in results)
    meta["condition_groups"] = len(parts)
    return DiagnosticResult(first.diagnostic, first.variant, first.time, values, meta)


def jacobian_strategies(units: list[dict[str, Any]]) -> dict[str, Any]:
    """The Jacobian / divergence strategy each model diagnostic used (from the units' meta)."""
    out: dict[str, Any] = {}
    for u in units:
        for key in ("strategy", "divergence"):
            value = u.get("meta", {}).get(key)
            if u["field"] == "model" and value is not None:
                out.setdefault(f"{u['diagnostic']}.{u['variant']}", value)
    return out


def build_report(
    header: dict[str, Any], records: list[dict[str, Any]], run_info: dict[str, Any], t0: float
) -> AuditReport:
    """The report of ``records`` under ``header``; ``run_info`` gains the finish time and the wall time since ``t0``."""
    run_info.update(
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        wall_time_s=round(time.perf_counter() - t0, 3),
    )
    report = AuditReport.from_units(header, records, run_info)
    log.info("verdict %s", report.verdict)
    return report
