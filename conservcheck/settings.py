"""Named settings: one :class:`Option` per setting, with its default, CLI flag, help, parser and schema.

The audit's options table (:mod:`conservcheck.runner.options`) is a tuple of these, contributed by the
core and by every registered diagnostic and loop type; the ``conservcheck audit`` command builds one flag
per option, and the report's JSON schema takes each option's ``schema`` fragment. A parser accepts the
CLI's text and the API's Python values alike and raises a one-line :class:`UsageError` for anything else.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from conservcheck.errors import UsageError


def fail(flag: str, expected: str, value: Any, hint: str | None = None) -> UsageError:
    return UsageError(
        f"{flag}: expected {expected}, got {value!r}", hint or f"see conservcheck audit --help for {flag}"
    )


def items(value: Any) -> list[Any]:
    """A comma-separated string or a sequence → list of stripped items (empty items dropped)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def integer(flag: str, lo: int, hi: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            out = int(str(value).strip()) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise fail(flag, f"an integer ≥ {lo}", value) from None
        if out < lo or (hi is not None and out > hi):
            raise fail(flag, f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer ≥ {lo}", value)
        return out

    return parse


def positive_float(flag: str) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise fail(flag, "a positive number", value) from None
        if not (out > 0 and math.isfinite(out)):
            raise fail(flag, "a positive number", value)
        return out

    return parse


def auto_or(inner: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        return "auto" if isinstance(value, str) and value.strip().lower() == "auto" else inner(value)

    return parse


def choice(flag: str, choices: Sequence[str]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        v = str(value).strip().lower()
        if v not in choices:
            raise fail(flag, "one of " + ", ".join(choices), value)
        return v

    return parse


def text(flag: str, expected: str = "a non-empty value") -> Callable[[Any], str | None]:
    """A text value; an empty one is refused (``--data ""`` must not silently mean "no data")."""

    def parse(value: Any) -> str | None:
        if value is None:
            return None
        out = str(value).strip()
        if not out:
            raise fail(flag, expected, value)
        return out

    return parse


def numbers(flag: str, whole: bool) -> Callable[[Any], tuple[float, ...] | None]:
    """Comma-separated positive numbers (``whole``: non-negative integers, also ranges start:stop[:step])."""

    def parse(value: Any) -> tuple[float, ...] | None:
        if value is None:
            return None
        out: list[float | int] = []
        for item in items(value):
            text = str(item).strip()
            if whole and isinstance(item, str) and text.count(":") in (1, 2):
                parts = [integer(flag, 0)(p) for p in text.split(":")]
                step = parts[2] if len(parts) == 3 else 1
                if step < 1:
                    raise fail(flag, "a range start:stop[:step] with step ≥ 1", item)
                out += list(range(parts[0], parts[1] + 1, step))
            elif whole:
                out.append(integer(flag, 0)(item))
            else:
                try:
                    x = float(item)
                except (TypeError, ValueError):
                    raise fail(flag, "comma-separated numbers", item) from None
                if not (x > 0 and math.isfinite(x)):
                    raise fail(flag, "positive finite numbers", item)
                out.append(x)
        if not out:
            raise fail(flag, "at least one value", value)
        return tuple(out)

    return parse


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def device_name(value: Any) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``: the devices the audit runs on (``meta`` holds no values,
    ``mps`` lacks float64 and the kernels the diagnostics need)."""
    out = str(value).strip().lower()
    if not _DEVICE.match(out):
        raise fail("--device", "auto, cpu, cuda or cuda:N", value)
    return out


_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(s|m|h)?\s*$", re.I)
_MEMORY = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(k|m|g|t)?i?b?\s*$", re.I)


def duration(value: Any) -> float | None:
    """Seconds from ``90``, ``90s``, ``30m`` or ``1.5h``."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return positive_float("--time-budget")(value)
    m = _DURATION.match(str(value))
    if not m or float(m.group(1)) <= 0:
        raise fail("--time-budget", "a duration such as 90s, 30m or 2h", value)
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[(m.group(2) or "s").lower()]


def memory(value: Any) -> int | None:
    """Bytes from ``512MB``, ``4GB``, ``4G`` or a plain number of bytes."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(positive_float("--memory-budget")(value))
    m = _MEMORY.match(str(value))
    if not m or float(m.group(1)) <= 0:
        raise fail("--memory-budget", "a size such as 512MB or 4GB", value)
    return int(float(m.group(1)) * 1024 ** " kmgt".index((m.group(2) or " ").lower()))


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise fail("--trust-remote-code", "true or false", value)


@dataclass(frozen=True)
class Option:
    """One audit option: keyword ``name`` of :func:`conservcheck.audit`, CLI ``flag``.

    ``default`` is what an unset option means (``None`` where it depends on the device or the model;
    ``shown`` says what it becomes). ``numeric`` options change the numbers an audit computes: they are
    part of its fingerprint (a resumed audit must match them) and of the report's ``options`` object,
    whose JSON schema holds ``schema`` for this option; the others only change how it runs. A
    ``multiple`` option may be given several times on the command line; its parser gets the list.
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
    schema: dict[str, Any] = field(default_factory=dict)
    multiple: bool = False
