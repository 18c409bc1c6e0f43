"""The partial-results file: every finished unit of an audit, safe on disk as soon as it finishes.

A head line (the audit's fingerprint and the inputs it was computed from, the report header known before
any unit ran, the contract check's problems and warnings, the plan and the shard), then one JSON line per
finished unit, each flushed and synced, so Ctrl-C or a killed job loses at most the unit in progress and
``--resume`` or :func:`conservcheck.merge` can rebuild the report from files alone.

The file is the tool's own, and it is checked as such when read back: a regular file of bounded size
(:func:`conservcheck.files.input_file`), a head of this format, and unit lines each carrying a SHA-256
*checksum* chained from the head's (line k's checksum covers its record and line k − 1's checksum), so a
line changed, removed, reordered or inserted after the audit wrote it is found, and every record is
checked against the plan (its key, time point, status, and per-sample columns of the audit's sample
count). A file that fails is refused with one line naming the line and what is wrong; only a torn *last*
line (a job killed while writing it) is expected, and it is dropped. The checksums detect changes; they
are not a signature against someone who recomputes them.

One audit at a time writes a file: it holds an exclusive lock (:func:`conservcheck.files.try_lock`) for as
long as it runs, and a second audit resuming the same file is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from conservcheck.errors import UsageError
from conservcheck.files import input_file, try_lock
from conservcheck.runner.units import guidance_suffix

JOURNAL_FORMAT = "conservcheck-partial-results"
#: Version 2: checksummed lines and the fingerprint's inputs in the head.
JOURNAL_VERSION = 2
UNIT_STATUSES = ("ok", "nonfinite", "error")
_HINT = "pass the file an audit wrote (its path is in the log)"
_DAMAGED = "remove the file and run the audit again"


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def checksum(previous: str, value: Any) -> str:
    """SHA-256 of ``previous`` (the preceding line's checksum) and ``value`` in canonical JSON."""
    return hashlib.sha256(previous.encode() + b"\n" + _canonical(value)).hexdigest()


def first_difference(a: Any, b: Any, where: str = "") -> str:
    """``model.device: 'cuda:0' vs 'cuda:1'``: the first place two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return first_difference(x, y, f"{where}[{i}]")
    return f"{where or 'value'}: {_short(a)} vs {_short(b)}"


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "…"


def _number_list(values: Any, n: int | None, finite: bool) -> str | None:
    """Why ``values`` is not a list of ``n`` numbers (None or finite numbers when ``finite``), or None."""
    if not isinstance(values, list):
        return "a column is not a list"
    if n is not None and len(values) != n:
        return f"a column has {len(values)} values, the audit draws {n} samples"
    for v in values:
        if v is None and not finite:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (finite and not math.isfinite(v)):
            return f"a column holds {v!r}, not a number"
    return None


def check_record(rec: Any, head: dict[str, Any]) -> str | None:
    """Why a unit record is not one this audit could have written (its plan, time points, sample count), or None."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    need = ("key", "field", "diagnostic", "variant", "time", "status", "message", "values", "meta")
    missing = [k for k in need if k not in rec]
    if missing:
        return f"no {missing[0]!r}"
    plan = {str(k) for k, _ in head["plan"]}
    if rec["key"] not in plan:
        return f"unit {rec['key']!r} is not in the audit's plan"
    time = rec["time"]
    if not isinstance(time, dict) or not isinstance(time.get("key"), str):
        return "its time point is not an object with a key"
    guidance = rec.get("guidance")
    if guidance is not None and not isinstance(guidance, (int, float)):
        return "its guidance scale is not a number"
    if rec["key"] != f"{rec['field']}/{rec['diagnostic']}/{rec['variant']}/{time['key']}" + guidance_suffix(guidance):
        return "its key does not match its field, diagnostic, variant, time point and guidance scale"
    points = {p.get("key"): p for p in head["header"].get("time_points", []) if isinstance(p, dict)}
    point = points.get(time["key"])
    if point is None or any(point.get(k) != v for k, v in time.items()) or len(time) != 5:
        return f"its time point {time['key']!r} is not the audit's"
    if rec["status"] not in UNIT_STATUSES:
        return f"status {rec['status']!r} is not one of {', '.join(UNIT_STATUSES)}"
    if not isinstance(rec["values"], dict) or not isinstance(rec["meta"], dict):
        return "its values or meta are not objects"
    if rec["status"] == "ok" and not rec["values"]:
        return "a finished unit without values"
    n = head["header"].get("options", {}).get("n_samples")
    for values in rec["values"].values():
        why = _number_list(values, n if isinstance(n, int) else None, finite=rec["status"] == "ok")
        if why:
            return why
    return None


class Journal:
    """The partial-results file: a head line, then one checksummed JSON line per finished unit.

    The head holds the audit's fingerprint and its inputs (``identity``), the report header known before
    any unit ran, the contract check's problems and warnings, the plan (unit keys and their groups) and
    the shard, so :func:`merge` can rebuild the report from files alone.
    """

    def __init__(self, path: Path, head: dict[str, Any], done: dict[str, dict[str, Any]], last: str) -> None:
        self.path = path
        self.head = head
        self.done = done
        self._last = last
        self._fd: int | None = None

    @property
    def fingerprint(self) -> str:
        return str(self.head.get("fingerprint"))

    @classmethod
    def read(cls, path: Path, repair: bool = False) -> Journal:
        """The head and the finished units of ``path``, every line checked (module doc).

        A torn last line (no newline: a job killed while writing it) is ignored; with ``repair`` (the
        caller holds the file's lock and will append to it) it is also cut off the file, so units appended
        later start on a line of their own.
        """
        raw = _read_bytes(path)
        whole = raw[: raw.rfind(b"\n") + 1]
        lines = whole.split(b"\n")[:-1]
        head = _head(path, lines[0] if lines else b"")
        last = head["checksum"]
        done: dict[str, dict[str, Any]] = {}
        for number, line in enumerate(lines[1:], start=2):
            try:
                entry = json.loads(line)
            except ValueError:
                raise UsageError(f"{path} line {number} is not JSON: the file was damaged", _DAMAGED) from None
            if not isinstance(entry, dict) or "record" not in entry or "checksum" not in entry:
                raise UsageError(f"{path} line {number} is not a unit line of a partial-results file", _DAMAGED)
            rec = entry["record"]
            if entry["checksum"] != checksum(last, rec):
                raise UsageError(
                    f"{path} line {number} fails its checksum: the file was changed after the audit wrote it",
                    _DAMAGED,
                )
            why = check_record(rec, head)
            if why:
                raise UsageError(f"{path} line {number} is not a unit of this audit ({why})", _DAMAGED)
            last = entry["checksum"]
            done[rec["key"]] = rec
        if repair and len(whole) < len(raw):
            with open(path, "r+b") as f:
                f.truncate(len(whole))
                os.fsync(f.fileno())
        return cls(path, head, done, last)

    @classmethod
    def open(cls, path: Path, head: dict[str, Any], reuse: bool) -> Journal:
        """Start ``path`` with ``head``, or (``reuse`` and it exists) continue it, holding its lock either way.

        A new file is created exclusively (two audits never start one file); an existing one must carry
        the same fingerprint, and a mismatch names the first input that differs.
        """
        head = {**head, "format": JOURNAL_FORMAT, "version": JOURNAL_VERSION}
        head["checksum"] = checksum("", {k: v for k, v in head.items() if k != "checksum"})
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_APPEND, 0o666)
        except FileExistsError:
            if not reuse:
                raise
            return cls._continue(path, head)
        journal = cls(path, head, {}, head["checksum"])
        journal._hold(fd)
        journal._write(json.dumps(head, allow_nan=False) + "\n")
        return journal

    @classmethod
    def _continue(cls, path: Path, head: dict[str, Any]) -> Journal:
        input_file(path, "partial-results file", _HINT)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        holder = cls(path, head, {}, "")
        holder._hold(fd)
        try:
            journal = cls.read(path, repair=True)
            if journal.fingerprint != head["fingerprint"]:
                diff = first_difference(journal.head.get("identity"), head.get("identity"))
                raise UsageError(
                    f"{path} holds partial results of a different audit ({diff})",
                    "resume with exactly the same model, data and options, or remove the file",
                )
        except BaseException:
            holder.close()
            raise
        journal._fd, holder._fd = holder._fd, None
        return journal

    def _hold(self, fd: int) -> None:
        if not try_lock(fd):
            os.close(fd)
            raise UsageError(
                f"{self.path} is in use by another conservcheck audit",
                "wait for that audit to finish, or resume from a copy of the file",
            )
        self._fd = fd

    def _write(self, text: str) -> None:
        assert self._fd is not None, "the journal is closed"
        data = text.encode("utf-8")
        while data:
            data = data[os.write(self._fd, data) :]
        os.fsync(self._fd)

    def append(self, record: dict[str, Any]) -> None:
        """Add one finished unit: a whole checksummed line, synced before the audit goes on."""
        digest = checksum(self._last, record)
        self._write(json.dumps({"record": record, "checksum": digest}, allow_nan=False) + "\n")
        self._last = digest
        self.done[record["key"]] = record

    def close(self) -> None:
        """Release the file (and its lock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def saved(self) -> int:
        """Units whose line is complete in the file (a Ctrl-C may land between the write and ``done``)."""
        try:
            return len(Journal.read(self.path).done)
        except UsageError:
            return len(self.done)


def _read_bytes(path: Path) -> bytes:
    p = input_file(path, "partial-results file", _HINT)
    try:
        return p.read_bytes()
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror or err}", "pass a readable partial-results file") from None


def _head(path: Path, line: bytes) -> dict[str, Any]:
    try:
        head = json.loads(line) if line else {}
    except ValueError:
        head = {}
    if not isinstance(head, dict) or head.get("format") != JOURNAL_FORMAT:
        raise UsageError(f"{path} is not a conservcheck partial-results file", "pass the file an audit wrote")
    if head.get("version") != JOURNAL_VERSION:
        raise UsageError(
            f"{path} was written by another version of conservcheck (partial-results format "
            f"{head.get('version', 1)}, this one reads {JOURNAL_VERSION})",
            "run the audit again with this version",
        )
    if head.get("checksum") != checksum("", {k: v for k, v in head.items() if k != "checksum"}):
        raise UsageError(f"{path} line 1 fails its checksum: the file was changed after the audit wrote it", _DAMAGED)
    plan, header = head.get("plan"), head.get("header")
    if not (isinstance(plan, list) and isinstance(header, dict) and isinstance(head.get("fingerprint"), str)):
        raise UsageError(f"{path} has a head without its plan or header", _DAMAGED)
    if not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], int) for p in plan):
        raise UsageError(f"{path} has a plan that is not a list of [unit, group] pairs", _DAMAGED)
    return head
