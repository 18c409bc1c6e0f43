"""Shared pieces of the benchmarks: model builders, device set-up, timing, environment and JSON output.

Every benchmark reports its speed as a ratio to the model's own batched forward throughput measured in
the same process, on the same device, in the same precision — the physical limit of an audit. Timings
are the best of ``--repeats`` runs after a warm-up run, with model and diagnostic runs interleaved, so a
slow spell of a shared machine hits neither side alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from conservcheck import DiscreteSchedule, OUProcess, ProbeInfo, VectorFieldProbe
from conservcheck.precision import forward_context
from conservcheck.timepoints import TimePoint

ARCHITECTURES: dict[str, dict[str, Any]] = {
    # google/ddpm-cifar10-32's UNet2DModel configuration (35.7M parameters).
    "ddpm-cifar10": dict(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        freq_shift=1,
        flip_sin_to_cos=False,
    ),
    # A 256×256 DDPM architecture shaped like google/ddpm-celebahq-256 (113.7M parameters).
    "ddpm-256": dict(
        sample_size=256,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    ),
    # The smallest configuration, for CPU runs: a 1×16×16 UNet of the embedded digits model's size.
    "tiny-16": dict(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ),
}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parser(description: str | None) -> argparse.ArgumentParser:
    """The options every benchmark takes."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--arch", default="tiny-16", choices=sorted(ARCHITECTURES), help="network architecture (random weights)"
    )
    p.add_argument("--device", default=default_device(), help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument(
        "--precision", default="fp32", choices=["fp64", "fp32", "tf32", "bf16"], help="forward-pass precision"
    )
    p.add_argument("--batch-size", default=None, help="model batch size, or auto (default: auto on CUDA, 64 on CPU)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up run; the best is kept")
    p.add_argument("--compile", action="store_true", help="wrap the network in torch.compile (forward passes only)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="OUT", help="append one JSON line per measured row to OUT")
    return p


def setup(args: argparse.Namespace) -> None:
    """Apply the process-wide options (CPU threads)."""
    if args.threads:
        torch.set_num_threads(args.threads)


def network(args: argparse.Namespace, script: str) -> tuple[VectorFieldProbe, int, dict[str, Any], str]:
    """The shared start of a network benchmark: process options, the ``--arch`` probe, its batch size and
    environment; prints the script's banner and returns (probe, batch, environment, the arch line's start)."""
    setup(args)
    probe = build_probe(args.arch, args.device, args.precision, args.compile)
    batch = batch_size(args.batch_size, probe)
    env = environment(probe.device)
    print(f"# {script} | {describe(env)}")
    head = (
        f"# arch {args.arch} ({n_parameters(probe) / 1e6:.1f}M parameters) | precision {args.precision} | batch {batch}"
    )
    return probe, batch, env, head


def build_probe(arch: str, device: str, precision: str, compile: bool = False) -> VectorFieldProbe:
    """A randomly initialised diffusers UNet2DModel of the named architecture as a DDPM epsilon probe.

    The classic attention processor is installed: forward-mode AD (the curl's jvp strategy) has no rule
    for the fused attention kernels. Weights are float64 for ``fp64``, float32 otherwise.
    """
    from diffusers import UNet2DModel
    from diffusers.models.attention_processor import Attention, AttnProcessor

    torch.manual_seed(0)
    cfg = ARCHITECTURES[arch]
    dtype = torch.float64 if precision == "fp64" else torch.float32
    net = UNet2DModel(**cfg).to(device=device, dtype=dtype).eval().requires_grad_(False)
    for m in net.modules():
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor())
    model = torch.compile(net) if compile else net
    shape = (cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
    return VectorFieldProbe(
        lambda x, k: model(x, k).sample,
        process=OUProcess(),
        time_convention=DiscreteSchedule.linear(),
        parameterization="epsilon",
        sample_shape=shape,
        device=device,
        dtype=dtype,
        precision=precision,
        info=ProbeInfo(name=f"random-{arch}", adapter="benchmark", extra={"compiled": compile}),
    )


def n_parameters(probe: VectorFieldProbe) -> int | None:
    """Parameters of the network behind a benchmark probe (None for a probe built elsewhere)."""
    cell = getattr(probe.fn, "__closure__", None) or ()
    for c in cell:
        obj = getattr(c.cell_contents, "_orig_mod", c.cell_contents)
        if isinstance(obj, torch.nn.Module):
            return sum(p.numel() for p in obj.parameters())
    return None


def batch_size(arg: str | None, probe: VectorFieldProbe) -> int:
    """The model batch: an integer, or ``auto`` (the engine's search on CUDA), default auto on CUDA, 64 on CPU."""
    from conservcheck.batching import find_batch_size

    if arg is None:
        arg = "auto" if probe.device.type == "cuda" else "64"
    return find_batch_size(probe) if arg == "auto" else int(arg)


def time_point(probe: VectorFieldProbe, index: int) -> TimePoint:
    """The time point of DDPM index k (the benchmarks' models all use the linear 1000-step schedule)."""
    t = float(probe.time_convention.to_canonical(torch.tensor(float(index), dtype=torch.float64)))
    return TimePoint.from_t(probe.process, t, index)


def clean_samples(probe: VectorFieldProbe, n: int, seed: int) -> torch.Tensor:
    """n uniform draws over the probe's data range, [n, *shape] float64 CPU (stand-ins for clean data)."""
    lo, hi = probe.data_range
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, *probe.sample_shape, generator=g, dtype=torch.float64)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall(fn: Callable[[], Any], device: torch.device) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, result) of one call; device work included on CUDA."""
    synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0, out


def forward_seconds(probe: VectorFieldProbe, batch: int, calls: int = 4) -> tuple[float, float]:
    """(wall, CPU) seconds per sample of the bare network at batch ``batch`` (no conversion, no loops).

    ``calls`` forward passes of one pre-allocated batch are timed together, so launch gaps between
    passes count as they would in a long audit.
    """
    x = torch.randn(batch, *probe.sample_shape, device=probe.device, dtype=probe.dtype)
    k = torch.full((batch,), 500.0, device=probe.device, dtype=probe.dtype)

    def run() -> None:
        with torch.no_grad(), forward_context(probe.precision, probe.device):
            for _ in range(calls):
                probe.fn(x, k)

    seconds, cpu, _ = wall(run, probe.device)
    return seconds / (calls * batch), cpu / (calls * batch)


@dataclass
class Timing:
    """Best wall and process-CPU seconds of a run, and of the bare network per sample."""

    seconds: float
    cpu_seconds: float
    forward: float
    forward_cpu: float
    evals: int
    result: Any

    @property
    def ratio(self) -> float:
        """Throughput of the run over the bare network's: forward time of its evaluations / its wall time."""
        return self.evals * self.forward / self.seconds

    @property
    def cpu_ratio(self) -> float:
        """The same in process CPU time (robust to other processes on a shared CPU with one torch thread)."""
        return self.evals * self.forward_cpu / self.cpu_seconds


class Interleaved:
    """Best-of timings of a benchmark run interleaved with timings of the bare forward pass.

    :meth:`measure` calls the run once as a warm-up (which also tells how many model evaluations it
    makes), then ``repeats`` times times the bare network over the same number of evaluations in full
    batches, followed by the run, and keeps the best of each. Equal amounts of work on both sides matter
    on a shared machine: a short timing is more likely to fall in a quiet spell than a long one.
    """

    def __init__(self, probe: VectorFieldProbe, batch: int, repeats: int) -> None:
        self.probe, self.batch, self.repeats = probe, batch, max(1, repeats)
        forward_seconds(probe, batch, 1)  # warm-up (allocator, kernels, autotuning)

    def measure(self, fn: Callable[[], Any], evals: Callable[[Any], int]) -> Timing:
        """Best timings of ``fn`` and of the bare network; ``evals(result)`` counts the run's forward passes."""
        _, _, out = wall(fn, self.probe.device)
        n = evals(out)
        calls = max(1, round(n / self.batch))
        t = Timing(math.inf, math.inf, math.inf, math.inf, n, out)
        for _ in range(self.repeats):
            fw, fc = forward_seconds(self.probe, self.batch, calls)
            seconds, cpu, out = wall(fn, self.probe.device)
            t = Timing(
                min(t.seconds, seconds), min(t.cpu_seconds, cpu), min(t.forward, fw), min(t.forward_cpu, fc), n, out
            )
        return t


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch since the last reset (CUDA), or the process's peak RSS (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str) -> dict[str, Any]:
    """Date, machine and versions of everything that decides a timing."""
    import diffusers

    import conservcheck

    dev = torch.device(device)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_model(),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "diffusers": diffusers.__version__,
        "conservcheck": conservcheck.__version__,
    }


def describe(env: dict[str, Any]) -> str:
    return (
        f"{env['date']} | {env['device_name']} ({env['device']}) | {env['cpu_cores']} CPU cores, "
        f"{env['torch_threads']} torch threads | torch {env['torch']} (CUDA {env['cuda']}) | "
        f"diffusers {env['diffusers']} | conservcheck {env['conservcheck']}"
    )


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """Print rows as a Markdown table; ``columns`` are (key, header, format spec)."""
    print("| " + " | ".join(h for _, h, _ in columns) + " |")
    print("|" + "|".join("---:" for _ in columns) + "|")
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("—" if v is None else format(v, fmt) if fmt and not isinstance(v, str) else str(v))
        print("| " + " | ".join(cells) + " |")


def write_json(
    path: str | None, benchmark: str, args: argparse.Namespace, env: dict[str, Any], rows: list[dict[str, Any]]
) -> None:
    """Append one JSON line per row (benchmark name, arguments and environment included) to ``path``."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"benchmark": benchmark, "args": vars(args), "environment": env, **row}) + "\n")
