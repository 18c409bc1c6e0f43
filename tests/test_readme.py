"""The README's example gate fires on the model the README calls "measurably not a score" and stays quiet on an
exact score of the same shape, precision and audit settings."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

import conservcheck
from conservcheck import OUProcess, VectorFieldProbe
from conservcheck.analytic.fields import GaussianMixture
from conservcheck.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 16, 16)  # the embedded digits DDPM's
SETTINGS = dict(paths="rotation", curl="none", n_samples=8, seed=0)


def _readme_gate() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    (expr,) = re.findall(r'conservcheck gate report\.json --fail-if "([^"]+)"', text)
    return expr


def _gate(report: conservcheck.AuditReport, path: Path, expr: str) -> int:
    report.to_json(path)
    return CliRunner().invoke(app, ["gate", str(path), "--fail-if", expr]).exit_code


def test_readme_gate_fails_on_the_digits_ddpm_and_passes_on_an_exact_score(tmp_path):
    expr = _readme_gate()
    digits = conservcheck.audit("embedded:digits", device="cpu", cache_dir=str(tmp_path), **SETTINGS)
    # An exact score at the digits' shape and scale: a mixture of 5 Gaussians over [−1, 1]^256, in fp32.
    gen = torch.Generator().manual_seed(0)
    mix = GaussianMixture(torch.rand(5, 256, generator=gen, dtype=torch.float64) * 2 - 1, 0.3, sample_shape=SHAPE)
    np.save(tmp_path / "x0.npy", mix.sample(8, gen).reshape(8, *SHAPE).numpy())
    exact = VectorFieldProbe(mix.score, process=OUProcess(), sample_shape=SHAPE, data_range=(-3.0, 3.0))
    score = conservcheck.audit(exact, data=str(tmp_path / "x0.npy"), cache_dir=str(tmp_path), **SETTINGS)
    assert digits.verdict.status == "violation" and score.verdict.status == "pass"
    assert _gate(digits, tmp_path / "digits.json", expr) == 1
    assert _gate(score, tmp_path / "score.json", expr) == 0
