"""docs/checkpoints.md cannot claim what no test proves: every row of its tables is ticked and names a test
that pytest collects, and the hub table lists every repository and layout the matrix must cover."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "checkpoints.md"

#: The published repositories and layouts the hub table must have a row for (first column).
REQUIRED = [
    *(
        f"google/ddpm-{ema}{name}"
        for name in ("cifar10-32", "cat-256", "church-256", "bedroom-256", "celebahq-256")
        for ema in ("", "ema-")
    ),
    "google/ncsnpp-celebahq-256",
    "google/ncsnpp-church-256",
    "google/ncsnpp-ffhq-256",
    "google/ncsnpp-ffhq-1024",
    "CompVis/ldm-celebahq-256",
    "fine-tune saved with `save_pretrained`",
    "variant files",
    "sharded weights with an index JSON",
    "`.bin` only",
    "both `.bin` and `.safetensors`",
    "old config keys",
]


def rows(section: str | None = None) -> list[list[str]]:
    """Table rows (cells stripped) of the whole page, or of the ``## section`` named."""
    text = DOC.read_text(encoding="utf-8")
    if section is not None:
        text = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    out = []
    for line in text.splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|(\s*-+\s*\|)+", line):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[-2:] != ["✓", "test"]:  # header
                out.append(cells)
    return out


TEST_ID = r"`tests/test_\w+\.py::\w+(\[[^\]]+\])?`"


def named_ids(cell: str) -> list[str]:
    """The test node ids a row's last cell names (one, or several separated by commas)."""
    return [part.strip().strip("`") for part in cell.split("`, `")]


def test_every_row_is_ticked_and_names_a_test():
    found = rows()
    assert found
    for cells in found:
        assert cells[-2] == "✓", cells
        assert re.fullmatch(rf"{TEST_ID}(, {TEST_ID})*", cells[-1]), cells


def test_every_required_row_is_present():
    first = [cells[0] for cells in rows("Hugging Face hub repositories")]
    for name in REQUIRED:
        assert any(c == name or c.startswith(name) for c in first), name


def test_every_named_test_is_collected():
    ids = {i for cells in rows() for i in named_ids(cells[-1])}
    files = sorted({i.split("::")[0] for i in ids})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "", "-p", "no:cacheprovider", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    collected = set(proc.stdout.split())
    for test_id in ids:
        # a row may name a parametrized test without its parameters: then some parametrization must exist
        assert test_id in collected or any(c.startswith(test_id + "[") for c in collected), test_id
