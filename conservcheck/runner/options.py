"""Every audit option in one table: its default, its CLI flag, its help text, its parser and its schema.

:func:`conservcheck.audit` takes these options as keywords and the ``conservcheck audit`` command builds
one flag per option from the same table, so the API and the CLI cannot drift apart. The table is the
options of every registered diagnostic (and, through the loop-integral diagnostic, of every loop type),
then the core options below (:data:`CORE_OPTIONS`).

Defaults that depend on the device (``None`` in the table) are filled in by :func:`device_defaults`:
the paper's 256 samples per time point and 1000 nodes per loop on a GPU; on a CPU, *CPU-scaled* 32 samples
and, per loop type, the nodes its quadrature rule needs (:attr:`~conservcheck.geometry.loops.LoopType.cpu_points`;
the audit says so in its log and its report).
"""

from __future__ import annotations

import difflib
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from conservcheck import diagnostics
from conservcheck.diagnostics.loop_integral import loop_points
from conservcheck.errors import UsageError
from conservcheck.precision import MODES
from conservcheck.settings import (
    Option,
    auto_or,
    boolean,
    choice,
    device_name,
    duration,
    fail,
    integer,
    memory,
    numbers,
    text,
)
from conservcheck.settings import items as settings_items

PAPER_SAMPLES = 256
CPU_SAMPLES = 32


_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def _shard(value: Any) -> str | None:
    """``i/n`` (0 ≤ i < n) from ``"1/4"`` or ``(1, 4)``; normalised to ``"1/4"``."""
    if value is None:
        return None
    text = "/".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    m = _SHARD.match(text)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise fail(
            "--shard", "i/n with 0 ≤ i < n, such as 0/4", value, "number the shards of an n-way split 0/n … (n-1)/n"
        )
    return f"{int(m.group(1))}/{int(m.group(2))}"


def _flat(value: Any) -> list[Any]:
    """Items of a comma-separated string, or of a list whose strings may be comma-separated themselves."""
    out: list[Any] = []
    for v in settings_items(value):
        out += settings_items(v) if isinstance(v, str) else [v]
    return out


def _guidance(value: Any) -> tuple[float, ...] | None:
    """Guidance scales w ≥ 0 from ``"1,7.5"``, a list or a number: sorted, duplicates removed."""
    if value is None:
        return None
    out = set()
    for item in _flat(value):
        try:
            w = float(item)
        except (TypeError, ValueError):
            raise fail("--guidance-scale", "numbers ≥ 0 such as 1 or 7.5", item) from None
        if not (math.isfinite(w) and w >= 0):
            raise fail("--guidance-scale", "numbers ≥ 0 such as 1 or 7.5", item)
        out.add(w)
    if not out:
        raise fail("--guidance-scale", "at least one number", value)
    return tuple(sorted(out))


def _class_labels(value: Any) -> tuple[int, ...] | str | None:
    """Class labels ≥ 0 (comma-separated or repeated; order kept, duplicates removed), or ``random``."""
    if value is None:
        return None
    labels = _flat(value)
    if any(isinstance(v, str) and v.strip().lower() == "random" for v in labels):
        if len(labels) != 1:
            raise fail("--class-label", "class labels, or random on its own", value)
        return "random"
    out = tuple(dict.fromkeys(integer("--class-label", 0)(v) for v in labels))
    if not out:
        raise fail("--class-label", "at least one class label, or random", value)
    return out


def _prompts(value: Any) -> tuple[str, ...] | None:
    """Prompts, verbatim (commas are part of a prompt): one string, or one per repetition of --prompt."""
    if value is None:
        return None
    prompts = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(p, str) for p in prompts) or not prompts:
        raise fail("--prompt", "text, or a list of texts", value)
    return tuple(prompts)


def read_prompts(path: str) -> tuple[str, ...]:
    """The prompts of a text file, one per non-empty line (trailing whitespace removed)."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"no prompt file {path}", "pass a text file with one prompt per line") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(
            f"cannot read prompt file {path} ({err})", "pass a UTF-8 text file, one prompt per line"
        ) from None
    prompts = tuple(line.rstrip() for line in text.splitlines() if line.strip())
    if not prompts:
        raise UsageError(f"prompt file {path} holds no prompt", "write one prompt per line")
    return prompts


#: The options that choose a conditional model's conditions; they reach the adapter that loads it.
CONDITION_OPTIONS = ("prompt", "negative_prompt", "class_label")


def shard_of(text: str | None) -> tuple[int, int]:
    """``"i/n"`` → (i, n); no shard → (0, 1), the whole audit."""
    if text is None:
        return 0, 1
    i, n = text.split("/")
    return int(i), int(n)


CORE_OPTIONS: tuple[Option, ...] = (
    Option(
        "times",
        None,
        "--times",
        "Canonical times t (OU time; σ for VE; flow time), comma-separated.",
        numbers("--times", False),
        "T,T,...",
        schema={"type": ["array", "null"], "items": {"type": "number"}},
    ),
    Option(
        "time_indices",
        None,
        "--time-indices",
        "Native indices k of a discrete schedule, comma-separated or start:stop:step.",
        numbers("--time-indices", True),
        "K,K,...",
        shown="10,100,250,500,750,990 for T=1000",
        schema={"type": ["array", "null"], "items": {"type": "integer"}},
    ),
    Option(
        "sigmas",
        None,
        "--sigmas",
        "Noise levels σ (snapped to the nearest index on a discrete schedule).",
        numbers("--sigmas", False),
        "S,S,...",
        schema={"type": ["array", "null"], "items": {"type": "number"}},
    ),
    Option(
        "n_samples",
        None,
        "--samples",
        "Samples (loops, probe points) per time point.",
        integer("--samples", 1),
        "N",
        shown=f"{PAPER_SAMPLES} on GPU, {CPU_SAMPLES} on CPU",
        schema={"type": "integer", "minimum": 1},
    ),
    Option(
        "device",
        "auto",
        "--device",
        "Device: auto (cuda if available), cpu, cuda, cuda:N.",
        device_name,
        "DEVICE",
        schema={"type": "string"},
    ),
    Option(
        "precision",
        "fp32",
        "--precision",
        "Forward-pass precision.",
        choice("--precision", MODES),
        "|".join(MODES),
        schema={"enum": list(MODES)},
    ),
    Option(
        "batch_size",
        "auto",
        "--batch-size",
        "Model batch size, or auto (a resumed or merged audit must use the same).",
        auto_or(integer("--batch-size", 1)),
        "N|auto",
        numeric=False,
    ),
    Option(
        "seed",
        0,
        "--seed",
        "Seed of every random draw (the draws do not depend on the batch size).",
        integer("--seed", 0),
        "N",
        schema={"type": "integer", "minimum": 0},
    ),
    Option(
        "data",
        None,
        "--data",
        "Clean samples x0: a folder of images, an .npy/.npz/.pt array, or a table file (local or hf://); "
        "default: samples drawn from the model.",
        text("--data", "a file or folder path"),
        "PATH",
        shown="samples from the model",
        schema={"type": ["string", "null"]},
    ),
    Option(
        "revision",
        None,
        "--revision",
        "Hub revision (branch, tag or commit) of MODEL.",
        text("--revision", "a branch, tag or commit"),
        "REV",
        schema={"type": ["string", "null"]},
    ),
    Option(
        "cache_dir",
        None,
        "--cache-dir",
        "Cache folder for hub downloads, model samples and partial results.",
        text("--cache-dir", "a folder path"),
        "DIR",
        shown="the Hugging Face cache",
        numeric=False,
    ),
    Option(
        "trust_remote_code",
        False,
        "--trust-remote-code",
        "Allow loading checkpoints that execute code (pickles, custom classes).",
        boolean,
        "",
        is_flag=True,
        schema={"type": "boolean"},
    ),
    Option(
        "resume",
        None,
        "--resume",
        "Partial-results file (JSON lines): its finished units are reused and new ones appended to it "
        "(default: a file of this run in the cache folder, named in the log, removed once the report is written).",
        text("--resume", "a file path"),
        "PATH",
        numeric=False,
        shown="a file in the cache folder",
    ),
    Option(
        "time_budget",
        None,
        "--time-budget",
        "Start no new unit after this long (90s, 30m, 2h); the rest are reported as skipped and --resume "
        "finishes them.",
        duration,
        "DURATION",
        numeric=False,
    ),
    Option(
        "memory_budget",
        None,
        "--memory-budget",
        "Approximate memory for the loop nodes, weights and sums held at once (512MB, 4GB); model activations "
        "are bounded by the batch size.",
        memory,
        "SIZE",
        numeric=False,
    ),
    Option(
        "shard",
        None,
        "--shard",
        "Run only shard i of n (0 ≤ i < n) of the audit's units and save them to the partial-results file; "
        "combine the n files with conservcheck merge (docs/distributed.md).",
        _shard,
        "I/N",
        numeric=False,
    ),
    Option(
        "prompt",
        None,
        "--prompt",
        "Prompt of a text-to-image model (repeat for several: sample i gets prompt i mod K).",
        _prompts,
        "TEXT",
        shown="none (an unconditional model)",
        schema={"type": ["array", "null"], "items": {"type": "string"}},
        multiple=True,
    ),
    Option(
        "prompt_file",
        None,
        "--prompt-file",
        "A text file of prompts, one per line (added after any --prompt).",
        text("--prompt-file"),
        "PATH",
        numeric=False,
    ),
    Option(
        "negative_prompt",
        None,
        "--negative-prompt",
        "The unconditional input of classifier-free guidance (the field at w = 0).",
        text("--negative-prompt"),
        "TEXT",
        shown="the empty prompt",
        schema={"type": ["string", "null"]},
    ),
    Option(
        "class_label",
        None,
        "--class-label",
        "Class label of a class-conditional model (repeat or comma-separate for several: sample i gets label "
        "i mod K), or random (a seeded draw per sample).",
        _class_labels,
        "N|random",
        shown="none (an unconditional model)",
        schema={
            "oneOf": [
                {"type": "array", "items": {"type": "integer", "minimum": 0}},
                {"const": "random"},
                {"type": "null"},
            ]
        },
        multiple=True,
    ),
    Option(
        "guidance_scale",
        None,
        "--guidance-scale",
        "Classifier-free guidance scales w of a conditional model, comma-separated or repeated: every "
        "diagnostic is reported against w (docs/conditional.md).",
        _guidance,
        "W",
        shown="1 (the conditional field) for conditional models",
        schema={"type": ["array", "null"], "items": {"type": "number", "minimum": 0}},
        multiple=True,
    ),
    Option(
        "n_probes",
        16,
        "--probes",
        "Random probe vectors per sample (Hutchinson curl, Stein divergence).",
        integer("--probes", 3),
        "N",
        schema={"type": "integer"},
    ),
    Option(
        "sampler_steps",
        50,
        "--sampler-steps",
        "Steps of the deterministic probability-flow sampler when x0 is drawn from the model.",
        integer("--sampler-steps", 2),
        "N",
        schema={"type": "integer"},
    ),
)


@lru_cache(maxsize=1)
def audit_options() -> tuple[Option, ...]:
    """The whole table: every registered diagnostic's options (registration order), then the core ones."""
    table: dict[str, Option] = {}
    for spec in diagnostics.registered().values():
        for o in spec.options:
            table.setdefault(o.name, o)
    for o in CORE_OPTIONS:
        if o.name in table:
            raise RuntimeError(f"a diagnostic redefines the core audit option {o.name!r}")
        table[o.name] = o
    return tuple(table.values())


def option(name: str) -> Option:
    """The audit option called ``name``."""
    for o in audit_options():
        if o.name == name:
            return o
    raise KeyError(name)


def resolve_options(options: dict[str, Any]) -> dict[str, Any]:
    """All options with defaults filled in and every given value parsed; unknown names raise."""
    table = audit_options()
    names = [o.name for o in table]
    unknown = [k for k in options if k not in names]
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "valid options: " + ", ".join(names)
        raise UsageError(f"unknown audit option {unknown[0]!r}", hint)
    out: dict[str, Any] = {}
    for opt in table:
        value = options.get(opt.name, opt.default)
        out[opt.name] = value if value is None or value is opt.default else opt.parse(value)
    if sum(out[k] is not None for k in ("times", "time_indices", "sigmas")) > 1:
        raise UsageError("--times, --time-indices and --sigmas were combined", "choose time points one way")
    if out["prompt_file"] is not None:
        out["prompt"] = (out["prompt"] or ()) + read_prompts(out["prompt_file"])
    if out["prompt"] is not None and out["class_label"] is not None:
        raise UsageError("--prompt and --class-label were combined", "a model takes prompts or class labels, not both")
    if out["negative_prompt"] is not None and out["prompt"] is None:
        raise UsageError("--negative-prompt needs a --prompt", "give the prompt it guides away from")
    if not any(spec.selected(out) for spec in diagnostics.registered().values()):
        raise UsageError(
            "nothing to audit: no loop path, no curl variant and no Stein reference",
            "pass --paths rotation or --curl subjacobian",
        )
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
    """Fill the device-dependent defaults; returns (options, whether CPU-scaled defaults were used).

    ``loop_points`` is added: the nodes per loop of each selected loop type
    (:func:`~conservcheck.diagnostics.loop_integral.loop_points`); ``n_points`` stays None when ``--points``
    was not given.
    """
    out = dict(options)
    on_cpu = device.type == "cpu"
    scaled = False
    if out["n_samples"] is None:
        out["n_samples"] = CPU_SAMPLES if on_cpu else PAPER_SAMPLES
        scaled |= on_cpu
    out["loop_points"] = loop_points(out["n_points"], out["paths"], device)
    scaled |= on_cpu and out["n_points"] is None and bool(out["paths"])
    return out, scaled


def numeric_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options that decide the numbers (the report's ``options`` without ``cpu_scaled``): every numeric
    option of the table and, once :func:`device_defaults` has filled it, ``loop_points``."""
    out = {o.name: options[o.name] for o in audit_options() if o.numeric}
    if "loop_points" in options:
        out["loop_points"] = options["loop_points"]
    return out


def cpu_scaled_text(options: dict[str, Any]) -> str:
    """The line that says an audit ran with CPU-scaled defaults, from its (report's) options."""
    nodes = ", ".join(f"{path} {n}" for path, n in (options.get("loop_points") or {}).items())
    return (
        f"CPU-scaled defaults: {options['n_samples']} samples per time point"
        + (f"; nodes per loop: {nodes}" if nodes else "")
        + " (the paper: 256 samples, 1000 nodes; set --samples / --points)"
    )


__all__ = [
    "CONDITION_OPTIONS",
    "CORE_OPTIONS",
    "audit_options",
    "cpu_scaled_text",
    "device_defaults",
    "numeric_options",
    "option",
    "resolve_device",
    "read_prompts",
    "resolve_options",
    "shard_of",
]
