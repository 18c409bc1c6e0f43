"""The adversarial matrix: every command against bad inputs → its documented exit code and one ``error:`` line.

Each case runs the real command in-process (typer's runner over the app) and asserts the exit code of the
contract (2 for a usage or input error), exactly one line starting with ``error:`` on stderr, that line
last, the message of docs/errors.md, and no traceback anywhere. Files the tool reads are forged in every
way a hostile or unlucky user can: missing, a folder, a FIFO (opening one blocks: a watchdog thread opens
the writing end after a few seconds, so a regression fails instead of hanging), /dev/zero, empty,
malformed JSON, JSON of the wrong shape, a report whose rows file was changed, a partial-results file
edited after it was written, another audit's file, an old format.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conservcheck import OUProcess, VectorFieldProbe
from conservcheck.analytic.fields import GaussianMixture
from conservcheck.cli.app import app
from conservcheck.runner.audit import audit

runner = CliRunner()

# ---------------------------------------------------------------------------------------- factories


def _mixture() -> GaussianMixture:
    return GaussianMixture(torch.tensor([[0.5, 0.0, -0.5], [-0.5, 0.3, 0.2]], dtype=torch.float64), 0.3)


def mixture(device="cpu", dtype=torch.float64, **_) -> VectorFieldProbe:
    """The exact score of a two-component Gaussian mixture in D = 3."""
    return VectorFieldProbe(
        _mixture().score, process=OUProcess(), sample_shape=(3,), data_range=(-5.0, 5.0), device=device, dtype=dtype
    )


def other_mixture(device="cpu", dtype=torch.float64, **_) -> VectorFieldProbe:
    """Another mixture of the same shape and units: a different model."""
    gm = GaussianMixture(torch.tensor([[0.4, 0.1, -0.5], [-0.5, 0.3, 0.2]], dtype=torch.float64), 0.3)
    return VectorFieldProbe(
        gm.score, process=OUProcess(), sample_shape=(3,), data_range=(-5.0, 5.0), device=device, dtype=dtype
    )


def exits(device="cpu", dtype=torch.float64, **_):
    """A factory that ends the process instead of returning a model."""
    sys.exit(0)


# ------------------------------------------------------------------------------------------ files


@dataclass
class Files:
    dir: Path
    report: Path
    side_report: Path
    journal: Path
    other_journal: Path

    def __getitem__(self, name: str) -> str:
        return str(self.dir / name)


AUDIT = [
    "--paths",
    "rotation",
    "--curl",
    "subjacobian",
    "--block",
    "2",
    "--times",
    "0.5",
    "--samples",
    "4",
    "--points",
    "8",
    "--precision",
    "fp64",
]


def _watch_fifo(path: Path, stop: threading.Event) -> None:
    """Open the FIFO's writing end whenever a reader waits on it, after a grace period, so a reader that
    should never have opened it gets end-of-file instead of blocking the test suite forever."""
    while not stop.wait(3.0):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            continue
        os.close(fd)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("adversarial")
    np.save(d / "mix.npy", _mixture().sample(4, torch.Generator().manual_seed(0)).numpy())
    kw = dict(
        paths="rotation",
        curl="subjacobian",
        block=2,
        times=[0.5],
        n_samples=4,
        n_points=8,
        precision="fp64",
        data=str(d / "mix.npy"),
        cache_dir=str(d / "cache"),
    )
    rep = audit("test_adversarial:mixture", resume=str(d / "run.jsonl"), **kw)
    rep.to_json(d / "report.json")
    rep.to_json(d / "side.json", inline_rows=False)
    audit(other_mixture(), resume=str(d / "other.jsonl"), **kw)
    report = json.loads((d / "report.json").read_text())
    # Files of every wrong kind.
    os.mkfifo(d / "fifo")
    (d / "folder").mkdir()
    (d / "empty.json").write_text("")
    (d / "broken.json").write_text('{"summary": [')
    (d / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    (d / "list.json").write_text("[]")
    (d / "norows.json").write_text(json.dumps({k: v for k, v in report.items() if k != "rows"}))
    (d / "nounits.json").write_text(json.dumps({k: v for k, v in report.items() if k != "units"}))
    (d / "badverdict.json").write_text(json.dumps({**report, "verdict": {"status": "pass", "reason": 1}}))
    (d / "badsummary.json").write_text(json.dumps({**report, "summary": [1, 2]}))
    (d / "nullpoints.json").write_text(json.dumps({**report, "time_points": None}))
    (d / "badrows.json").write_text(json.dumps({**report, "rows": {"columns": ["a"], "data": [[1, 2]]}}))
    escape = json.loads((d / "side.json").read_text())
    escape["rows"]["file"] = "../side.rows.csv"
    (d / "escape.json").write_text(json.dumps(escape))
    changed = json.loads((d / "side.json").read_text())
    changed["rows"]["file"] = "changed.rows.csv"
    (d / "changed.json").write_text(json.dumps(changed))
    shutil.copy(d / "side.rows.csv", d / "changed.rows.csv")
    with open(d / "changed.rows.csv", "a") as f:
        f.write("model,loop,rotation,t0.5,,0.5,0.6,0,1,1,1,1,1,1,1,1,1,1,1,1\n")
    (d / "oldschema.json").write_text(json.dumps({**report, "schema_version": "0.9"}))
    (d / "notes.txt").write_text("hello\n")
    lines = (d / "run.jsonl").read_text().splitlines()
    forged = json.loads(lines[1])
    values = forged["record"]["values"]
    values["abs_circulation_ratio"] = [0.0 for _ in values["abs_circulation_ratio"]]
    (d / "forged.jsonl").write_text("\n".join([lines[0], json.dumps(forged), *lines[2:]]) + "\n")
    (d / "reordered.jsonl").write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]) + "\n")
    (d / "midjson.jsonl").write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    head = json.loads(lines[0])
    head.pop("version")
    (d / "old.jsonl").write_text(json.dumps(head) + "\n")
    (d / "headonly.jsonl").write_text(lines[0][: len(lines[0]) // 2] + "\n")
    np.save(d / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(d / "wrong_shape.npy", np.zeros((4, 3, 7), dtype=np.float32))
    torch.save({"means": torch.zeros(1, 3), "stds": GaussianMixture}, d / "evil.pt")
    (d / "afile").write_text("x")
    stop = threading.Event()
    watchdog = threading.Thread(target=_watch_fifo, args=(d / "fifo", stop), daemon=True)
    watchdog.start()
    yield Files(d, d / "report.json", d / "side.json", d / "run.jsonl", d / "other.jsonl")
    stop.set()
    watchdog.join(timeout=5)


# ------------------------------------------------------------------------------------------ cases


@dataclass(frozen=True)
class Case:
    """``conservcheck <args>`` (``{name}`` replaced by the path of the file ``name``) → ``code`` and an
    error line matching ``message`` (a regular expression matched at the start, after ``error: ``)."""

    id: str
    args: tuple[str, ...]
    message: str
    code: int = 2


def audit_case(id: str, *extra: str, message: str, model: str = "test_adversarial:mixture", code: int = 2) -> Case:
    return Case(
        id, ("audit", model, *AUDIT, "--data", "{mix.npy}", "--cache-dir", "{cache}", "-q", *extra), message, code
    )


NOT_REPORT = r"{p} is not a conservcheck report \(pass a file written with --json\)"
INVALID = r"{p} is not a valid conservcheck report \({why}\) \(pass a report written with --json, unedited\)"
FILE_CASES = [
    # (id, file, message for a report reader)
    ("missing", "{dir}/nope.json", r"no report file {path} \(pass the path of a JSON report written with --json\)"),
    ("folder", "{folder}", r"{path} is a folder, not a report file \("),
    ("fifo", "{fifo}", r"{path} is not a regular file \(a pipe, socket or device\), not a report file \("),
    ("dev-zero", "/dev/zero", r"/dev/zero is not a regular file \(a pipe, socket or device\), not a report file \("),
    ("empty", "{empty.json}", r"{path} is not a JSON report \(Expecting value"),
    ("malformed", "{broken.json}", r"{path} is not a JSON report \("),
    ("binary", "{binary.json}", r"{path} is not a JSON report \("),
    ("json-list", "{list.json}", NOT_REPORT.format(p="{path}")),
    ("no-rows", "{norows.json}", INVALID.format(p="{path}", why="it has no rows")),
    ("no-units", "{nounits.json}", INVALID.format(p="{path}", why="its units are not a list of unit objects")),
    (
        "bad-verdict",
        "{badverdict.json}",
        INVALID.format(p="{path}", why="its verdict has no reason or its checks are not a list of objects"),
    ),
    ("bad-summary", "{badsummary.json}", INVALID.format(p="{path}", why=r"its summary is not a list of rows with .*")),
    (
        "null-time-points",
        "{nullpoints.json}",
        INVALID.format(p="{path}", why="its time points are not a list of objects with a key, a time t and an index"),
    ),
    ("ragged-rows", "{badrows.json}", INVALID.format(p="{path}", why="a row does not have one value per column")),
    (
        "rows-file-outside",
        "{escape.json}",
        INVALID.format(p="{path}", why="its rows file is not a file name beside the report"),
    ),
    (
        "rows-file-changed",
        "{changed.json}",
        r"the report's rows file .*changed.rows.csv does not have the SHA-256 the report records: it was "
        r"changed, or belongs to another report \(keep the rows file the audit wrote beside its report",
    ),
    ("old-schema", "{oldschema.json}", r"report schema version 0.9 is not readable by this conservcheck"),
]


def _report_cases() -> list[Case]:
    out = []
    for id, path, message in FILE_CASES:
        pattern = message.replace("{path}", ".*")
        out += [
            Case(f"gate-{id}", ("gate", path, "--fail-if", "verdict != pass"), pattern),
            Case(f"plot-{id}", ("plot", path, "--out", "{dir}/figs"), pattern),
            Case(f"compare-a-{id}", ("compare", path, "{report.json}"), pattern),
            Case(f"compare-b-{id}", ("compare", "{report.json}", path), pattern),
            Case(f"report-{id}", ("report", path), pattern),
            Case(
                f"gate-baseline-{id}",
                ("gate", "{report.json}", "--baseline", path, "--fail-if", "verdict != pass"),
                pattern,
            ),
            Case(f"report-baseline-{id}", ("report", "{report.json}", "--baseline", path), pattern),
        ]
    return out


JOURNAL_FILE_CASES = [
    ("missing", "{dir}/nope.jsonl", r"no partial-results file .*nope.jsonl \(pass the file an audit wrote"),
    ("folder", "{folder}", r".*folder is a folder, not a partial-results file \("),
    ("fifo", "{fifo}", r".*fifo is not a regular file \(a pipe, socket or device\), not a partial-results file"),
    ("dev-zero", "/dev/zero", r"/dev/zero is not a regular file \(a pipe, socket or device\), not a partial-results"),
    ("not-a-journal", "{notes.txt}", r".*notes.txt is not a conservcheck partial-results file \("),
    ("report-as-journal", "{report.json}", r".*report.json is not a conservcheck partial-results file \("),
    (
        "forged-value",
        "{forged.jsonl}",
        r".*forged.jsonl line 2 fails its checksum: the file was changed after the audit wrote it "
        r"\(remove the file and run the audit again\)",
    ),
    ("reordered", "{reordered.jsonl}", r".*reordered.jsonl line 2 fails its checksum: the file was changed"),
    ("bad-line", "{midjson.jsonl}", r".*midjson.jsonl line 2 is not JSON: the file was damaged \("),
    ("old-format", "{old.jsonl}", r".*old.jsonl was written by another version of conservcheck \(partial-results"),
    ("torn-head", "{headonly.jsonl}", r".*headonly.jsonl is not a conservcheck partial-results file \("),
]


def _journal_cases() -> list[Case]:
    out = []
    for id, path, message in JOURNAL_FILE_CASES:
        out.append(Case(f"merge-{id}", ("merge", path, "-q"), message))
        if id not in ("missing",):  # a missing --resume file is created: that is how a journal is named
            out.append(audit_case(f"audit-resume-{id}", "--resume", path, message=message))
    return out


AUDIT_CASES = [
    audit_case("device-meta", "--device", "meta", message=r"--device: expected auto, cpu, cuda or cuda:N, got 'meta'"),
    audit_case("device-mps", "--device", "mps", message=r"--device: expected auto, cpu, cuda or cuda:N, got 'mps'"),
    audit_case("device-cuda7x", "--device", "cuda:x", message=r"--device: expected auto, cpu, cuda or cuda:N"),
    audit_case(
        "empty-paths",
        "--paths",
        "",
        message=r"--paths: expected a comma-separated subset of rotation, brownian, projection, rectangle "
        r"\(or all, none\), got '' \(write --paths none to audit no loop\)",
    ),
    audit_case("empty-paths-commas", "--paths", ",", message=r"--paths: expected a comma-separated subset"),
    audit_case("empty-data", "--data", "", message=r"--data: expected a file or folder path, got ''"),
    audit_case("empty-resume", "--resume", "", message=r"--resume: expected a file path, got ''"),
    audit_case("empty-cache-dir", "--cache-dir", " ", message=r"--cache-dir: expected a folder path, got ' '"),
    audit_case("empty-stein", "--stein", "", message=r"--stein: expected a reference"),
    audit_case("empty-revision", "--revision", "", message=r"--revision: expected a branch, tag or commit, got ''"),
    audit_case("empty-times", "--times", "", message=r"--times: expected at least one value"),
    audit_case(
        "huge-samples",
        "--samples",
        "1000000000000",
        message=r"the audit would hold about .* in memory \(1000000000000 samples × 3 components, 4 units\) and "
        r"run about .* model evaluations, more than the .* available \(lower --samples",
    ),
    audit_case("data-fifo", "--data", "{fifo}", message=r".*fifo is not a regular file \(a pipe, socket or device\)"),
    audit_case("data-dev-zero", "--data", "/dev/zero", message=r"/dev/zero is not a regular file"),
    audit_case(
        "data-object-npy",
        "--data",
        "{obj.npy}",
        message=r"cannot read array file .*obj.npy: ValueError: Object arrays cannot be loaded",
    ),
    audit_case(
        "data-wrong-shape",
        "--data",
        "{wrong_shape.npy}",
        message=r".*wrong_shape.npy holds samples of shape \(3, 7\), the model expects \(3,\) \(save the samples "
        r"as \[N, \*sample_shape\], \[N, H, W, C\] or \[N, D\] \(arrays are never resized\)\)",
    ),
    audit_case(
        "stein-pickle",
        "--stein",
        "mixture:{evil.pt}",
        message=r"cannot read reference file '.*evil.pt': UnpicklingError: ",
    ),
    audit_case(
        "stein-object-npy",
        "--stein",
        "data:{obj.npy}",
        message=r"cannot read reference file '.*obj.npy': ValueError: Object arrays cannot be loaded",
    ),
    audit_case("stein-fifo", "--stein", "data:{fifo}", message=r".*fifo is not a regular file"),
    audit_case(
        "json-is-data",
        "--json",
        "{mix.npy}",
        message=r"--json .*mix.npy is also the --data file: writing it would destroy that input "
        r"\(choose another path for --json\)",
    ),
    audit_case(
        "csv-is-data",
        "--csv",
        "{mix.npy}",
        message=r"--csv .*mix.npy is also the --data file: writing it would destroy that input",
    ),
    audit_case(
        "json-is-resume",
        "--resume",
        "{dir}/r.jsonl",
        "--json",
        "{dir}/r.jsonl",
        message=r"--json .*r.jsonl is also the --resume file",
    ),
    audit_case(
        "json-is-csv",
        "--json",
        "{dir}/o.json",
        "--csv",
        "{dir}/o.json",
        message=r"--json and --csv both name .*o.json: one would overwrite the other \(give each output its own path\)",
    ),
    audit_case(
        "json-is-junit",
        "--json",
        "{dir}/o.json",
        "--fail-if",
        "verdict != pass",
        "--junit",
        "{dir}/o.json",
        message=r"--json and --junit both name .*o.json",
    ),
    audit_case(
        "csv-is-rows-file",
        "--json",
        "{dir}/o.json",
        "--csv",
        "{dir}/o.rows.csv",
        message=r"--csv and --json rows file both name .*o.rows.csv",
    ),
    audit_case(
        "json-is-model",
        "--json",
        "{mix.npy}",
        model="{mix.npy}",
        message=r"--json .*mix.npy is also the (MODEL|--data) file",
    ),
    audit_case("json-in-proc", "--json", "/proc/r.json", message=r"cannot write /proc/r.json: "),
    audit_case("json-missing-folder", "--json", "{dir}/no/such/r.json", message=r"cannot write .*: folder .* does not"),
    audit_case("json-is-folder", "--json", "{folder}", message=r"cannot write .*folder: it is a folder"),
    audit_case(
        "cache-dir-is-file",
        "--cache-dir",
        "{afile}",
        message=r"cannot use --cache-dir .*afile: a file is in the way of its folders \(pass a folder you can write "
        r"to\)",
    ),
    audit_case(
        "resume-other-audit",
        "--resume",
        "{other.jsonl}",
        message=r".*other.jsonl holds partial results of a different audit \(model\.\S+: .* vs .*\) \(resume with "
        r"exactly the same model, data and options, or remove the file\)",
    ),
    audit_case(
        "resume-other-batch-size",
        "--resume",
        "{run.jsonl}",
        "--batch-size",
        "3",
        message=r".*run.jsonl holds partial results of a different audit \(batch_size: 256 vs 3\)",
    ),
    audit_case(
        "factory-stdlib",
        model="os:abort",
        message=r"os:abort names a function of Python's standard library, not a model factory",
    ),
    audit_case("factory-sys-exit", model="sys:exit", message=r"sys:exit names a function of Python's standard library"),
    audit_case(
        "factory-calls-exit",
        model="test_adversarial:exits",
        message=r"factory test_adversarial:exits called sys.exit\(0\) instead of returning a model",
    ),
    Case(
        "times-beyond-schedule",
        ("audit", "embedded:digits", "--times", "1e9,20,0.00001", "--cache-dir", "{cache}", "-q"),
        r"--times 1e\+09 is outside the model's 1000-step schedule, whose t runs from 5.001e-05 \(k=0\) to 5.059 "
        r"\(k=999\) \(pick values in that span, or name indices with --time-indices 0:999\)",
    ),
    Case(
        "times-below-schedule",
        ("audit", "embedded:digits", "--times", "0.00001", "--cache-dir", "{cache}", "-q"),
        r"--times 1e-05 is outside the model's 1000-step schedule, whose t runs from 5.001e-05 \(k=0\)",
    ),
    Case(
        "sigmas-below-schedule",
        ("audit", "embedded:digits", "--sigmas", "0.001", "--cache-dir", "{cache}", "-q"),
        r"--sigmas 0.001 is outside the model's 1000-step schedule, whose σ runs from 0.01 \(k=0\) to 1 \(k=999\)",
    ),
]

MERGE_CASES = [
    Case(
        "merge-json-is-input",
        ("merge", "{run.jsonl}", "--json", "{run.jsonl}"),
        r"--json .*run.jsonl is also the FILE 1 file: writing it would destroy that input",
    ),
    Case(
        "merge-two-audits",
        ("merge", "{run.jsonl}", "{other.jsonl}"),
        r".*other.jsonl and .*run.jsonl hold partial results of different audits \(model\.\S+: ",
    ),
    Case("merge-json-in-proc", ("merge", "{run.jsonl}", "--json", "/proc/r.json"), r"cannot write /proc/r.json: "),
]

GATE_CASES = [
    Case(
        "gate-junit-is-report",
        ("gate", "{report.json}", "--fail-if", "verdict != pass", "--junit", "{report.json}"),
        r"--junit .*report.json is also the REPORT file: writing it would destroy that input",
    ),
    Case(
        "gate-time-not-in-report",
        ("gate", "{report.json}", "--fail-if", "loop.rotation.abs_circulation_ratio.median > 1 at t=0.7"),
        r"--fail-if: the report has no time point t=0.7 \(time points: t=0.5\)",
    ),
    Case(
        "gate-pooled-of-loop",
        ("gate", "{report.json}", "--fail-if", "loop.rotation.abs_circulation_ratio.pooled > 1"),
        r"--fail-if: loop.rotation.abs_circulation_ratio has no pooled value",
    ),
    Case("gate-malformed", ("gate", "{report.json}", "--fail-if", "loop >"), r"--fail-if 'loop >': expected"),
]

OTHER_CASES = [
    Case("plot-out-is-file", ("plot", "{report.json}", "--out", "{afile}"), r"--out .*afile is a file, not a folder"),
    Case("plot-format", ("plot", "{report.json}", "--format", "gif"), r"--format: expected png or svg, got 'gif'"),
    Case(
        "selftest-meta", ("selftest", "--device", "meta"), r"--device: expected auto, cpu, cuda or cuda:N, got 'meta'"
    ),
    Case("selftest-mps", ("selftest", "--device", "mps"), r"--device: expected auto, cpu, cuda or cuda:N, got 'mps'"),
    Case(
        "transport-device-meta",
        ("transport", "test_adversarial:mixture", "--reference", "gaussian", "--device", "meta"),
        r"--device: expected auto, cpu, cuda or cuda:N, got 'meta'",
    ),
    Case(
        "transport-huge-samples",
        ("transport", "test_adversarial:mixture", "--reference", "gaussian", "--samples", "1000000000000"),
        r"the transport check would hold about .* GB \(1000000000000 samples × 3 components\), more than the .* "
        r"available \(lower --samples\)",
    ),
    Case(
        "transport-reference-pickle",
        ("transport", "test_adversarial:mixture", "--reference", "mixture:{evil.pt}"),
        r"cannot read reference file '.*evil.pt': UnpicklingError",
    ),
    Case(
        "transport-json-is-reference",
        ("transport", "test_adversarial:mixture", "--reference", "mixture:{evil.pt}", "--json", "{evil.pt}"),
        r"--json .*evil.pt is also the --reference file",
    ),
    Case("unknown-command", ("frobnicate",), r"No such command 'frobnicate'"),
    Case("unknown-flag", ("gate", "{report.json}", "--fail-if", "verdict != pass", "--bogus"), r"No such option"),
]

CASES = _report_cases() + _journal_cases() + AUDIT_CASES + MERGE_CASES + GATE_CASES + OTHER_CASES


def _fill(text: str, files: Files) -> str:
    return re.sub(r"\{([^{}]+)\}", lambda m: files[m.group(1)] if m.group(1) != "dir" else str(files.dir), text)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, files: Files):
    args = [_fill(a, files) for a in case.args]
    start = time.monotonic()
    r = runner.invoke(app, args)
    assert time.monotonic() - start < 60, "a bad input must be refused quickly"
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    assert r.exit_code == case.code, r.stderr
    assert re.match(case.message, errors[0][len("error: ") :]), errors[0]


def test_the_matrix_covers_every_command():
    commands = {c.args[0] for c in CASES}
    assert {"audit", "merge", "plot", "compare", "gate", "transport", "selftest"} <= commands
