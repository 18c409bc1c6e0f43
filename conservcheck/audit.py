"""`audit`: every diagnostic at every time point on one model, with its numerical floor, in one report.

The audit loads the model, checks its contract once (shape, finiteness, determinism, batch
independence, use of its time input), obtains clean samples x0 (``data`` or the model's own deterministic
samples), and runs *units* — one diagnostic variant at one time point — on two fields: the model and a
conservative *control* (the exact score of a diagonal Gaussian fitted to x0, in the model's dtype,
device and precision, evaluated on the very same loops and probe vectors). The control's values are the
audit's numerical floor (see :mod:`conservcheck.report` for the verdict rule).

Every finished unit is appended to a partial-results file (JSON lines, flushed and synced), so Ctrl-C or
a killed job loses at most the unit in progress; ``resume=PATH`` reuses the finished units and, because
every random draw is keyed by (seed, stream, time point, sample index), gives exactly the report an
uninterrupted run gives. A bad model does not stop the audit: a unit whose model raises or returns
NaN/Inf is recorded with its status, reported per time point, and the verdict becomes ``invalid``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from . import __version__
from .contract import check_probe
from .data import load_data, tensor_sha256
from .defaults import OPTIONS, device_defaults, resolve_device, resolve_options, time_points
from .diagnostics.base import DiagnosticResult, TimePoint
from .engine import Batcher
from .errors import ProbeContractError, UsageError
from .fields import GaussianMixture
from .precision import storage_dtype
from .probe import ProbeInfo, VectorFieldProbe
from .report import SCHEMA_VERSION, AuditReport
from .sampling import cache_folder, model_samples

log = logging.getLogger("conservcheck")

DEFAULT_MODEL = "embedded:digits"
#: Signed loop columns whose absolute value is reported too (the paper plots |∮ s·dy| and its ratios).
ABS_COLUMNS = {"loop": ("circulation_per_length", "eq7", "circulation_ratio")}
#: Relative cost of a unit on the analytic control field (for the progress bar only).
CONTROL_COST = 0.02
JOURNAL_FORMAT = "conservcheck-partial-results"

Progress = Callable[[float, float, str], None]


class AuditInterrupted(KeyboardInterrupt):
    """Ctrl-C during an audit: finished units are safe in ``partial_path`` (resume with it)."""

    def __init__(self, partial_path: Path, n_done: int) -> None:
        super().__init__(f"interrupted; {n_done} finished units are saved in {partial_path}")
        self.partial_path = partial_path
        self.n_done = n_done


@dataclass
class UnitSpec:
    """One planned unit: which diagnostic variant runs on which field at which time point."""

    field: str
    diagnostic: str
    variant: str
    time: TimePoint
    run: Callable[..., DiagnosticResult]
    kwargs: dict[str, Any]
    cost: float

    @property
    def key(self) -> str:
        return f"{self.field}/{self.diagnostic}/{self.variant}/{self.time.key}"


# ---------------------------------------------------------------------------------------------- model


def _load_model(model: VectorFieldProbe | str, opts: dict[str, Any], given: set[str]) -> VectorFieldProbe:
    if isinstance(model, VectorFieldProbe):
        for name in ("revision", "trust_remote_code"):
            if name in given and opts[name] not in (None, False):
                raise UsageError(f"{name} applies to model references, not to a probe object", f"drop {name}")
        if "device" in given and opts["device"] != "auto" and resolve_device(opts["device"]) != model.device:
            raise UsageError(f"the probe lives on {model.device}, not {opts['device']}", "move the probe or drop device")
        if "precision" in given and opts["precision"] != model.precision:
            if storage_dtype(opts["precision"]) != model.dtype:
                raise UsageError(
                    f"precision {opts['precision']} does not fit a probe stored in {model.dtype}",
                    "build the probe with the matching dtype (float64 for fp64, float32 otherwise)",
                )
            model.precision = opts["precision"]
        return model
    if not isinstance(model, str):
        raise UsageError(f"model must be a VectorFieldProbe or a reference string, got {type(model).__name__}",
                         "pass e.g. 'embedded:digits' or a probe")
    from .references import load_reference

    probe = load_reference(
        model, revision=opts["revision"], cache_dir=opts["cache_dir"], device=resolve_device(opts["device"]),
        dtype=storage_dtype(opts["precision"]), trust_remote_code=opts["trust_remote_code"],
    )
    probe.precision = opts["precision"]
    return probe


def control_probe(probe: VectorFieldProbe, x0: Tensor) -> VectorFieldProbe:
    """The exact score of N(mean(x0), diag var(x0)) under the probe's process, as a probe in the same
    dtype, device and precision: a conservative field of the model's scale (the numerical floor)."""
    flat = x0.detach().to("cpu", torch.float64).reshape(x0.shape[0], -1)
    gauss = GaussianMixture(flat.mean(0, keepdim=True), flat.std(0, unbiased=False, keepdim=True),
                            process=probe.process, sample_shape=probe.sample_shape)
    return VectorFieldProbe(
        gauss.score, process=probe.process, sample_shape=probe.sample_shape,
        parameterization="score", data_range=probe.data_range, device=probe.device, dtype=probe.dtype,
        precision=probe.precision, info=ProbeInfo(name="gaussian-control", adapter="control"),
    )


# ----------------------------------------------------------------------------------------------- plan


def _plan(probe: VectorFieldProbe, opts: dict[str, Any], points: list[TimePoint]) -> list[UnitSpec]:
    n = opts["n_samples"]
    specs: list[tuple[str, str, Callable[..., DiagnosticResult], dict[str, Any], float, bool]] = []
    if opts["paths"]:
        from .diagnostics.loops import loop_diagnostic

        nodes = 64 if opts["n_points"] == "auto" else opts["n_points"]
        extra = {"max_chunk_elements": max(1, opts["memory_budget"] // 32)} if opts["memory_budget"] else {}
        for path in opts["paths"]:
            kw = dict(path=path, n_points=opts["n_points"], n_vertices=opts["n_vertices"], bridge_U=opts["bridge_u"], **extra)
            specs.append(("loop", path, loop_diagnostic, kw, n * nodes, True))
    if opts["curl"] in ("subjacobian", "both"):
        from .diagnostics.curl import curl_subjacobian

        block = min(opts["block"], probe.dim)
        specs.append(("curl", "subjacobian", curl_subjacobian, {"block": block}, 2 * n * block, True))
    if opts["curl"] in ("hutchinson", "both"):
        from .diagnostics.curl import curl_hutchinson

        specs.append(("curl", "hutchinson", curl_hutchinson, {"n_probes": opts["n_probes"]}, 3 * n * opts["n_probes"], True))
    if opts["stein"]:
        from .diagnostics.stein import stein_diagnostic
        from .reference import resolve_reference

        ref = resolve_reference(opts["stein"], probe)
        kw = {"reference": ref, "n_probes": opts["n_probes"]}
        # The variant is the reference's kind (funnel, gaussian, mixture, data, …): a name without the
        # dots of a file path, so gate expressions can address it.
        variant = ref.name.split(":")[0].replace(".", "_") or "reference"
        specs.append(("stein", variant, stein_diagnostic, kw, 3 * n * opts["n_probes"], False))
    plan = []
    for tp in points:
        for diag, variant, fn, kw, cost, controlled in specs:
            plan.append(UnitSpec("model", diag, variant, tp, fn, kw, cost))
            if controlled:
                plan.append(UnitSpec("control", diag, variant, tp, fn, kw, cost * CONTROL_COST))
    return plan


def _record(spec: UnitSpec, status: str, message: str | None = None) -> dict[str, Any]:
    """A unit's record without values (the form of a skipped or failed unit)."""
    return {"key": spec.key, "field": spec.field, "diagnostic": spec.diagnostic, "variant": spec.variant,
            "time": {"key": spec.time.key, **spec.time.to_dict()}, "status": status, "message": message,
            "values": {}, "meta": {}}


def _run_unit(spec: UnitSpec, probe: VectorFieldProbe, x0: Tensor, seed: int, batcher: Batcher) -> dict[str, Any]:
    """Run one unit and return its JSON-ready record (status ok / nonfinite / error)."""
    try:
        result = spec.run(probe, x0, spec.time, seed=seed, batcher=batcher, **spec.kwargs)
    except (ProbeContractError, RuntimeError, ValueError) as err:
        # A model that raises at this time point is reported there; the audit goes on.
        msg = err.message if isinstance(err, ProbeContractError) else f"{type(err).__name__}: {err}"
        return _record(spec, "error", msg.splitlines()[0])
    values = {k: v.detach().to("cpu", torch.float64) for k, v in result.values.items()}
    for col in ABS_COLUMNS.get(spec.diagnostic, ()):
        if col in values:
            values[f"abs_{col}"] = values[col].abs()
    bad = torch.zeros(len(x0), dtype=torch.bool)
    for v in values.values():
        bad |= ~torch.isfinite(v)
    record = _record(spec, "ok")
    if bool(bad.any()):
        record.update(status="nonfinite", message=f"NaN/Inf values in {int(bad.sum())} of {len(x0)} samples "
                                                   "(the model's output is not finite there)")
    record.update(values={k: v.tolist() for k, v in values.items()}, meta=_jsonable(result.meta))
    # The exact floats a resumed audit reads back from the partial-results file.
    return json.loads(json.dumps(record))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# -------------------------------------------------------------------------------------------- journal


class Journal:
    """The partial-results file: a header line, then one JSON line per finished unit."""

    def __init__(self, path: Path, fingerprint: str, done: dict[str, dict[str, Any]]) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.done = done

    @classmethod
    def open(cls, path: Path, fingerprint: str, reuse: bool) -> "Journal":
        """Read the finished units of ``path`` (when ``reuse``) or start it afresh."""
        done: dict[str, dict[str, Any]] = {}
        if reuse and path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            try:
                head = json.loads(lines[0]) if lines else {}
            except ValueError:
                head = {}
            if head.get("format") != JOURNAL_FORMAT:
                raise UsageError(f"{path} is not a conservcheck partial-results file", "pass the file an audit wrote")
            if head.get("fingerprint") != fingerprint:
                raise UsageError(
                    f"{path} holds partial results of a different audit (model, data or options differ)",
                    "resume with exactly the same model, data and options, or remove the file",
                )
            for line in lines[1:]:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # the unit being written when the job was killed
                done[rec["key"]] = rec
            return cls(path, fingerprint, done)
        path.parent.mkdir(parents=True, exist_ok=True)
        head = {"format": JOURNAL_FORMAT, "schema_version": SCHEMA_VERSION, "fingerprint": fingerprint}
        path.write_text(json.dumps(head) + "\n", encoding="utf-8")
        return cls(path, fingerprint, done)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[record["key"]] = record


# ----------------------------------------------------------------------------------------------- audit


def _environment(probe: VectorFieldProbe) -> dict[str, Any]:
    import numpy
    import pandas

    dev = probe.device
    return {
        "python": platform.python_version(), "platform": platform.platform(), "conservcheck": __version__,
        "torch": torch.__version__, "cuda": torch.version.cuda, "numpy": numpy.__version__, "pandas": pandas.__version__,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine()),
        "cpu_threads": torch.get_num_threads(),
    }


def _strategies(units: list[dict[str, Any]]) -> dict[str, Any]:
    """The Jacobian / divergence strategy each model diagnostic used (from the units' meta)."""
    out: dict[str, Any] = {}
    for u in units:
        for key in ("strategy", "divergence"):
            value = u.get("meta", {}).get(key)
            if u["field"] == "model" and value is not None:
                out.setdefault(f"{u['diagnostic']}.{u['variant']}", value)
    return out


def _fingerprint(probe: VectorFieldProbe, opts: dict[str, Any], points: list[TimePoint], x0_sha: str) -> str:
    numeric = {o.name: opts[o.name] for o in OPTIONS if o.numeric}
    blob = {"schema": SCHEMA_VERSION, "model": probe.describe(), "options": numeric,
            "time_points": [p.to_dict() for p in points], "x0": x0_sha}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _with_hash(x0: Tensor, source: dict[str, Any], probe: VectorFieldProbe) -> tuple[Tensor, dict[str, Any]]:
    x0 = x0.to(device=probe.device, dtype=probe.dtype)
    return x0, {**source, "sha256": tensor_sha256(x0)}


def audit(model: VectorFieldProbe | str = DEFAULT_MODEL, *, progress: Progress | None = None, **options: Any) -> AuditReport:
    """Audit a model: loop integrals, curl and (optionally) the Stein diagnostic at several time points.

    Args:
        model: a :class:`VectorFieldProbe`, or a reference string (``embedded:digits``, a hub id
            ``owner/name``, a local folder or file, ``module:factory``).
        progress: optional callback ``progress(done, total, description)`` (work in estimated model
            evaluations) called as units finish.
        **options: the audit options of :data:`conservcheck.defaults.OPTIONS` (``paths``, ``curl``,
            ``stein``, ``times`` / ``time_indices`` / ``sigmas``, ``n_samples``, ``n_points``, ``device``,
            ``precision``, ``batch_size``, ``seed``, ``data``, ``revision``, ``cache_dir``,
            ``trust_remote_code``, ``resume``, ``time_budget``, ``memory_budget``, ``block``, ``n_probes``,
            ``n_vertices``, ``bridge_u``, ``sampler_steps``).
    Returns:
        the :class:`~conservcheck.report.AuditReport`.
    Raises:
        UsageError / ModelLoadError for bad options or an unloadable model; :class:`AuditInterrupted`
        on Ctrl-C (finished work is kept in the partial-results file).
    """
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    opts = resolve_options(options)
    probe = _load_model(model, opts, set(options))
    opts, cpu_scaled = device_defaults(opts, probe.device)
    points = time_points(probe, opts["times"], opts["time_indices"], opts["sigmas"])
    batcher = Batcher(opts["batch_size"], probe, cache_dir=cache_folder(opts["cache_dir"], "batch") if probe.device.type == "cuda" else None)
    plan = _plan(probe, opts, points)
    # User data is read before anything is logged, so a mistake in it is the only line printed.
    data = _with_hash(*load_data(opts["data"], probe, opts["n_samples"], opts["seed"]), probe) if opts["data"] else None
    if cpu_scaled:
        log.info("CPU-scaled defaults: %d samples per time point, %s nodes per loop (the paper: 256 and 1000; "
                 "set --samples / --points to change)", opts["n_samples"], opts["n_points"])
    problems = list(check_probe(probe, seed=opts["seed"]).problems)
    for p in problems:
        log.warning("model contract: %s", p)
    header = {
        "tool": {"name": "conservcheck", "version": __version__},
        "model": probe.describe(),
        "process": probe.process.to_dict(),
        "time_convention": probe.time_convention.to_dict(),
        "time_points": [{"key": p.key, **p.to_dict()} for p in points],
        "options": {**{o.name: opts[o.name] for o in OPTIONS if o.numeric}, "cpu_scaled": cpu_scaled},
        "environment": _environment(probe),
    }
    run_info: dict[str, Any] = {"options": {o.name: opts[o.name] for o in OPTIONS if not o.numeric},
                                "batch_size": batcher.batch_size, "started_at": started.isoformat(timespec="seconds")}
    sampling_cost = 0.0 if data else float(opts["n_samples"] * opts["sampler_steps"])
    total = sampling_cost + sum(s.cost for s in plan)
    if data is not None:
        x0, source = data
        log.info("x0: %d samples from %s (%s)", len(x0), opts["data"], source["mapping"])
    else:
        if progress is not None:
            progress(0.0, total, "drawing x0 from the model")
        try:
            x0, source = _with_hash(*model_samples(probe, opts["n_samples"], opts["seed"], steps=opts["sampler_steps"],
                                                   batcher=batcher, cache_dir=opts["cache_dir"]), probe)
        except ProbeContractError as err:
            problems.append(err.message)
            header.update(data_source={"kind": "model", "error": err.message},
                          jacobian_strategy={}, problems=problems, complete=False)
            return _finish(header, [], run_info, t0)
    header["data_source"] = source
    control = control_probe(probe, x0)
    fingerprint = _fingerprint(probe, opts, points, source["sha256"])
    explicit = opts["resume"] is not None
    path = Path(opts["resume"]).expanduser() if explicit else cache_folder(opts["cache_dir"], "runs") / f"{fingerprint[:20]}.jsonl"
    journal = Journal.open(path, fingerprint, reuse=explicit)
    reused = sum(s.key in journal.done for s in plan)
    log.info("partial results: %s%s", path, f" ({reused} finished units reused)" if reused else "")
    fields = {"model": probe, "control": control}
    deadline = None if opts["time_budget"] is None else t0 + opts["time_budget"]
    records: list[dict[str, Any]] = []
    done_work = sampling_cost
    try:
        for spec in plan:
            rec = journal.done.get(spec.key)
            if rec is None and deadline is not None and time.perf_counter() > deadline:
                records.append(_record(spec, "skipped", "time budget exhausted"))
                continue
            if rec is None:
                rec = _run_unit(spec, fields[spec.field], x0, opts["seed"], batcher)
                journal.append(rec)
            records.append(rec)
            done_work += spec.cost
            if progress is not None:
                progress(done_work, total, f"{spec.diagnostic}.{spec.variant} {spec.field} {spec.time.key}")
    except KeyboardInterrupt:
        raise AuditInterrupted(path, len(journal.done)) from None
    complete = all(r["status"] != "skipped" for r in records)
    header.update(jacobian_strategy=_strategies(records), problems=problems, complete=complete)
    run_info.update(units_reused=reused, partial_results=str(path))
    report = _finish(header, records, run_info, t0)
    if not explicit and complete:
        path.unlink(missing_ok=True)
    return report


def _finish(header: dict[str, Any], records: list[dict[str, Any]], run_info: dict[str, Any], t0: float) -> AuditReport:
    run_info.update(finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    wall_time_s=round(time.perf_counter() - t0, 3))
    report = AuditReport.from_units(header, records, run_info)
    log.info("verdict %s", report.verdict)
    return report


def _signature() -> inspect.Signature:
    """``audit(model, *, progress, <every option>)`` with the table's defaults, for help() and IDEs."""
    params = [
        inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=DEFAULT_MODEL,
                          annotation="VectorFieldProbe | str"),
        inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Progress | None"),
    ]
    params += [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default) for o in OPTIONS]
    return inspect.Signature(params, return_annotation="AuditReport")


audit.__signature__ = _signature()  # type: ignore[attr-defined]

__all__ = ["AuditInterrupted", "DEFAULT_MODEL", "audit", "control_probe"]
