"""The partial-results file: every finished unit of an audit, safe on disk as soon as it finishes.

A head line (the audit's fingerprint, the report header known before any unit ran, the contract check's
problems, the plan and the shard), then one JSON line per finished unit, each flushed and synced, so
Ctrl-C or a killed job loses at most the unit in progress and ``--resume`` or :func:`conservcheck.merge`
can rebuild the report from files alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from conservcheck.errors import UsageError
from conservcheck.files import write_atomic

JOURNAL_FORMAT = "conservcheck-partial-results"


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
    def read(cls, path: Path) -> Journal:
        """The head and the finished units of ``path``; a torn last line (a job killed while writing it)
        is cut off the file, so units appended later start on a line of their own."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise UsageError(
                f"no partial-results file {path}", "pass the file an audit wrote (its path is in the log)"
            ) from None
        except OSError as err:
            raise UsageError(
                f"cannot read {path}: {err.strerror or err}", "pass a readable partial-results file"
            ) from None
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
    def open(cls, path: Path, head: dict[str, Any], reuse: bool) -> Journal:
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
