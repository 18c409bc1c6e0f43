"""Every audit option in one table: its default, its CLI flag, its help text and its parser.

:func:`conservcheck.audit.audit` takes these options as keywords and the ``conservcheck audit`` command
builds one flag per option from the same table, so the API and the CLI cannot drift apart. Each option's
``parse`` accepts the CLI's text and the API's Python values alike, and raises a one-line
:class:`UsageError` for anything else.

Defaults that depend on the device (``None`` in the table) are filled in by :func:`device_defaults`:
the paper's 256 samples per time point and 1000 nodes per loop on a GPU, a *CPU-scaled* 32 samples and
128 nodes on a CPU (the audit says so in its log and its report).

Default time points (:func:`time_points`), from nearly clean to nearly pure noise:

* a discrete schedule of T steps (DDPM-style index k): k = round(f·T) for f in
  :data:`DISCRETE_FRACTIONS` — k = 10, 100, 250, 500, 750, 990 for T = 1000, as on the paper's axes;
* the OU / VP process in continuous time and flow matching: the times where σ(t) takes the values in
  :data:`NOISE_LEVELS` (σ = 0.05 … 0.999);
* variance exploding: σ = :data:`VE_LEVELS` × the width of the model's data range (0.01 … 50 widths).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .diagnostics.base import TimePoint
from .errors import UsageError
from .precision import MODES
from .probe import VectorFieldProbe

PATHS = ("rotation", "brownian", "projection")
CURL_CHOICES = ("none", "subjacobian", "hutchinson", "both")

PAPER_SAMPLES = 256
PAPER_POINTS = 1000
CPU_SAMPLES = 32
CPU_POINTS = 128

DISCRETE_FRACTIONS = (0.01, 0.1, 0.25, 0.5, 0.75, 0.99)
NOISE_LEVELS = (0.05, 0.2, 0.45, 0.7, 0.9, 0.999)
VE_LEVELS = (0.01, 0.05, 0.2, 1.0, 5.0, 50.0)


# --------------------------------------------------------------------------------------------- parsers


def _fail(flag: str, expected: str, value: Any, hint: str | None = None) -> UsageError:
    return UsageError(f"{flag}: expected {expected}, got {value!r}", hint or f"see conservcheck audit --help for {flag}")


def _items(value: Any) -> list[Any]:
    """A comma-separated string or a sequence → list of stripped items (empty items dropped)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _int(flag: str, lo: int, hi: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            out = int(str(value).strip()) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise _fail(flag, f"an integer ≥ {lo}", value) from None
        if out < lo or (hi is not None and out > hi):
            raise _fail(flag, f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer ≥ {lo}", value)
        return out

    return parse


def _positive_float(flag: str) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise _fail(flag, "a positive number", value) from None
        if not (out > 0 and math.isfinite(out)):
            raise _fail(flag, "a positive number", value)
        return out

    return parse


def _auto_or(inner: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        return "auto" if isinstance(value, str) and value.strip().lower() == "auto" else inner(value)

    return parse


def _choice(flag: str, choices: Sequence[str]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        v = str(value).strip().lower()
        if v not in choices:
            raise _fail(flag, "one of " + ", ".join(choices), value)
        return v

    return parse


def _optional_text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _paths(value: Any) -> tuple[str, ...]:
    items = [str(v).strip().lower() for v in _items(value)]
    if items in (["none"], []):
        return ()
    if items == ["all"]:
        return PATHS
    bad = [v for v in items if v not in PATHS]
    if bad:
        raise _fail("--paths", "a comma-separated subset of " + ", ".join(PATHS) + " (or all, none)", bad[0])
    return tuple(dict.fromkeys(items))


def _numbers(flag: str, integer: bool) -> Callable[[Any], tuple | None]:
    def parse(value: Any) -> tuple | None:
        if value is None:
            return None
        out: list[float | int] = []
        for item in _items(value):
            text = str(item).strip()
            if integer and isinstance(item, str) and text.count(":") in (1, 2):
                parts = [_int(flag, 0)(p) for p in text.split(":")]
                step = parts[2] if len(parts) == 3 else 1
                if step < 1:
                    raise _fail(flag, "a range start:stop[:step] with step ≥ 1", item)
                out += list(range(parts[0], parts[1] + 1, step))
            elif integer:
                out.append(_int(flag, 0)(item))
            else:
                try:
                    x = float(item)
                except (TypeError, ValueError):
                    raise _fail(flag, "comma-separated numbers", item) from None
                if not (x > 0 and math.isfinite(x)):
                    raise _fail(flag, "positive finite numbers", item)
                out.append(x)
        if not out:
            raise _fail(flag, "at least one value", value)
        return tuple(out)

    return parse


def _device(value: Any) -> str:
    text = str(value).strip().lower()
    if text == "auto":
        return text
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise _fail("--device", "auto, cpu, cuda or cuda:N", value) from None
    return text


_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(s|m|h)?\s*$", re.I)
_MEMORY = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(k|m|g|t)?i?b?\s*$", re.I)


def _duration(value: Any) -> float | None:
    """Seconds from ``90``, ``90s``, ``30m`` or ``1.5h``."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _positive_float("--time-budget")(value)
    m = _DURATION.match(str(value))
    if not m or float(m.group(1)) <= 0:
        raise _fail("--time-budget", "a duration such as 90s, 30m or 2h", value)
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[(m.group(2) or "s").lower()]


def _memory(value: Any) -> int | None:
    """Bytes from ``512MB``, ``4GB``, ``4G`` or a plain number of bytes."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(_positive_float("--memory-budget")(value))
    m = _MEMORY.match(str(value))
    if not m or float(m.group(1)) <= 0:
        raise _fail("--memory-budget", "a size such as 512MB or 4GB", value)
    return int(float(m.group(1)) * 1024 ** " kmgt".index((m.group(2) or " ").lower()))


_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def _shard(value: Any) -> str | None:
    """``i/n`` (0 ≤ i < n) from ``"1/4"`` or ``(1, 4)``; normalised to ``"1/4"``."""
    if value is None:
        return None
    text = "/".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    m = _SHARD.match(text)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise _fail("--shard", "i/n with 0 ≤ i < n, such as 0/4", value,
                    "number the shards of an n-way split 0/n … (n-1)/n")
    return f"{int(m.group(1))}/{int(m.group(2))}"


def shard_of(text: str | None) -> tuple[int, int]:
    """``"i/n"`` → (i, n); no shard → (0, 1), the whole audit."""
    if text is None:
        return 0, 1
    i, n = text.split("/")
    return int(i), int(n)


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise _fail("--trust-remote-code", "true or false", value)


# ----------------------------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Option:
    """One audit option: keyword ``name`` of :func:`~conservcheck.audit.audit`, CLI ``flag``.

    ``default`` is what an unset option means (``None`` where it depends on the device or the model;
    ``shown`` says what it becomes). ``numeric`` options change the numbers an audit computes and are
    part of its fingerprint (a resumed audit must match them); the others only change how it runs.
    """

    name: str
    default: Any
    flag: str
    help: str
    parse: Callable[[Any], Any]
    metavar: str = "TEXT"
    shown: str | None = None
    numeric: bool = True
    is_flag: bool = False


OPTIONS: tuple[Option, ...] = (
    Option("paths", PATHS, "--paths", "Loop types for the integral constraint (Eq. 4), comma-separated, or none.",
           _paths, "rotation,brownian,projection", shown="rotation,brownian,projection"),
    Option("curl", "subjacobian", "--curl",
           "Differential constraint (Eq. 5): the paper's 64×64 sub-Jacobian, the full-Jacobian Hutchinson "
           "estimate, both, or none.", _choice("--curl", CURL_CHOICES), "|".join(CURL_CHOICES)),
    Option("stein", None, "--stein", "Reference score for the Stein diagnostic (Eq. 20–21); off when unset.",
           _optional_text, "REF"),
    Option("times", None, "--times", "Canonical times t (OU time; σ for VE; flow time), comma-separated.",
           _numbers("--times", False), "T,T,..."),
    Option("time_indices", None, "--time-indices",
           "Native indices k of a discrete schedule, comma-separated or start:stop:step.",
           _numbers("--time-indices", True), "K,K,...",
           shown="10,100,250,500,750,990 for T=1000"),
    Option("sigmas", None, "--sigmas", "Noise levels σ (snapped to the nearest index on a discrete schedule).",
           _numbers("--sigmas", False), "S,S,..."),
    Option("n_samples", None, "--samples", "Samples (loops, probe points) per time point.",
           _int("--samples", 1), "N", shown=f"{PAPER_SAMPLES} on GPU, {CPU_SAMPLES} on CPU"),
    Option("n_points", None, "--points", "Nodes per loop, or auto (adaptive until the quadrature converges).",
           _auto_or(_int("--points", 4, 10**6)), "N|auto", shown=f"{PAPER_POINTS} on GPU, {CPU_POINTS} on CPU"),
    Option("device", "auto", "--device", "Device: auto (cuda if available), cpu, cuda, cuda:N.", _device, "DEVICE"),
    Option("precision", "fp32", "--precision", "Forward-pass precision.", _choice("--precision", MODES),
           "|".join(MODES)),
    Option("batch_size", "auto", "--batch-size", "Model batch size, or auto.", _auto_or(_int("--batch-size", 1)),
           "N|auto", numeric=False),
    Option("seed", 0, "--seed", "Seed of every random draw (results do not depend on batch size).",
           _int("--seed", 0), "N"),
    Option("data", None, "--data",
           "Clean samples x0: a folder of images, an .npy/.npz/.pt array, or a table file (local or hf://); "
           "default: samples drawn from the model.", _optional_text, "PATH", shown="samples from the model"),
    Option("revision", None, "--revision", "Hub revision (branch, tag or commit) of MODEL.", _optional_text, "REV"),
    Option("cache_dir", None, "--cache-dir", "Cache folder for hub downloads, model samples and partial results.",
           _optional_text, "DIR", shown="the Hugging Face cache", numeric=False),
    Option("trust_remote_code", False, "--trust-remote-code",
           "Allow loading checkpoints that execute code (pickles, custom classes).", _flag, "", is_flag=True),
    Option("resume", None, "--resume",
           "Partial-results file (JSON lines): its finished units are reused and new ones appended to it "
           "(default: a file in the cache folder, named in the log, removed once the audit completes).",
           _optional_text, "PATH", numeric=False, shown="a file in the cache folder"),
    Option("time_budget", None, "--time-budget",
           "Start no new unit after this long (90s, 30m, 2h); the rest are reported as skipped and --resume "
           "finishes them.", _duration, "DURATION", numeric=False),
    Option("memory_budget", None, "--memory-budget",
           "Approximate memory for the loop nodes, weights and sums held at once (512MB, 4GB); model activations "
           "are bounded by the batch size.", _memory, "SIZE", numeric=False),
    Option("shard", None, "--shard",
           "Run only shard i of n (0 ≤ i < n) of the audit's units and save them to the partial-results file; "
           "combine the n files with conservcheck merge (docs/distributed.md).", _shard, "I/N", numeric=False),
    Option("block", 64, "--block", "Size of the random sub-Jacobian block (paper: 64).", _int("--block", 2), "N"),
    Option("n_probes", 16, "--probes", "Random probe vectors per sample (Hutchinson curl, Stein divergence).",
           _int("--probes", 3), "N"),
    Option("n_vertices", 8, "--vertices", "Noisy copies joined in one projection loop.", _int("--vertices", 3), "N"),
    Option("bridge_u", 9.0, "--bridge-u", "Fictitious time U of the Brownian-bridge loops (paper: 9).",
           _positive_float("--bridge-u"), "U"),
    Option("sampler_steps", 50, "--sampler-steps", "Steps of the deterministic probability-flow sampler when x0 is drawn from the model.",
           _int("--sampler-steps", 2), "N"),
)

BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}


def resolve_options(options: dict[str, Any]) -> dict[str, Any]:
    """All options with defaults filled in and every given value parsed; unknown names raise."""
    unknown = [k for k in options if k not in BY_NAME]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(BY_NAME), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "valid options: " + ", ".join(BY_NAME)
        raise UsageError(f"unknown audit option {unknown[0]!r}", hint)
    out: dict[str, Any] = {}
    for opt in OPTIONS:
        value = options.get(opt.name, opt.default)
        out[opt.name] = value if value is None or value is opt.default else opt.parse(value)
    if sum(out[k] is not None for k in ("times", "time_indices", "sigmas")) > 1:
        raise UsageError("--times, --time-indices and --sigmas were combined", "choose time points one way")
    if not out["paths"] and out["curl"] == "none":
        raise UsageError("nothing to audit: no loop path and no curl variant", "pass --paths rotation or --curl subjacobian")
    return out


def resolve_device(device: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; a cuda device that is not available raises."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested but CUDA is not available", "use --device cpu or auto")
    return dev


def device_defaults(options: dict[str, Any], device: torch.device) -> tuple[dict[str, Any], bool]:
    """Fill the device-dependent defaults; returns (options, whether CPU-scaled defaults were used)."""
    out = dict(options)
    on_cpu = device.type == "cpu"
    scaled = False
    if out["n_samples"] is None:
        out["n_samples"] = CPU_SAMPLES if on_cpu else PAPER_SAMPLES
        scaled |= on_cpu
    if out["n_points"] is None:
        out["n_points"] = CPU_POINTS if on_cpu else PAPER_POINTS
        scaled |= on_cpu
    return out, scaled


# ----------------------------------------------------------------------------------------- time points


def _from_index(probe: VectorFieldProbe, k: int) -> TimePoint:
    t = float(probe.time_convention.to_canonical(torch.tensor(float(k), dtype=torch.float64)))
    return TimePoint.from_t(probe.process, t, index=int(k))


def time_points(
    probe: VectorFieldProbe,
    times: Sequence[float] | None = None,
    time_indices: Sequence[int] | None = None,
    sigmas: Sequence[float] | None = None,
) -> list[TimePoint]:
    """The audit's time points, sorted from clean to noisy, duplicates removed (defaults: module doc)."""
    conv, proc = probe.time_convention, probe.process
    steps = getattr(conv, "num_steps", None) if conv.discrete else None
    if time_indices is not None:
        if steps is None:
            raise UsageError(
                f"--time-indices needs a model with a discrete schedule; this one runs in {conv.name} time",
                "use --times or --sigmas",
            )
        bad = [k for k in time_indices if not 0 <= k < steps]
        if bad:
            raise UsageError(f"time index {bad[0]} is outside the schedule's 0 … {steps - 1}", "pick indices in range")
        points = [_from_index(probe, k) for k in time_indices]
    elif times is not None:
        proc.check_times(torch.tensor(times, dtype=torch.float64))
        points = [TimePoint.from_t(proc, t) for t in times]
    elif sigmas is not None:
        sig = torch.tensor(sigmas, dtype=torch.float64)
        if proc.name != "ve" and bool((sig >= 1).any()):
            raise UsageError(f"σ must lie in (0, 1) for the {proc.name} process", "pass noise levels below 1")
        t = proc.t_from_sigma(sig)
        if steps is not None:
            idx = conv.from_canonical(t).round().long().clamp(0, steps - 1)
            points = [_from_index(probe, int(k)) for k in idx]
        else:
            proc.check_times(t)
            points = [TimePoint.from_t(proc, float(v)) for v in t]
    elif steps is not None:
        points = [_from_index(probe, min(steps - 1, round(f * steps))) for f in DISCRETE_FRACTIONS]
    elif proc.name == "ve":
        width = probe.data_range[1] - probe.data_range[0]
        points = [TimePoint.from_t(proc, width * s) for s in VE_LEVELS]
    else:
        t = proc.t_from_sigma(torch.tensor(NOISE_LEVELS, dtype=torch.float64))
        points = [TimePoint.from_t(proc, float(v)) for v in t]
    unique = {p.key: p for p in points}
    return sorted(unique.values(), key=lambda p: p.t)


__all__ = [
    "BY_NAME",
    "OPTIONS",
    "Option",
    "device_defaults",
    "resolve_device",
    "resolve_options",
    "shard_of",
    "time_points",
]
