"""The known-answer self-test passes on the CPU in float64 and float32 and covers every diagnostic."""

import pytest

from conservcheck.selftest import selftest

pytestmark = pytest.mark.usefixtures("single_thread")


def test_every_known_answer_check_passes_on_the_cpu():
    checks = selftest("cpu")
    failed = [(c.name, c.dtype, c.value, c.bound) for c in checks if not c.ok]
    assert not failed
    names = " ".join(c.name for c in checks)
    for part in (
        "loop.rotation",
        "loop.projection",
        "loop.brownian",
        "2π bᵀKa",
        "curl.subjacobian (jvp)",
        "curl.hutchinson (double_vjp)",
        "curl.subjacobian (fd)",
        "95% CI",
        "stein",
    ):
        assert part in names, part
    assert {c.dtype for c in checks} == {"float64", "float32"}


def test_cli_rejects_an_unknown_device_in_one_line(capsys):
    from conservcheck.cli.app import main

    with pytest.raises(SystemExit) as stop:
        main(["selftest", "--device", "tpu9"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device: expected auto, cpu, cuda or cuda:N")
