"""The documentation cannot drift from the code: the generated CLI reference, the report's fields and
columns, the verdict rule's constants, and every relative link.

The CLI reference is compared with what :mod:`conservcheck.cli.docgen` renders from the typer app right now,
so a new flag or command fails here until ``python -m conservcheck.cli.docgen > docs/cli-reference.md`` is
run.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

import conservcheck
from conservcheck.cli import docgen
from conservcheck.diagnostics import curl, headline_rule, stein
from conservcheck.diagnostics import loop_integral as loops
from conservcheck.precision import PRECISIONS
from conservcheck.report import FLOOR_FACTOR

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REFERENCE = DOCS / "cli-reference.md"
PAGES = sorted([ROOT / "README.md", ROOT / "examples" / "ci_gate.md", *DOCS.glob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_cli_reference_is_generated_from_the_app():
    assert REFERENCE.read_text(encoding="utf-8") == docgen.render(), (
        f"docs/cli-reference.md is stale: run `{docgen.REGENERATE}`"
    )


def test_cli_reference_has_every_command_and_audit_option():
    import typer.main

    from conservcheck.cli.app import app
    from conservcheck.runner.options import audit_options

    text = docgen.render()
    group = typer.main.get_command(app)
    for name in group.commands:
        assert f"## `conservcheck {name}`" in text
    audit = text.split("## `conservcheck audit`")[1].split("\n## ")[0]
    for option in audit_options():
        assert f"| `{option.flag}" in audit, option.flag


def test_docgen_check_mode(tmp_path, capsys):
    assert docgen.main(["--check", str(REFERENCE)]) == 0
    stale = tmp_path / "cli-reference.md"
    stale.write_text(REFERENCE.read_text(encoding="utf-8").replace("--seed", "--sead"), encoding="utf-8")
    assert docgen.main(["--check", str(stale)]) == 1
    assert docgen.REGENERATE in capsys.readouterr().err
    assert docgen.main(["--bogus"]) == 2


def _schema_names(node: object) -> set[str]:
    """Every property name anywhere in a JSON schema."""
    names: set[str] = set()
    if isinstance(node, dict):
        names.update(node.get("properties", {}))
        for value in node.values():
            names |= _schema_names(value)
    elif isinstance(node, list):
        for value in node:
            names |= _schema_names(value)
    return names


def test_report_doc_names_every_schema_field():
    schema = conservcheck.report_schema()
    text = (DOCS / "report.md").read_text(encoding="utf-8")
    missing = sorted(
        n
        for n in _schema_names(schema)
        if f"`{n}`" not in text and not re.search(rf"[`{{ ,(]{re.escape(n)}[`}} ,):]", text)
    )
    assert not missing, f"docs/report.md does not document {missing}"


def test_report_doc_names_every_value_column():
    text = (DOCS / "report.md").read_text(encoding="utf-8")
    derived = tuple(f"abs_{c}" for c in ("circulation_per_length", "eq7", "circulation_ratio"))
    columns = (*loops.COLUMNS, *derived, *curl.SUBJACOBIAN_COLUMNS, *curl.HUTCHINSON_COLUMNS, *stein.COLUMNS)
    missing = [c for c in columns if f"`{c}`" not in text]
    assert not missing, f"docs/report.md does not list the columns {missing}"


def test_verdict_rule_constants_in_docs():
    """The factor, the precision floors and the headline metrics the docs state are the code's."""
    report_md = (DOCS / "report.md").read_text(encoding="utf-8")
    concepts = (DOCS / "concepts.md").read_text(encoding="utf-8")
    assert FLOOR_FACTOR == 10.0
    for text in (report_md, concepts):
        assert "10 × floor" in text or "10 × the floor" in text
    floors = ", ".join(f"{p} {v.floor_rel:.0e}".replace("e-0", "e-") for p, v in PRECISIONS.items())
    assert floors == "fp64 1e-12, fp32 1e-6, tf32 1e-3, bf16 1e-2"
    assert floors in report_md
    for metric in headline_rule().values():
        assert f"`{metric}`" in report_md and f"`{metric}`" in concepts


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name} links to missing {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{page.name} links to missing anchor {target}"


ORACLE = '''
import math

import torch

SIGMA_D = 0.6  # data N(0, 0.6² I); σ_d ≠ 1 so a wrong conversion cannot hide


class MyEpsNet(torch.nn.Module):
    """The ideal ε-predictor for N(0, σ_d² I) data under DDPM's linear β schedule, fed the index k."""

    @classmethod
    def load(cls, path):
        return cls()

    def forward(self, x, k):
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        t_table = -0.5 * torch.log(torch.cumprod(1 - betas, 0))
        k = k.to(torch.float64).clamp(0, 999)
        lo = k.floor().long().clamp(max=998)
        t = t_table[lo] + (k - lo) * (t_table[lo + 1] - t_table[lo])
        a2 = torch.exp(-2 * t).view(-1, *[1] * (x.dim() - 1))
        sigma = torch.sqrt(1 - a2)
        return (sigma * x / (a2 * SIGMA_D**2 + sigma**2)).to(x.dtype)
'''


def _recipe() -> str:
    """The module of the three-line recipe in docs/adapters.md."""
    text = (DOCS / "adapters.md").read_text(encoding="utf-8").split("## Your own model in three lines")[1]
    return re.search(r"```python\n(# mymodels\.py.*?)```", text, flags=re.S).group(1)


def test_three_line_recipe_gives_the_exact_score(tmp_path, monkeypatch):
    import torch

    from conservcheck.adapters.resolve import load_reference

    body = _recipe()
    assert len([line for line in body.splitlines() if line.strip() and not line.startswith("#")]) == 3
    (tmp_path / "mymodels_oracle.py").write_text(ORACLE, encoding="utf-8")
    (tmp_path / "mymodels.py").write_text("from mymodels_oracle import MyEpsNet\n" + body, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    probe = load_reference("mymodels:make", dtype=torch.float64)
    assert probe.sample_shape == (3, 32, 32)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)
    for k in (10, 250, 999):
        t = float(-0.5 * torch.log(alpha_bar[k]))
        exact = -x / (alpha_bar[k] * 0.6**2 + 1 - alpha_bar[k])
        err = float((probe.score(x, torch.full((4,), t, dtype=torch.float64)) - exact).norm() / exact.norm())
        # measured 1e-16 (float64 rounding): the recipe's units give exactly the score
        assert err < 1e-12, (k, err)


def test_api_example_runs():
    """The example of docs/api.md runs as written and gives one finite ratio per loop in [0, 1]."""
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(code, "docs/api.md", "exec"), scope)
    ratio = scope["res"].values["circulation_ratio"].abs()
    assert ratio.shape == (8,) and bool(((ratio >= 0) & (ratio <= 1)).all())
