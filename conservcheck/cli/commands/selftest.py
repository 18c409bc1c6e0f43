"""``conservcheck selftest``: every diagnostic on fields with exact answers, on the device to be trusted."""

from __future__ import annotations

import typer
from rich import box
from rich.table import Table

from conservcheck.cli import display
from conservcheck.errors import EXIT_GATE, EXIT_OK


def selftest_cmd(
    device: str = typer.Option("cpu", "--device", help="Device to check: cpu, cuda or cuda:N."),
) -> None:
    """Run every diagnostic on fields with exact answers on DEVICE (float64 and float32); exit 1 on a miss."""
    from conservcheck.runner.options import resolve_device, resolve_options
    from conservcheck.selftest import selftest

    dev = resolve_device(resolve_options({"device": device})["device"])
    checks = selftest(dev)
    console = display.out_console(False)
    title = f"known-answer self-test on {dev}"
    table = Table(title=title, title_justify="left", min_width=len(title), box=box.SIMPLE_HEAD)
    for name in ("check", "dtype", "value", "bound", "result"):
        table.add_column(name, justify="left" if name in ("check", "result") else "right")
    for c in checks:
        bound = f"≥ {c.bound:.3g}" if c.larger_is_better else f"≤ {c.bound:.3g}"
        table.add_row(c.name, c.dtype, f"{c.value:.3g}", bound, "ok" if c.ok else "FAIL")
    console.print(table)
    failed = sum(not c.ok for c in checks)
    display.line(console, f"selftest: {len(checks) - failed} of {len(checks)} checks passed")
    raise typer.Exit(EXIT_GATE if failed else EXIT_OK)
