"""The tables a reader sees are one implementation: the console renders :func:`diagnostic_tables` at its
width, and the Markdown summary and HTML page the same tables whole; a guided report keeps its guidance
scales apart in every table."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from tiny_conditional import curled_gmm

import conservcheck
from conservcheck.cli import display
from conservcheck.report.views import diagnostic_tables, headline_table, provenance


@pytest.fixture(scope="module")
def guided(tmp_path_factory):
    """A class-conditional field with a known curl, audited at two guidance scales and two times."""
    cache = tmp_path_factory.mktemp("views-cache")
    opts = dict(
        guidance_scale=[0, 7.5], paths="rotation", curl="subjacobian", n_samples=4, n_points=16, times=[0.2, 0.6],
        sampler_steps=8, precision="fp64", cache_dir=str(cache),
    )  # fmt: skip
    return conservcheck.audit(curled_gmm("random"), **opts)


def test_console_tables_are_the_document_tables_at_the_console_width(guided):
    """Each console table is the document table at the console's width, or at the next narrower width where
    it would not fit."""
    for width in (80, 120, 160):
        console = display.tables(guided, width)
        candidates = [diagnostic_tables(guided, w) for w in (width, min(width, 139), min(width, 99))]
        assert [t.title for t in console] == [t.title for t in candidates[0]]
        for i, rich_table in enumerate(console):
            headers = [c.header for c in rich_table.columns]
            (table,) = [c[i] for c in candidates if c[i].columns == headers][:1]
            cells = [[str(c) for c in column._cells] for column in rich_table.columns]
            assert [list(row) for row in zip(*cells)] == table.rows


def test_columns_follow_the_width(guided):
    def columns(width):
        return {t.title.split(" — ")[0]: t.columns for t in diagnostic_tables(guided, width)}

    rotation = "loop · rotation"
    assert "mean" not in columns(120)[rotation] and "mean" in columns(140)[rotation]
    assert any(c.endswith(" median") and c != "per-sample median" for c in columns(100)[rotation])
    assert not any(c.endswith(" median") and c != "per-sample median" for c in columns(99)[rotation])
    assert "median / floor" in columns(None)[rotation] and "median / floor" not in columns(1000)[rotation]
    assert columns(None)[rotation][:3] == ["time", "w", "σ"]


def test_every_guidance_scale_keeps_its_own_row_and_check(guided):
    checks = guided.verdict.checks
    assert {c["guidance"] for c in checks} == {0.0, 7.5}
    headline = headline_table(guided)
    keys = [t["key"] for t in guided.header["time_points"]]
    by_name = dict(zip((row[0] for row in headline.rows), headline.rows))
    for c in checks:
        name = f"{c['diagnostic']}.{c['variant']} {c['metric']} w={c['guidance']:g}"
        assert by_name[name][1 + keys.index(c["time_key"])] == f"{c['median']:.3g}"
    assert len(headline.rows) == len({(c["diagnostic"], c["variant"], c["guidance"]) for c in checks})
    (curl,) = [t for t in diagnostic_tables(guided) if t.title.startswith("curl")]
    w_col, check_col = curl.columns.index("w"), curl.columns.index("check")
    status = {(row[0], row[w_col]): row[check_col] for row in curl.rows}
    expected = {
        (guided.time_label(c["time_key"]), f"{c['guidance']:g}"): c["status"]
        for c in checks
        if c["diagnostic"] == "curl"
    }
    assert status == expected and len(status) == 4
    # The guided field is s∅ + w (s_c − s∅) and only s_c carries the curl 0.3 K x: at w = 0 the field is the
    # exact unconditional score, at w = 7.5 it carries 7.5 × that curl.
    assert {(w, s) for (_, w), s in status.items()} == {("0", "pass"), ("7.5", "violation")}


def test_provenance_settings_read_as_text(guided):
    settings = dict(provenance(guided))["settings"]
    assert "loop_points rotation 16" in settings and "{" not in settings and "[" not in settings


@pytest.mark.parametrize("width", [100, 120, 160])
def test_console_tables_never_cut_numbers_short(guided, width):
    """A table wider than the console drops columns (the next narrower width's) instead of letting rich
    shorten its cells with "…" (from 100 columns on; a narrower terminal may see long cells shortened)."""
    buf = io.StringIO()
    display.show(guided, Console(file=buf, width=width, highlight=False))
    tables = buf.getvalue().split("\nverdict:")[0]
    assert "…" not in tables
