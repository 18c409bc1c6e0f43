"""The benchmark scripts stay runnable: each parses its options and documents the shared ones.

Timings are not asserted (they belong to benchmarks/RESULTS.md, not to tests); this only guards the
scripts a GPU session runs unchanged from breaking at import or argument parsing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SHARED = ("--arch", "--device", "--precision", "--batch-size", "--repeats", "--json")


@pytest.mark.parametrize("script", ["bench_paths.py", "bench_curl.py", "bench_accuracy.py", "bench_audit.py"])
def test_benchmark_help_lists_the_shared_options(script):
    out = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, cwd=BENCH, timeout=120
    )
    assert out.returncode == 0, out.stderr
    missing = [flag for flag in SHARED if flag not in out.stdout]
    assert missing == [], f"{script} --help lacks {missing}"


def test_reproducibility_benchmark_parses_its_options():
    out = subprocess.run(
        [sys.executable, str(BENCH / "bench_reproducibility.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=BENCH,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert all(flag in out.stdout for flag in ("--fields", "--precisions", "--device", "--json"))
