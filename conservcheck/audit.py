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

Distributed runs (docs/distributed.md): ``shard="i/n"`` runs only the units of group g ≡ i (mod n), where
a group is one (diagnostic, variant, time point) — the model unit and its control — numbered in plan
order, and writes them to its own partial-results file. The shards never communicate (a dead one cannot
block the others); :func:`merge` checks that their files come from one audit and together hold every
unit, and builds the report an unsharded run gives.
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
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from . import __version__
from .contract import check_probe
from .data import load_data, tensor_sha256
from .defaults import OPTIONS, device_defaults, resolve_device, resolve_options, shard_of, time_points
from .diagnostics.base import DiagnosticResult, TimePoint
from .engine import Batcher
from .errors import ProbeContractError, UsageError
from .fields import GaussianMixture
from .precision import storage_dtype
from .probe import ProbeInfo, VectorFieldProbe
from .report import SCHEMA_VERSION, AuditReport, json_safe, write_atomic
from .sampling import cache_folder, model_samples

log = logging.getLogger("conservcheck")

DEFAULT_MODEL = "embedded:digits"
#: Signed loop columns whose absolute value is reported too (the paper plots |∮ s·dy| and its ratios).
ABS_COLUMNS = {"loop": ("circulation_per_length", "eq7", "circulation_ratio")}
#: Relative cost of a unit on the analytic control field (for the progress bar only).
CONTROL_COST = 0.02
JOURNAL_FORMAT = "conservcheck-partial-results"
#: Peak bytes per loop-geometry element (loop × node × data component) while a chunk of loops is built,
#: evaluated and summed: about five float64 arrays of nodes, quadrature weights and sums (the geometry is
#: float64 whatever the model's dtype), plus the scores in the probe's dtype and, below float64, their
#: float64 copy. Measured with ru_maxrss (D = 512, 64 loops × 256 nodes): fp32 48–52 bytes, fp64 44–49.
LOOP_GEOMETRY_BYTES = 5 * 8
SKIPPED_BUDGET = "time budget exhausted — run again with --resume to finish"
SKIPPED_SHARD = "left to the other shards — combine their files with conservcheck merge"

Progress = Callable[[float, float, str], None]


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
    group: int = 0

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


def loop_bytes_per_element(dtype: torch.dtype) -> int:
    """Peak bytes per loop node component at the probe's ``dtype`` (see :data:`LOOP_GEOMETRY_BYTES`):
    52 for float32, 48 for float64."""
    item = torch.finfo(dtype).bits // 8
    return LOOP_GEOMETRY_BYTES + item + (8 if item < 8 else 0)


def loop_chunk_elements(memory_budget: int, dtype: torch.dtype) -> int:
    """Loop node components (loops × nodes × D) one chunk may hold under ``memory_budget`` bytes."""
    return max(1, memory_budget // loop_bytes_per_element(dtype))


def _plan(probe: VectorFieldProbe, opts: dict[str, Any], points: list[TimePoint]) -> list[UnitSpec]:
    """Units in run order; a group (its index in ``UnitSpec.group``) is one (diagnostic, variant, time point)."""
    n = opts["n_samples"]
    specs: list[tuple[str, str, Callable[..., DiagnosticResult], dict[str, Any], float, bool]] = []
    if opts["paths"]:
        from .diagnostics.loops import loop_diagnostic

        nodes = 64 if opts["n_points"] == "auto" else opts["n_points"]
        budget = opts["memory_budget"]
        extra = {"max_chunk_elements": loop_chunk_elements(budget, probe.dtype)} if budget else {}
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
    plan: list[UnitSpec] = []
    groups = ((tp, spec) for tp in points for spec in specs)
    for group, (tp, (diag, variant, fn, kw, cost, controlled)) in enumerate(groups):
        plan.append(UnitSpec("model", diag, variant, tp, fn, kw, cost, group))
        if controlled:
            plan.append(UnitSpec("control", diag, variant, tp, fn, kw, cost * CONTROL_COST, group))
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
    except Exception as err:
        # A model that raises at this time point (its own code, or out of memory even at batch size 1) is
        # reported there and the audit goes on; Ctrl-C (not an Exception) still stops it.
        log.debug("unit %s raised", spec.key, exc_info=True)
        msg = err.message if isinstance(err, ProbeContractError) else f"{type(err).__name__}: {err}"
        return _record(spec, "error", (msg.splitlines() or [type(err).__name__])[0])
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
    """The partial-results file: a head line, then one JSON line per finished unit.

    The head holds the audit's fingerprint, the report header known before any unit ran, the contract
    check's problems, the plan (unit keys and their groups) and the shard, so :func:`merge` can rebuild
    the report from files alone.
    """

    def __init__(self, path: Path, head: dict[str, Any], done: dict[str, dict[str, Any]]) -> None:
        self.path = path
        self.head = head
        self.done = done

    @property
    def fingerprint(self) -> str:
        return str(self.head.get("fingerprint"))

    @classmethod
    def read(cls, path: Path) -> "Journal":
        """The head and the finished units of ``path``; a torn last line (a job killed while writing it)
        is cut off the file, so units appended later start on a line of their own."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise UsageError(f"no partial-results file {path}", "pass the file an audit wrote (its path is in the log)") from None
        except OSError as err:
            raise UsageError(f"cannot read {path}: {err.strerror or err}", "pass a readable partial-results file") from None
        whole = raw[: raw.rfind(b"\n") + 1]
        lines = whole.decode("utf-8", errors="replace").splitlines()
        try:
            head = json.loads(lines[0]) if lines else {}
        except ValueError:
            head = {}
        if not isinstance(head, dict) or head.get("format") != JOURNAL_FORMAT:
            raise UsageError(f"{path} is not a conservcheck partial-results file", "pass the file an audit wrote")
        done: dict[str, dict[str, Any]] = {}
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "key" in rec:
                done[rec["key"]] = rec
        if len(whole) < len(raw):
            with open(path, "r+b") as f:
                f.truncate(len(whole))
                os.fsync(f.fileno())
        return cls(path, head, done)

    @classmethod
    def open(cls, path: Path, head: dict[str, Any], reuse: bool) -> "Journal":
        """Reuse the finished units of ``path`` (when ``reuse`` and it exists) or start it with ``head``."""
        if reuse and path.exists():
            journal = cls.read(path)
            if journal.fingerprint != head["fingerprint"]:
                raise UsageError(
                    f"{path} holds partial results of a different audit (model, data or options differ)",
                    "resume with exactly the same model, data and options, or remove the file",
                )
            return journal
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(head, allow_nan=False) + "\n")
        return cls(path, head, {})

    def append(self, record: dict[str, Any]) -> None:
        """Add one finished unit: a whole line, flushed and synced before the audit goes on."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[record["key"]] = record

    def saved(self) -> int:
        """Units whose line is complete in the file (a Ctrl-C may land between the write and ``done``)."""
        count = 0
        for line in self.path.read_text(encoding="utf-8").splitlines()[1:]:
            try:
                count += isinstance(json.loads(line), dict)
            except ValueError:
                pass
        return count


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
            ``trust_remote_code``, ``resume``, ``time_budget``, ``memory_budget``, ``shard``, ``block``,
            ``n_probes``, ``n_vertices``, ``bridge_u``, ``sampler_steps``).
    Returns:
        the :class:`~conservcheck.report.AuditReport` (with ``shard``, a partial report: the other
        shards' units are ``skipped``; :func:`merge` combines the shards' files).
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
    shard, n_shards = shard_of(opts["shard"])
    mine = [s for s in plan if s.group % n_shards == shard]
    sampling_cost = 0.0 if data else float(opts["n_samples"] * opts["sampler_steps"])
    total = sampling_cost + sum(s.cost for s in mine)
    if data is not None:
        x0, source = data
        log.info("x0: %d samples from %s (%s)", len(x0), opts["data"], source["mapping"])
    else:
        if progress is not None:
            progress(0.0, total, "drawing x0 from the model")
        try:
            x0, source = _with_hash(*model_samples(probe, opts["n_samples"], opts["seed"], steps=opts["sampler_steps"],
                                                   batcher=batcher, cache_dir=opts["cache_dir"]), probe)
        except Exception as err:
            # Without x0 no diagnostic can run: the report says why (the model's own failure, not a crash).
            msg = err.message if isinstance(err, ProbeContractError) else (
                f"sampling x0 from the model failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0]} "
                "(pass clean samples with --data)")
            problems.append(msg)
            header.update(data_source={"kind": "model", "error": msg},
                          jacobian_strategy={}, problems=problems, complete=False)
            return _finish(header, [], run_info, t0)
    header["data_source"] = source
    control = control_probe(probe, x0)
    fingerprint = _fingerprint(probe, opts, points, source["sha256"])
    explicit = opts["resume"] is not None
    name = fingerprint[:20] + (f".shard{shard}of{n_shards}" if opts["shard"] else "")
    path = Path(opts["resume"]).expanduser() if explicit else cache_folder(opts["cache_dir"], "runs") / f"{name}.jsonl"
    head = {"format": JOURNAL_FORMAT, "schema_version": SCHEMA_VERSION, "fingerprint": fingerprint,
            "shard": opts["shard"], "plan": [[s.key, s.group] for s in plan], "header": json_safe(header),
            "problems": problems}
    journal = Journal.open(path, head, reuse=explicit)
    reused = sum(s.key in journal.done for s in plan)
    log.info("partial results: %s%s", path, f" ({reused} finished units reused)" if reused else "")
    fields = {"model": probe, "control": control}
    deadline = None if opts["time_budget"] is None else t0 + opts["time_budget"]
    records: list[dict[str, Any]] = []
    done_work = sampling_cost
    try:
        for spec in plan:
            rec = journal.done.get(spec.key)
            if rec is None and spec.group % n_shards != shard:
                records.append(_record(spec, "skipped", SKIPPED_SHARD))
                continue
            if rec is None and deadline is not None and time.perf_counter() > deadline:
                records.append(_record(spec, "skipped", SKIPPED_BUDGET))
                continue
            if rec is None:
                rec = _run_unit(spec, fields[spec.field], x0, opts["seed"], batcher)
                journal.append(rec)
            records.append(rec)
            done_work += spec.cost
            if progress is not None:
                progress(done_work, total, f"{spec.diagnostic}.{spec.variant} {spec.field} {spec.time.key}")
    except KeyboardInterrupt:
        raise AuditInterrupted(path, journal.saved(), opts["shard"]) from None
    complete = all(r["status"] != "skipped" for r in records)
    header.update(jacobian_strategy=_strategies(records), problems=problems, complete=complete)
    run_info.update(units_reused=reused, partial_results=str(path))
    if opts["shard"]:
        log.info("shard %s: %d of %d units are in %s; combine the %d shards' files with: conservcheck merge FILE... "
                 "--json OUT", opts["shard"], sum(r["status"] != "skipped" for r in records), len(plan), path, n_shards)
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


# ----------------------------------------------------------------------------------------------- merge


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    """``model.device: 'cuda:0' vs 'cuda:1'``: the first place two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
    return f"{where or 'header'}: {a!r} vs {b!r}"


def merge(paths: Sequence[str | Path]) -> AuditReport:
    """The report of an audit run as shards (``shard="i/n"``), from their partial-results files.

    Every file must come from the same audit (same fingerprint: model, data, numeric options, x0) and
    together they must hold every unit of its plan; the report is then identical to an unsharded
    run's, except the ``run`` object (here: ``merged_from``, the files, and the units each one gave).
    Files may overlap (a unit found twice is taken from the first file that has it).

    Raises:
        UsageError: no file, a file that is not a partial-results file or comes from another audit, or
            units missing (the message names them, their shards and the command that finishes them).
    """
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    if not paths:
        raise UsageError("nothing to merge", "pass the partial-results files of every shard")
    journals = [Journal.read(Path(p).expanduser()) for p in paths]
    first = journals[0]
    if "plan" not in first.head or "header" not in first.head:
        raise UsageError(f"{first.path} was written by an older conservcheck and cannot be merged",
                         "run the audit again with this version")
    for j in journals[1:]:
        if j.fingerprint != first.fingerprint:
            diff = _first_difference(first.head.get("header"), j.head.get("header"))
            raise UsageError(
                f"{j.path} and {first.path} hold partial results of different audits ({diff})",
                "merge the files of one audit: same model, data, options and seed, run with --shard i/n; "
                "with CUDA_VISIBLE_DEVICES every shard sees the same device name",
            )
    plan = [(str(k), int(g)) for k, g in first.head["plan"]]
    records: list[dict[str, Any]] = []
    missing: list[tuple[str, int]] = []
    used = [0] * len(journals)
    for key, group in plan:
        found = next((i for i, j in enumerate(journals) if key in j.done), None)
        if found is None:
            missing.append((key, group))
            continue
        used[found] += 1
        records.append(journals[found].done[key])
    if missing:
        raise UsageError(*_missing_message(missing, len(plan), journals))
    header = dict(first.head["header"])
    header.update(jacobian_strategy=_strategies(records), problems=list(first.head.get("problems", [])), complete=True)
    run_info: dict[str, Any] = {"merged_from": [{"path": str(j.path), "shard": j.head.get("shard"), "units": n}
                                                for j, n in zip(journals, used)],
                                "started_at": started.isoformat(timespec="seconds")}
    log.info("merged %d units from %d files", len(records), len(journals))
    return _finish(header, records, run_info, t0)


def _missing_message(missing: list[tuple[str, int]], n_units: int, journals: list[Journal]) -> tuple[str, str]:
    """The one-line error and hint of a merge that lacks units: which units, which shards, how to finish."""
    shards = {shard_of(j.head["shard"])[1] for j in journals if j.head.get("shard")}
    examples = ", ".join(k for k, _ in missing[:3]) + (", …" if len(missing) > 3 else "")
    text = f"the files hold {n_units - len(missing)} of the audit's {n_units} units; missing {len(missing)} ({examples})"
    if len(shards) != 1:
        return text, "finish the audit with conservcheck audit … --resume FILE (same options), then merge again"
    n = shards.pop()
    lost = sorted({g % n for _, g in missing})
    files = {shard_of(j.head["shard"])[0]: j.path for j in journals if j.head.get("shard")}
    names = ", ".join(f"{i}/{n}" for i in lost)
    fixes = "; ".join(f"--shard {i}/{n} --resume {files.get(i, f'<shard {i} file>')}" for i in lost)
    return (f"{text} of shard{'s' if len(lost) > 1 else ''} {names}",
            f"rerun {'those shards' if len(lost) > 1 else 'that shard'} with the same options and {fixes}, then merge again")


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

__all__ = ["AuditInterrupted", "DEFAULT_MODEL", "audit", "control_probe", "loop_bytes_per_element",
           "loop_chunk_elements", "merge"]
