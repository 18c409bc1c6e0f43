"""Conditional fields and the guidance axis: the guided combination, condition assignment, the exact
conditional control at the floor, a non-conservative pair above it, and the w axis through the report,
gates, tables, plots, sharding and the CLI.

The control is :mod:`conservcheck.analytic.conditional`: three classes of two-component Gaussian
mixtures in 4-D. Its conditional and unconditional scores are exact, so every guided combination is a
gradient. The non-conservative pair adds 0.3 K x (K antisymmetric) to the conditional scores only: the
guided field's non-conservative part is 0.3 w K x.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_conditional import conditional_gmm, curled_gmm

import conservcheck
from conservcheck import conditioning
from conservcheck.conditioning import ConditionalField, Conditioning, class_conditioning, text_conditioning
from conservcheck.errors import UsageError
from conservcheck.probe import VectorFieldProbe
from conservcheck.report import SCHEMA_VERSION

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
SMALL = dict(n_samples=6, n_points=32, times=[0.1, 0.5], curl="both", sampler_steps=12, precision="fp64")


class Counting(torch.nn.Module):
    """network(x, t, scale) = scale · x (ε-like output), counting calls and rows."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x, t, scale):
        self.calls.append(x.shape[0])
        return scale.reshape(-1, 1) * x


def _eps_probe(net: Counting) -> VectorFieldProbe:
    cond = Conditioning("class", 2, "cycle", {"class_labels": [0, 1]})
    field = ConditionalField(net, {"scale": torch.tensor([2.0, 3.0], dtype=F64)}, {"scale": torch.tensor([0.5])}, cond)
    return VectorFieldProbe(field, sample_shape=(3,), parameterization="epsilon", dtype=F64)


def test_guiding_the_output_is_guiding_the_score():
    net = Counting()
    probe = _eps_probe(net)
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(0.3, dtype=F64)
    with conditioning.select(probe, condition=1, guidance=0.0):
        s_null = probe.score(x, t)
    with conditioning.select(probe, condition=1):
        s_cond = probe.score(x, t)
    assert net.calls == [4, 4]  # w = 0 and w = 1: one pass of the batch each
    for w in (0.5, 3.0, 7.5):
        with conditioning.select(probe, condition=1, guidance=w):
            guided = probe.score(x, t)
        # ε ↦ s is affine with one x term, so s_w = s_∅ + w (s_c − s_∅) (float64 rounding)
        assert torch.allclose(guided, s_null + w * (s_cond - s_null), rtol=1e-13, atol=1e-13)
    assert net.calls[2:] == [8, 8, 8]  # guided: unconditional and conditional rows in one doubled batch
    assert (probe.fn.condition, probe.fn.guidance) == (0, 1.0)  # select restores the selection


def test_select_refuses_what_the_field_cannot_be():
    probe = _eps_probe(Counting())
    with pytest.raises(UsageError, match="out of range"), conditioning.select(probe, condition=2):
        pass
    with pytest.raises(UsageError, match="≥ 0"), conditioning.select(probe, guidance=-1):
        pass
    plain = VectorFieldProbe(lambda x, t: -x, sample_shape=(3,))
    assert plain.conditioning is None and "conditioning" not in plain.describe()
    with pytest.raises(UsageError, match="unconditional"), conditioning.select(plain, guidance=2.0):
        pass


def test_assignment_is_keyed_by_sample_index():
    cycle, _ = class_conditioning([4, 7, 9], 10, 10, "null")
    assert cycle.assign(range(7), seed=0) == [0, 1, 2, 0, 1, 2, 0]
    rand, labels = class_conditioning("random", 10, 10, "null")
    assert rand.assignment == "random" and labels.tolist() == list(range(10))
    drawn = rand.assign(range(64), seed=3)
    # one stream per sample: a sample's condition does not depend on the others asked with it
    assert [rand.assign([i], seed=3)[0] for i in (5, 40, 63)] == [drawn[5], drawn[40], drawn[63]]
    assert len(set(drawn)) > 5 and drawn != rand.assign(range(64), seed=4)
    with pytest.raises(UsageError, match="outside the model's 10 classes"):
        class_conditioning([10], 10, 10, "null")
    with pytest.raises(UsageError, match="needs a class label"):
        class_conditioning(None, 10, 10, "null")
    text = text_conditioning(["a cat", "a cat, sitting"], None).describe()
    assert text["prompts"] == ["a cat", "a cat, sitting"] and text["unconditional"] == "the empty prompt"
    assert text["prompt_sha256"][0] == conditioning.sha256_text("a cat") and len(text["prompt_sha256"][0]) == 64


def _checks(report, diagnostic, variant=None):
    return [
        c
        for c in report.verdict.checks
        if c["diagnostic"] == diagnostic and (variant is None or c["variant"] == variant)
    ]


def test_exact_conditional_control_and_its_guided_field_are_at_the_floor():
    opts = {**SMALL, "n_points": 64}  # 64 periodic nodes resolve the mixtures' loops to rounding at t = 0.1
    report = conservcheck.audit(conditional_gmm("random"), guidance_scale=[0, 1, 7.5], paths="rotation", **opts)
    assert report.status == "pass", report.verdict
    assert report.guidance_scales == [0.0, 1.0, 7.5]
    checks = report.verdict.checks
    assert {c["guidance"] for c in checks} == {0.0, 1.0, 7.5} and len(checks) == 2 * 3 * 3
    # exact scores in float64: every headline median is rounding (measured ≤ 8.9e-16), ≤ 1e-3 × its floor
    assert max(c["median"] for c in checks) < 1e-14 and max(c["ratio"] for c in checks) < 1e-3
    # one control per (diagnostic, variant, time point), shared by every w
    units = [u for u in report.units if u["field"] == "control"]
    assert len(units) == 3 * 2 and all(u["guidance"] is None for u in units)


def test_non_conservative_pair_is_above_the_floor_and_grows_with_w():
    report = conservcheck.audit(curled_gmm([0, 2]), guidance_scale=[0, 1, 7.5], paths="rotation", **SMALL)
    assert report.status == "violation"
    by_w = {}
    for c in _checks(report, "curl", "hutchinson"):
        by_w.setdefault(c["guidance"], []).append(c)
    # w = 0 is the exact unconditional score; the curl 0.3 w K x appears at w = 1 and grows at w = 7.5
    assert all(c["status"] == "pass" for c in by_w[0.0])
    assert all(c["status"] == "violation" and c["ratio"] > 1e6 for c in by_w[1.0] + by_w[7.5])
    for c1, c75 in zip(by_w[1.0], by_w[7.5]):
        assert c75["median"] > 1.5 * c1["median"]
    # identical loops at every w: the circulation is linear in w, ∮s_w = ∮s_0 + w (∮s_1 − ∮s_0)
    rows = report.rows[(report.rows["diagnostic"] == "loop") & (report.rows["field"] == "model")]
    for key, at in rows.groupby("time_key"):
        circ = {w: g.sort_values("sample")["circulation"].to_numpy() for w, g in at.groupby("guidance")}
        scale = float(abs(circ[7.5]).max())
        assert abs(circ[7.5] - (circ[0.0] + 7.5 * (circ[1.0] - circ[0.0]))).max() < 1e-12 * scale, key


def test_report_axis_json_gate_tables_and_plots(tmp_path):
    import jsonschema

    from conservcheck.cli import display
    from conservcheck.report.audit_report import AuditReport
    from conservcheck.report.gate import evaluate, parse
    from conservcheck.report.plots import plot_report

    report = conservcheck.audit(
        curled_gmm([1]), guidance_scale="1,7.5", paths="rotation", curl="subjacobian", n_samples=4, n_points=16,
        times=[0.3], sampler_steps=8, precision="fp64",
    )  # fmt: skip
    path = tmp_path / "r.json"
    report.to_json(path)
    data = json.loads(path.read_text())
    jsonschema.validate(data, conservcheck.report_schema())
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["model"]["conditioning"]["class_labels"] == [1]
    assert data["model"]["conditioning"]["guidance_scales"] == [1.0, 7.5]
    assert data["options"]["guidance_scale"] == [1.0, 7.5]
    assert data["rows"]["columns"][8] == "guidance"
    assert {u["guidance"] for u in data["units"]} == {None, 1.0, 7.5}
    back = AuditReport.from_json(path)
    assert back.summary()["guidance"].dropna().unique().tolist() == [1.0, 7.5]
    # gates address one w, every w, or name the scales a report has
    assert evaluate(parse("curl.subjacobian.curl_rel_fro.median > 0.1 at t=0.3 w=7.5"), back).holds
    assert not evaluate(parse("curl.subjacobian.curl_rel_fro.median > 10 at w=1"), back).holds
    assert evaluate(parse("curl.*.curl_rel_fro.median > 0.01 at all times w=1"), back).holds
    with pytest.raises(UsageError, match="no guidance scale w=3") as err:
        evaluate(parse("curl.subjacobian.curl_rel_fro.median > 0.1 at w=3"), back)
    assert "1, 7.5" in str(err.value)
    tables = display.tables(back, 160)
    header = [c.header for c in tables[0].columns]
    assert header[:3] == ["time", "w", "σ"] and tables[0].row_count == 2
    assert "random" not in display.condition_line(data["model"]["conditioning"])
    names = {p.name for p in plot_report(back, tmp_path / "figs")}
    assert "curl_curl_rel_fro_vs_w.png" in names and "loop_abs_circulation_ratio_vs_w.png" in names


def test_shards_of_a_guided_audit_merge_into_the_unsharded_report(tmp_path):
    opts = dict(
        guidance_scale=[0, 7.5], paths="rotation", curl="subjacobian", n_samples=4, n_points=16, times=[0.2, 0.6],
        sampler_steps=8, precision="fp64", cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    whole = conservcheck.audit(curled_gmm("random"), **opts)
    files = []
    for i in range(2):
        files.append(tmp_path / f"s{i}.jsonl")
        conservcheck.audit(curled_gmm("random"), shard=f"{i}/2", resume=str(files[-1]), **opts)
    merged = conservcheck.merge(files)
    assert merged.to_dict()["units"] == whole.to_dict()["units"]
    assert merged.rows.equals(whole.rows) and merged.verdict.to_dict() == whole.verdict.to_dict()


def test_per_condition_groups_use_global_sample_indices():
    from conservcheck.batching import Batcher
    from conservcheck.diagnostics.curl import curl_subjacobian
    from conservcheck.timepoints import TimePoint

    probe = conditional_gmm([0, 1, 2])
    x0 = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    time = TimePoint.from_t(probe.process, 0.4)
    # samples 1 and 4 (condition 1) run alone with their global indices: the numbers of the whole batch
    with conditioning.select(probe, condition=1):
        whole = curl_subjacobian(probe, x0, time, seed=0, batcher=Batcher(64), block=3)
        part = curl_subjacobian(probe, x0[[1, 4]], time, seed=0, batcher=Batcher(64), block=3, start=[1, 4])
    for k in part.values:
        assert torch.allclose(part.values[k], whole.values[k][[1, 4]], rtol=1e-12, atol=0)
    with pytest.raises(UsageError, match="indices for 2 samples"):
        curl_subjacobian(probe, x0[[1, 4]], time, seed=0, batcher=Batcher(64), block=3, start=[1])


def _cli(*args):
    from typer.testing import CliRunner

    from conservcheck.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_conditional_factory_with_labels_and_guidance(tmp_path):
    out = tmp_path / "r.json"
    result = _cli(
        "audit", "tiny_conditional:conditional_gmm", "--class-label", "0", "--class-label", "2",
        "--guidance-scale", "1", "--guidance-scale", "7.5", "--paths", "rotation", "--curl", "subjacobian",
        "--samples", "4", "--points", "16", "--times", "0.3", "--sampler-steps", "8", "--precision", "fp64",
        "--cache-dir", tmp_path / "cache", "--json", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "conditions: class labels 0, 2, cycled over samples; guidance w = 1, 7.5" in result.output
    assert "verdict: pass" in result.output
    data = json.loads(out.read_text())
    assert data["options"]["class_label"] == [0, 2] and data["model"]["conditioning"]["assignment"] == "cycle"


@pytest.mark.parametrize(
    "args, message",
    [
        (["embedded:funnel", "--guidance-scale", "2"], "needs a conditional model"),
        (["embedded:funnel", "--class-label", "3"], "unconditional: it takes no --class-label"),
        (["tiny_conditional:conditional_gmm", "--prompt", "a cat"], "takes no prompt argument"),
        (["tiny_conditional:conditional_gmm", "--prompt", "a", "--class-label", "1"], "were combined"),
        (["tiny_conditional:conditional_gmm", "--negative-prompt", "x"], "needs a --prompt"),
        (["tiny_conditional:conditional_gmm", "--class-label", "5"], "outside the model's 3 classes"),
        (["tiny_conditional:conditional_gmm", "--class-label", "1,random"], "random on its own"),
        (["tiny_conditional:conditional_gmm", "--class-label", "1", "--guidance-scale", "-1"], "numbers ≥ 0"),
        (["tiny_conditional:conditional_gmm", "--prompt-file", "/nonexistent/p.txt"], "no prompt file"),
    ],
)
def test_cli_condition_mistakes_are_one_line_usage_errors(args, message):
    result = _cli("audit", *args, "--samples", "2", "--points", "8", "--paths", "rotation", "--curl", "none")
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1 and "Traceback" not in result.output


def test_prompt_file_lines_follow_the_prompts(tmp_path):
    from conservcheck.runner.options import resolve_options

    file = tmp_path / "prompts.txt"
    file.write_text("a red cube, on a table\n\n  a dog  \n")
    opts = resolve_options({"prompt": "first", "prompt_file": str(file)})
    assert opts["prompt"] == ("first", "a red cube, on a table", "  a dog")
    assert resolve_options({"guidance_scale": ["7.5,1", 3]})["guidance_scale"] == (1.0, 3.0, 7.5)
    assert resolve_options({"class_label": "random"})["class_label"] == "random"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(UsageError, match="holds no prompt"):
        resolve_options({"prompt_file": str(empty)})


def test_unconditional_reports_keep_their_shape():
    report = conservcheck.audit(
        "embedded:funnel", paths="rotation", curl="none", n_samples=2, n_points=8, times=[0.5], sampler_steps=4
    )
    assert "guidance" not in report.rows.columns
    assert report.summary()["guidance"].isna().all() and report.guidance_scales == []
    assert all(u["guidance"] is None for u in report.units) and "conditioning" not in report.header["model"]
    assert all(math.isnan(float(c.get("guidance") or math.nan)) for c in report.verdict.checks)
