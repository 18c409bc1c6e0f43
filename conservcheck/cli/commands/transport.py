"""``conservcheck transport``: the probability flow integrated with the model and with a reference score
from the same noise, and the two endpoints compared."""

from __future__ import annotations

import os
import sys

import typer
from rich import box
from rich.table import Table

from conservcheck.cli import display
from conservcheck.cli.outputs import check_paths, local_file
from conservcheck.report.views import fmt


def transport_cmd(
    model: str = typer.Argument("embedded:digits", metavar="MODEL", help="Model reference."),
    reference: str = typer.Option(..., "--reference", help="Reference score (see docs: Stein references)."),
    samples: int = typer.Option(256, "--samples", min=1, help="Samples integrated with each field."),
    seed: int = typer.Option(0, "--seed", min=0),
    t_start: float | None = typer.Option(None, "--t-start", help="Canonical start time (noisy end)."),
    t_end: float | None = typer.Option(None, "--t-end", help="Canonical end time (clean end)."),
    steps: int = typer.Option(100, "--steps", min=2, help="Integration steps."),
    device: str = typer.Option("auto", "--device"),
    precision: str = typer.Option("fp32", "--precision"),
    revision: str | None = typer.Option(None, "--revision"),
    cache_dir: str | None = typer.Option(None, "--cache-dir"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    json_path: str | None = typer.Option(None, "--json", metavar="PATH|-", help="Write the result as JSON."),
) -> None:
    """Integrate the probability flow with the model and with the reference from the same noise; compare."""
    import json

    from conservcheck.analytic.reference_scores import resolve_reference
    from conservcheck.diagnostics.transport import transport_check
    from conservcheck.files import write_atomic
    from conservcheck.runner.audit import load_model
    from conservcheck.runner.options import resolve_options
    from conservcheck.runner.size_guard import check_memory

    check_paths(
        {"MODEL": model if os.path.exists(model) else None, "--reference": local_file(reference.partition(":")[2])},
        {"--json": json_path},
    )
    opts = resolve_options(
        {
            "device": device,
            "precision": precision,
            "revision": revision,
            "cache_dir": cache_dir,
            "trust_remote_code": trust_remote_code,
        }
    )
    probe = load_model(model, opts, {"device", "precision", "revision", "trust_remote_code"})
    # Trajectories of both fields and their float64 copies: a few arrays of samples × D at once.
    check_memory(
        32 * samples * probe.dim,
        f"transport check would hold about {32 * samples * probe.dim / 2**30:.3g} GB ({samples} samples × "
        f"{probe.dim} components)",
        "lower --samples",
    )
    ref = resolve_reference(reference, probe)
    result = transport_check(probe, ref, n_samples=samples, seed=seed, t_start=t_start, t_end=t_end, n_steps=steps)
    data = {"model": probe.describe(), **result.to_dict()}
    text = json.dumps(data, indent=1, default=str, allow_nan=False) + "\n" if json_path else ""
    if json_path == "-":
        sys.stdout.write(text)
    elif json_path:
        write_atomic(json_path, text)
    console = display.out_console(json_path == "-")
    title = f"transport check — {model} vs {reference}"
    table = Table(title=title, title_justify="left", min_width=len(title), box=box.SIMPLE_HEAD)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for k, v in data.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            table.add_row(str(k), fmt(v))
    console.print(table)
