"""`audit`: every diagnostic at every time point on one model, with its numerical floor, in one report.

The audit loads the model, checks its contract once (shape, finiteness, determinism, batch
independence, use of its time input), obtains clean samples x0 (``data`` or the model's own deterministic
samples), and runs *units* — one diagnostic variant at one time point — on two fields: the model and a
conservative *control* (the exact score of a diagonal Gaussian fitted to x0, in the model's dtype,
device and precision, evaluated on the very same loops and probe vectors). The control's values are the
audit's numerical floor (see :mod:`conservcheck.report.audit_report` for the verdict rule).

Every finished unit is appended to a partial-results file (JSON lines, flushed and synced), so Ctrl-C or
a killed job loses at most the unit in progress; ``resume=PATH`` reuses the finished units and, because
every random draw is keyed by (seed, stream, time point, sample index), gives the report an
uninterrupted run gives — bit for bit with the same batch size and thread count on the same kind of
machine, and within the reproducibility tolerance otherwise (:mod:`conservcheck.report.reproducibility`).
A bad model does not stop the audit: a unit whose model raises or returns NaN/Inf is recorded with its
status, reported per time point, and the verdict becomes ``invalid``.

Distributed runs (docs/distributed.md): ``shard="i/n"`` runs only the units of group g ≡ i (mod n), where
a group is one (diagnostic, variant, time point) — the model unit and its control — numbered in plan
order, and writes them to its own partial-results file. The shards never communicate (a dead one cannot
block the others); :func:`conservcheck.merge` checks that their files come from one audit and together hold every
unit, and builds the report an unsharded run gives: units are computed whole, so it is bit-identical
when the shards ran with the single run's batch size and thread count.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import platform
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from conservcheck import conditioning
from conservcheck.batching import Batcher
from conservcheck.contract import check_probe
from conservcheck.errors import ProbeContractError, UsageError, reason
from conservcheck.files import cache_folder, check_writable, json_safe
from conservcheck.precision import storage_dtype
from conservcheck.probe import VectorFieldProbe, weights_digest
from conservcheck.report import SCHEMA_VERSION, AuditReport
from conservcheck.runner.estimate import duration_text, estimate
from conservcheck.runner.journal import Journal
from conservcheck.runner.options import (
    CONDITION_OPTIONS,
    audit_options,
    cpu_scaled_text,
    device_defaults,
    numeric_options,
    resolve_device,
    resolve_options,
    shard_of,
)
from conservcheck.runner.progress import Progress, ProgressLog
from conservcheck.runner.size_guard import check_size
from conservcheck.runner.units import (
    UnitSpec,
    build_report,
    control_probe,
    follow_model,
    guidance_cost,
    jacobian_strategies,
    plan_units,
    run_unit,
    unit_record,
)
from conservcheck.timepoints import TimePoint, time_points
from conservcheck.version import __version__
from conservcheck.x0.data import load_data, tensor_sha256
from conservcheck.x0.model_samples import is_cached, model_samples

log = logging.getLogger("conservcheck")

DEFAULT_MODEL = "embedded:digits"
SKIPPED_BUDGET = "time budget exhausted — run again with --resume to finish"
SKIPPED_SHARD = "left to the other shards — combine their files with conservcheck merge"


class AuditInterrupted(KeyboardInterrupt):
    """Ctrl-C during an audit: finished units are safe in ``partial_path`` (resume with it)."""

    def __init__(self, partial_path: Path, n_done: int, shard: str | None = None) -> None:
        super().__init__(f"interrupted; {n_done} finished units are saved in {partial_path}")
        self.partial_path = partial_path
        self.n_done = n_done
        self.shard = shard

    @property
    def resume_flags(self) -> str:
        """The flags that continue this audit: ``--resume PATH`` (and its ``--shard``)."""
        return (f"--shard {self.shard} " if self.shard else "") + f"--resume {self.partial_path}"


def load_model(model: VectorFieldProbe | str, opts: dict[str, Any], given: set[str]) -> VectorFieldProbe:
    condition = {k: opts[k] for k in CONDITION_OPTIONS if opts.get(k) is not None}
    if isinstance(model, VectorFieldProbe):
        if condition:
            flag = "--" + next(iter(condition)).replace("_", "-")
            raise UsageError(
                f"{flag} applies to model references; a probe object carries its own conditions",
                "build the probe with them (conservcheck.conditioning.ConditionalField) or pass a reference",
            )
        for name in ("revision", "trust_remote_code"):
            if name in given and opts[name] not in (None, False):
                raise UsageError(f"{name} applies to model references, not to a probe object", f"drop {name}")
        if "device" in given and opts["device"] != "auto" and resolve_device(opts["device"]) != model.device:
            raise UsageError(
                f"the probe lives on {model.device}, not {opts['device']}", "move the probe or drop device"
            )
        if "precision" in given and opts["precision"] != model.precision:
            if storage_dtype(opts["precision"]) != model.dtype:
                raise UsageError(
                    f"precision {opts['precision']} does not fit a probe stored in {model.dtype}",
                    "build the probe with the matching dtype (float64 for fp64, float32 otherwise)",
                )
            # The caller's probe is left as it was: the audit runs a copy at the requested precision.
            model = copy.copy(model)
            model.precision = opts["precision"]
        if model.info.weights_sha256 is None and "identity" not in model.info.extra:
            # A probe object names no weights file: its identity is the weights its callable holds.
            model = copy.copy(model)
            extra = {**model.info.extra, "identity": {"weights_sha256": weights_digest(model.fn)}}
            model.info = dataclasses.replace(model.info, extra=extra)
        return model
    if not isinstance(model, str):
        raise UsageError(
            f"model must be a VectorFieldProbe or a reference string, got {type(model).__name__}",
            "pass e.g. 'embedded:digits' or a probe",
        )
    from conservcheck.adapters.resolve import load_reference

    probe = load_reference(
        model,
        revision=opts["revision"],
        cache_dir=opts["cache_dir"],
        device=resolve_device(opts["device"]),
        dtype=storage_dtype(opts["precision"]),
        trust_remote_code=opts["trust_remote_code"],
        condition=condition,
    )
    probe.precision = opts["precision"]
    return probe


def guidance_scales(probe: VectorFieldProbe, opts: dict[str, Any]) -> tuple[float, ...] | None:
    """The guidance axis of an audit: the ``guidance_scale`` option, (1.0,) — the conditional field — for a
    conditional model without it, None for an unconditional model (which refuses the option)."""
    scales = opts.get("guidance_scale")
    if probe.conditioning is None:
        if scales is not None:
            raise UsageError(
                "--guidance-scale needs a conditional model; this one is unconditional", "drop --guidance-scale"
            )
        return None
    return tuple(scales) if scales is not None else (1.0,)


def load(
    model: str,
    *,
    device: str = "auto",
    precision: str = "fp32",
    revision: str | None = None,
    cache_dir: str | None = None,
    trust_remote_code: bool = False,
    prompt: str | list[str] | None = None,
    negative_prompt: str | None = None,
    class_label: int | list[int] | str | None = None,
) -> VectorFieldProbe:
    """A model reference as a :class:`VectorFieldProbe` (score units at canonical time).

    ``model`` is what ``conservcheck audit`` takes: ``embedded:<name>``, a hub id ``owner/name[@rev]``, a
    local folder or file, or ``module:factory``; the other arguments mean what the audit options of the
    same names mean (``prompt``, ``negative_prompt``, ``class_label``: the conditions of a conditional
    model, docs/conditional.md). Raises :class:`UsageError` / :class:`ModelLoadError` with a one-line message.
    """
    given = {
        "device": device,
        "precision": precision,
        "revision": revision,
        "cache_dir": cache_dir,
        "trust_remote_code": trust_remote_code,
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "class_label": class_label,
    }
    opts = resolve_options({k: v for k, v in given.items() if v is not None})
    return load_model(model, opts, set(given))


def _environment(probe: VectorFieldProbe) -> dict[str, Any]:
    import numpy
    import pandas

    dev = probe.device
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "conservcheck": __version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "numpy": numpy.__version__,
        "pandas": pandas.__version__,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else (platform.processor() or platform.machine()),
        "cpu_threads": torch.get_num_threads(),
    }


def _identity(
    model: dict[str, Any], opts: dict[str, Any], points: list[TimePoint], x0_sha: str, batch: int
) -> dict[str, Any]:
    """Everything that decides the audit's numbers: the model's identity, units and conditions (for a
    ``module:factory`` model its module file's and returned weights' SHA-256), the numeric options, the time
    points, x0, and the batch size (a batched forward pass rounds differently at another batch size)."""
    identity: dict[str, Any] = json_safe(
        {
            "schema": SCHEMA_VERSION,
            "model": model,
            "options": numeric_options(opts),
            "time_points": [p.to_dict() for p in points],
            "x0": x0_sha,
            "batch_size": batch,
        }
    )
    return identity


def _fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _with_hash(x0: Tensor, source: dict[str, Any], probe: VectorFieldProbe) -> tuple[Tensor, dict[str, Any]]:
    x0 = x0.to(device=probe.device, dtype=probe.dtype)
    return x0, {**source, "sha256": tensor_sha256(x0)}


def _check_cache_dir(cache_dir: str | None) -> None:
    """A ``cache_dir`` that cannot hold the audit's files is the user's mistake, said before any work."""
    if cache_dir is None:
        return
    try:
        folder = cache_folder(cache_dir, "runs")
    except ValueError:  # huggingface_hub: a file where a folder of the cache should be
        raise UsageError(
            f"cannot use --cache-dir {cache_dir}: a file is in the way of its folders", "pass a folder you can write to"
        ) from None
    except OSError as err:
        raise UsageError(
            f"cannot use --cache-dir {cache_dir}: {err.strerror or err}", "pass a folder you can write to"
        ) from None
    try:
        check_writable(folder / "probe", "--cache-dir")
    except UsageError:
        raise UsageError(
            f"cannot use --cache-dir {cache_dir}: it is not writable", "pass a folder you can write to"
        ) from None


def _default_journal(opts: dict[str, Any], fingerprint: str, started: datetime) -> Path:
    """A partial-results file of this run alone: the audit's fingerprint, the start time, the process and a
    random token (two identical audits started at once never share a file)."""
    shard, n_shards = shard_of(opts["shard"])
    stamp = started.strftime("%Y%m%dT%H%M%S")
    name = f"{fingerprint[:20]}-{stamp}-{os.getpid()}-{secrets.token_hex(4)}"
    name += f".shard{shard}of{n_shards}" if opts["shard"] else ""
    return cache_folder(opts["cache_dir"], "runs") / f"{name}.jsonl"


def audit(
    model: VectorFieldProbe | str = DEFAULT_MODEL,
    *,
    progress: Progress | None = None,
    keep_partial_results: bool = False,
    **options: Any,
) -> AuditReport:
    """Audit a model: loop integrals, curl and (optionally) the Stein diagnostic at several time points.

    Args:
        model: a :class:`VectorFieldProbe`, or a reference string (``embedded:digits``, a hub id
            ``owner/name``, a local folder or file, ``module:factory``).
        progress: optional callback ``progress(done, total, description)`` (work in estimated model
            evaluations) called as x0 sampling starts and as each unit finishes. Progress also reaches
            the logger ``conservcheck.progress`` (INFO, one line at most every 10 s, between model
            batches too), and the plan — units, model evaluations and the time they will take, from a timed
            forward pass (:mod:`conservcheck.runner.estimate`) — the logger ``conservcheck`` before any
            work starts.
        keep_partial_results: keep the default partial-results file of a complete audit (the caller removes
            it once the report is safely written, see :func:`discard_partial_results`); by default it is
            removed when the report is built. A ``resume`` file is always kept.
        **options: the audit options of :data:`conservcheck.runner.options.OPTIONS` (``paths``, ``curl``,
            ``stein``, ``times`` / ``time_indices`` / ``sigmas``, ``n_samples``, ``n_points``, ``device``,
            ``precision``, ``batch_size``, ``seed``, ``data``, ``revision``, ``cache_dir``,
            ``trust_remote_code``, ``resume``, ``time_budget``, ``memory_budget``, ``shard``, ``block``,
            ``n_probes``, ``n_vertices``, ``bridge_u``, ``sampler_steps``; for conditional models
            ``prompt``, ``prompt_file``, ``negative_prompt``, ``class_label`` and ``guidance_scale``).
    Returns:
        the :class:`~conservcheck.report.audit_report.AuditReport` (with ``shard``, a partial report: the other
        shards' units are ``skipped``; :func:`merge` combines the shards' files).
    Raises:
        UsageError / ModelLoadError for bad options, an unloadable model or an audit too large for the
        machine's memory; :class:`AuditInterrupted` on Ctrl-C (finished work is kept in the partial-results
        file).
    """
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    clock = _PhaseClock()
    opts = resolve_options(options)
    _check_cache_dir(opts["cache_dir"])
    probe = load_model(model, opts, set(options))
    opts, cpu_scaled = device_defaults(opts, probe.device)
    points = time_points(probe, opts["times"], opts["time_indices"], opts["sigmas"])
    scales = guidance_scales(probe, opts)
    plan = plan_units(probe, opts, points, scales)
    check_size(plan, probe, opts)
    # User data is read before anything is logged, so a mistake in it is the only line printed.
    data = _with_hash(*load_data(opts["data"], probe, opts["n_samples"], opts["seed"]), probe) if opts["data"] else None
    clock.stop("load")
    if cpu_scaled:
        log.info("%s", cpu_scaled_text(opts))
    contract = check_probe(probe, seed=opts["seed"])
    problems, warnings = list(contract.problems), list(contract.warnings)
    for p in problems:
        log.warning("model contract: %s", p)
    # The batch-size search runs a real forward pass: only after the contract check has seen the model; at
    # the largest guidance scale, whose forward pass doubles the batch inside the model when w is not 0 or 1.
    with conditioning.select(probe, guidance=max(scales, key=guidance_cost) if scales else None):
        batcher = Batcher(
            opts["batch_size"],
            probe,
            cache_dir=cache_folder(opts["cache_dir"], "batch") if probe.device.type == "cuda" else None,
        )
    model_info = probe.describe()
    if scales is not None:
        model_info["conditioning"]["guidance_scales"] = list(scales)
    shard, n_shards = shard_of(opts["shard"])
    mine = [s for s in plan if s.group % n_shards == shard]
    sampling = data is None and not is_cached(
        probe, opts["n_samples"], opts["seed"], steps=opts["sampler_steps"], cache_dir=opts["cache_dir"]
    )
    sampling_cost = float(opts["n_samples"] * opts["sampler_steps"]) if sampling else 0.0
    plan_estimate = estimate(probe, mine, len(points), batcher.batch_size, sampling_cost, measure=not problems)
    log.info("%s", plan_estimate.line())
    clock.stop("checks")
    header: dict[str, Any] = {
        "tool": {"name": "conservcheck", "version": __version__},
        "model": model_info,
        "process": probe.process.to_dict(),
        "time_convention": probe.time_convention.to_dict(),
        "time_points": [_point_entry(p) for p in points],
        "options": {**numeric_options(opts), "cpu_scaled": cpu_scaled},
        "environment": _environment(probe),
    }
    run_info: dict[str, Any] = {
        "options": {o.name: opts[o.name] for o in audit_options() if not o.numeric},
        "batch_size": batcher.batch_size,
        "started_at": started.isoformat(timespec="seconds"),
        "estimate": plan_estimate.to_dict(),
        "phase_seconds": clock.seconds,
    }
    tracker = ProgressLog(
        sampling_cost + sum(s.cost for s in mine), len(mine), progress, plan_estimate.seconds_per_eval
    )
    batcher.on_batch = tracker.tick
    if data is not None:
        x0, source = data
        log.info("x0: %d samples from %s (%s)", len(x0), opts["data"], source["mapping"])
    else:
        tracker.begin("drawing x0 from the model", sampling_cost, notify=True)
        try:
            x0, source = _with_hash(
                *model_samples(
                    probe,
                    opts["n_samples"],
                    opts["seed"],
                    steps=opts["sampler_steps"],
                    batcher=batcher,
                    cache_dir=opts["cache_dir"],
                ),
                probe,
            )
        except Exception as err:
            # Without x0 no diagnostic can run: the report says why (the model's own failure, not a crash).
            msg = (
                err.message
                if isinstance(err, ProbeContractError)
                else (f"sampling x0 from the model failed: {reason(err)} (pass clean samples with --data)")
            )
            problems.append(msg)
            header.update(
                data_source={"kind": "model", "error": msg},
                jacobian_strategy={},
                problems=problems,
                warnings=warnings,
                complete=False,
            )
            return build_report(header, [], run_info, t0)
        tracker.advance(sampling_cost, "x0 drawn", unit=False)
        clock.stop("x0")
    if source.get("warning"):
        warnings.append(source["warning"])
    for w in warnings:
        log.warning("warning: %s", w)
    header["data_source"] = source
    release = getattr(probe, "release", None)
    if callable(release):
        release()  # what only obtaining x0 needed (a latent model's autoencoder) is freed before the diagnostics
    controls = {"control": control_probe(probe, x0)}
    if any(s.coupled for s in plan):
        controls["coupled"] = control_probe(probe, x0, coupled=True)
    identity = _identity(model_info, opts, points, source["sha256"], batcher.batch_size)
    fingerprint = _fingerprint(identity)
    explicit = opts["resume"] is not None
    path = Path(opts["resume"]).expanduser() if explicit else _default_journal(opts, fingerprint, started)
    head = {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fingerprint,
        "identity": identity,
        "shard": opts["shard"],
        "plan": [[s.key, s.group] for s in plan],
        "header": json_safe(header),
        "problems": problems,
        "warnings": warnings,
    }
    journal = Journal.open(path, head, reuse=explicit)
    reused = sum(s.key in journal.done for s in plan)
    log.info("partial results: %s%s", path, f" ({reused} finished units reused)" if reused else "")
    try:
        records = _run_units(journal, plan, probe, controls, x0, opts, batcher, tracker, clock, t0)
    finally:
        batcher.on_batch = None
        journal.close()
    complete = all(r["status"] != "skipped" for r in records)
    header.update(
        jacobian_strategy=jacobian_strategies(records), problems=problems, warnings=warnings, complete=complete
    )
    run_info.update(units_reused=reused, partial_results=str(path))
    if opts["shard"]:
        log.info(
            "shard %s: %d of %d units are in %s; combine the %d shards' files with: conservcheck merge FILE... "
            "--json OUT",
            opts["shard"],
            sum(r["status"] != "skipped" for r in records),
            len(plan),
            path,
            n_shards,
        )
    report = build_report(header, records, run_info, t0)
    estimated = plan_estimate.seconds
    log.info(
        "finished in %s%s",
        duration_text(run_info["wall_time_s"]),
        f" (the plan estimated {duration_text(estimated)})" if estimated is not None else "",
    )
    if not explicit and complete:
        report.default_partial_results = path
        if not keep_partial_results:
            discard_partial_results(report)
    return report


class _PhaseClock:
    """Wall seconds per phase of an audit: :meth:`stop` adds the time since the previous stop to ``name``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def stop(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self.last, 3)
        self.last = now


def discard_partial_results(report: AuditReport) -> None:
    """Remove the default partial-results file of a complete audit (call it once the report is safely on
    disk; a ``resume`` file, or the file of an incomplete audit, is never removed)."""
    path = getattr(report, "default_partial_results", None)
    if path is not None:
        Path(path).unlink(missing_ok=True)
        report.default_partial_results = None


def _point_entry(p: TimePoint) -> dict[str, Any]:
    return {"key": p.key, **p.to_dict(), **({"requested": p.requested} if p.requested is not None else {})}


def _run_units(
    journal: Journal,
    plan: list[UnitSpec],
    probe: VectorFieldProbe,
    controls: dict[str, VectorFieldProbe],
    x0: Tensor,
    opts: dict[str, Any],
    batcher: Batcher,
    tracker: ProgressLog,
    clock: _PhaseClock,
    t0: float,
) -> list[dict[str, Any]]:
    """Every unit of the plan: reused from the journal, run (and appended to it), or skipped (another
    shard's, or past the time budget). Ctrl-C raises :class:`AuditInterrupted`."""
    shard, n_shards = shard_of(opts["shard"])
    deadline = None if opts["time_budget"] is None else t0 + opts["time_budget"]
    records: list[dict[str, Any]] = []
    # A control unit follows the first model unit of its group (with guidance scales, the first scale's).
    first_model: dict[int, dict[str, Any]] = {}
    try:
        for spec in plan:
            rec = journal.done.get(spec.key)
            if rec is None and spec.group % n_shards != shard:
                records.append(unit_record(spec, "skipped", SKIPPED_SHARD))
                continue
            if rec is None and deadline is not None and time.perf_counter() > deadline:
                records.append(unit_record(spec, "skipped", SKIPPED_BUDGET))
                continue
            where = spec.time.key + ("" if spec.guidance is None else f" w={spec.guidance:g}")
            what = f"{spec.diagnostic}.{spec.variant} {spec.field} {where}"
            if rec is None:
                tracker.begin(what, spec.cost)
                field = probe if spec.field == "model" else controls["coupled" if spec.coupled else "control"]
                follow = follow_model(spec, first_model.get(spec.group))
                rec = run_unit(spec, field, x0, opts["seed"], batcher, follow)
                journal.append(rec)
                clock.stop(f"{spec.diagnostic}.{spec.variant}")
            if spec.field == "model":
                first_model.setdefault(spec.group, rec)
            records.append(rec)
            tracker.advance(spec.cost, what)
    except KeyboardInterrupt:
        raise AuditInterrupted(journal.path, journal.saved(), opts["shard"]) from None
    return records


def _signature() -> inspect.Signature:
    """``audit(model, *, progress, <every option>)`` with the table's defaults, for help() and IDEs."""
    params = [
        inspect.Parameter(
            "model", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=DEFAULT_MODEL, annotation="VectorFieldProbe | str"
        ),
        inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Progress | None"),
        inspect.Parameter("keep_partial_results", inspect.Parameter.KEYWORD_ONLY, default=False, annotation="bool"),
    ]
    params += [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default) for o in audit_options()]
    return inspect.Signature(params, return_annotation="AuditReport")


audit.__signature__ = _signature()  # type: ignore[attr-defined]

__all__ = ["AuditInterrupted", "DEFAULT_MODEL", "audit", "discard_partial_results", "load_model"]
