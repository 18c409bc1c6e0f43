"""The diagnostic and loop-type registries: what each built-in declares, and a third-party diagnostic added
through a real entry point with nothing else changed."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conservcheck import diagnostics
from conservcheck.diagnostics import curl, loop_integral, stein
from conservcheck.geometry import loops
from conservcheck.runner.options import audit_options


def test_builtins_are_registered_in_order():
    assert list(diagnostics.registered()) == ["loop", "curl", "stein"]
    assert list(loops.registered()) == ["rotation", "brownian", "projection", "rectangle"]
    assert loop_integral.DIAGNOSTIC.options[0].default == ("rotation", "brownian", "projection")


def test_headline_metrics_are_columns_the_diagnostics_compute():
    columns = {
        "loop": set(loop_integral.COLUMNS) | {f"abs_{c}" for c in loop_integral.DIAGNOSTIC.abs_columns},
        "curl": set(curl.SUBJACOBIAN_COLUMNS) | set(curl.HUTCHINSON_COLUMNS),
        "stein": set(stein.COLUMNS),
    }
    for name, spec in diagnostics.registered().items():
        named = [*spec.headline.values(), *(m for pair in spec.table.values() for m in pair if m)]
        named += [f.metric for f in spec.figures] + list(spec.box_metrics)
        assert set(named) <= columns[name], name
    assert diagnostics.headline_rule() == {
        "loop": "abs_circulation_ratio",
        "curl/subjacobian": "curl_rel_fro",
        "curl/hutchinson": "rel_asym",
    }


def test_every_option_has_one_owner_and_a_schema_fragment_when_it_is_reported():
    names = [o.name for o in audit_options()]
    assert len(names) == len(set(names))
    assert all(o.schema for o in audit_options() if o.numeric)
    flags = [o.flag for o in audit_options()]
    assert len(flags) == len(set(flags))


PLUGIN = """
    import torch

    from conservcheck.diagnostics import ANY, Diagnostic, DiagnosticResult, Variant
    from conservcheck.settings import Option, choice
    from conservcheck.timepoints import forward_samples


    def score_size(probe, x0, time, *, seed, batcher, start=0):
        x_t, _ = forward_samples(x0.to(probe.device, torch.float64), time, seed, start)
        s = probe.score(x_t.to(probe.dtype), time.t).double().flatten(1)
        # σ|s|/√D: the score's size in units of the noise level's own, ~1 for data-like inputs.
        size = time.sigma * s.norm(dim=1) / s.shape[1] ** 0.5
        return DiagnosticResult("scoresize", "l2", time, {"scaled_norm": size.cpu()})


    DIAGNOSTIC = Diagnostic(
        name="scoresize",
        summary="σ|s|/√D at the forward samples",
        options=(Option("scoresize", "off", "--scoresize", "Score size diagnostic.",
                        choice("--scoresize", ("off", "on")), "off|on", schema={"enum": ["off", "on"]}),),
        plan=lambda opts, probe: [Variant("l2", score_size, {}, opts["n_samples"], controlled=False)]
        if opts["scoresize"] == "on" else [],
        selected=lambda opts: opts["scoresize"] == "on",
        table={ANY: ("scaled_norm", None)},
    )


    def mixture():
        from conservcheck import OUProcess
        from conservcheck.analytic.fields import GaussianMixture, as_probe

        mix = GaussianMixture(torch.tensor([[0.5, -0.5, 0.0], [-1.0, 0.3, 0.8]]), torch.tensor([0.6, 0.4]),
                              process=OUProcess())
        return as_probe(mix.score, (3,), OUProcess())
"""


def test_a_third_party_diagnostic_needs_one_file_and_one_entry_point(tmp_path):
    (tmp_path / "my_diag.py").write_text(textwrap.dedent(PLUGIN))
    dist = tmp_path / "my_diag-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-diag\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[conservcheck.diagnostics]\nscoresize = my_diag:DIAGNOSTIC\n")
    report = tmp_path / "r.json"
    cmd = [
        str(Path(sys.executable).parent / "conservcheck"),
        "audit",
        "my_diag:mixture",
        "--scoresize",
        "on",
        "--paths",
        "rotation",
        "--curl",
        "none",
        "--times",
        "0.3",
        "--samples",
        "3",
        "--points",
        "16",
        "--cache-dir",
        str(tmp_path / "c"),
        "--json",
        str(report),
        "--quiet",
        "--fail-if",
        "scoresize.l2.scaled_norm.median > 100",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "scoresize · l2 — scaled_norm" in out.stdout
    assert "gate ok: scoresize.l2.scaled_norm.median > 100" in out.stdout
    text = report.read_text()
    assert '"scoresize": "on"' in text and '"diagnostic": "scoresize"' in text
