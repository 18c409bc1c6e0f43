"""Merging the partial-results files of a sharded audit into the report an unsharded run gives."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from conservcheck.errors import UsageError
from conservcheck.report import AuditReport
from conservcheck.runner.journal import Journal, first_difference
from conservcheck.runner.options import shard_of
from conservcheck.runner.units import build_report, jacobian_strategies

log = logging.getLogger("conservcheck")


def merge(paths: Sequence[str | Path]) -> AuditReport:
    """The report of an audit run as shards (``shard="i/n"``), from their partial-results files.

    Every file must come from the same audit (same fingerprint: model, data, numeric options, x0, batch
    size), is checked line by line (:class:`~conservcheck.runner.journal.Journal`) and left as it is, and
    together they must hold every unit of its plan; the report is then an unsharded run's, except the
    ``run`` object (here: ``merged_from``, the files, and the units each one gave): bit-identical when
    every shard ran with the thread count of that run (units are computed whole), within the
    reproducibility tolerance otherwise (:mod:`conservcheck.report.reproducibility`).
    Files may overlap (a unit found twice is taken from the first file that has it).

    Raises:
        UsageError: no file, a file that is not a partial-results file or comes from another audit, or
            units missing (the message names them, their shards and the command that finishes them).
    """
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    if not paths:
        raise UsageError("nothing to merge", "pass the partial-results files of every shard")
    # Read only: a torn last line is ignored here, never cut off (the files may belong to running shards).
    journals = [Journal.read(Path(p).expanduser()) for p in paths]
    first = journals[0]
    for j in journals[1:]:
        if j.fingerprint != first.fingerprint:
            diff = first_difference(first.head.get("identity"), j.head.get("identity"))
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
    header.update(
        jacobian_strategy=jacobian_strategies(records),
        problems=list(first.head.get("problems", [])),
        warnings=list(first.head.get("warnings", [])),
        complete=True,
    )
    run_info: dict[str, Any] = {
        "merged_from": [
            {"path": str(j.path), "shard": j.head.get("shard"), "units": n} for j, n in zip(journals, used)
        ],
        "started_at": started.isoformat(timespec="seconds"),
    }
    log.info("merged %d units from %d files", len(records), len(journals))
    return build_report(header, records, run_info, t0)


def _missing_message(missing: list[tuple[str, int]], n_units: int, journals: list[Journal]) -> tuple[str, str]:
    """The one-line error and hint of a merge that lacks units: which units, which shards, how to finish."""
    shards = {shard_of(j.head["shard"])[1] for j in journals if j.head.get("shard")}
    examples = ", ".join(k for k, _ in missing[:3]) + (", …" if len(missing) > 3 else "")
    text = (
        f"the files hold {n_units - len(missing)} of the audit's {n_units} units; missing {len(missing)} ({examples})"
    )
    if len(shards) != 1:
        return text, "finish the audit with conservcheck audit … --resume FILE (same options), then merge again"
    n = shards.pop()
    lost = sorted({g % n for _, g in missing})
    files = {shard_of(j.head["shard"])[0]: j.path for j in journals if j.head.get("shard")}
    names = ", ".join(f"{i}/{n}" for i in lost)
    fixes = "; ".join(f"--shard {i}/{n} --resume {files.get(i, f'<shard {i} file>')}" for i in lost)
    return (
        f"{text} of shard{'s' if len(lost) > 1 else ''} {names}",
        f"rerun {'those shards' if len(lost) > 1 else 'that shard'} with the same options and "
        f"{fixes}, then merge again",
    )
