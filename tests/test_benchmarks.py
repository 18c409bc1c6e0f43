"""The benchmark scripts stay runnable: each parses its options and documents the shared ones.

Timings are not asserted (they belong to benchmarks/RESULTS.md, not to tests); this only guards the
scripts a GPU session runs unchanged from breaking at import or argument parsing. Each script runs as
``python <script> --help`` would, in this process (its imports are the library's, already loaded).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SHARED = ("--arch", "--device", "--precision", "--batch-size", "--repeats", "--json")


def _help(script: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.chdir(BENCH)
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    assert done.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("script", ["bench_paths.py", "bench_curl.py", "bench_accuracy.py", "bench_audit.py"])
def test_benchmark_help_lists_the_shared_options(script, monkeypatch, capsys):
    out = _help(script, monkeypatch, capsys)
    missing = [flag for flag in SHARED if flag not in out]
    assert missing == [], f"{script} --help lacks {missing}"


def test_reproducibility_benchmark_parses_its_options(monkeypatch, capsys):
    out = _help("bench_reproducibility.py", monkeypatch, capsys)
    assert all(flag in out for flag in ("--fields", "--precisions", "--device", "--json"))
