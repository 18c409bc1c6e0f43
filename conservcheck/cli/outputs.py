"""The files a command names: every output checked writable and distinct from every input and from the other
outputs before any work is spent, and saved reports read back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conservcheck.errors import UsageError
from conservcheck.files import check_distinct, check_writable


def check_paths(inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
    """Refuse, before any work is spent, an output that cannot be written or that names an input or
    another output (an overwritten input is lost; two outputs on one file leave only the last)."""
    for flag, path in outputs.items():
        if path not in (None, "", "-") and not flag.endswith("rows file"):
            check_writable(path, flag)
    check_distinct(inputs, outputs)


def local_file(path: str | None) -> str | None:
    """A local file named by an input reference (``file.npz#key`` → ``file.npz``), or None."""
    if not path or "://" in path:
        return None
    base, sep, key = path.rpartition("#")
    return base if sep and key and "/" not in key else path


def rows_file(json_path: str | None) -> str | None:
    """The rows side file a large report writes beside its JSON (``r.json`` → ``r.rows.csv``)."""
    return str(Path(json_path).with_suffix(".rows.csv")) if json_path not in (None, "-") else None


def check_report_outputs(
    json_path: str | None,
    csv_path: str | None,
    junit: str | None,
    exprs: list[Any],
    inputs: dict[str, Any],
    html_path: str | None = None,
) -> None:
    """The outputs of a command that produces a report (audit, merge): one of them at most on stdout, JUnit
    only with conditions to report, then :func:`check_paths`."""
    if json_path == "-" and csv_path == "-":
        raise UsageError("--json - and --csv - would both write to stdout", "write one of them to a file")
    if junit and not exprs:
        raise UsageError("--junit needs at least one --fail-if condition", "add --fail-if 'verdict != pass'")
    outputs = {
        "--json": json_path,
        "--csv": csv_path,
        "--junit": junit,
        "--json rows file": rows_file(json_path),
        "--html": html_path,
    }
    check_paths(inputs, outputs)


def read_report(path: str) -> Any:
    """The report saved at ``path`` with ``--json``."""
    from conservcheck.report.audit_report import AuditReport

    return AuditReport.from_json(path)
