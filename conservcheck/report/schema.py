"""The report's JSON schema: a fixed part, and the ``options`` object built from the audit's options.

The fixed part is ``conservcheck/schema/report.schema.json``. The ``options`` object has one property per
numeric audit option, with that option's own schema fragment, so a registered diagnostic or loop type that
adds an option also adds it to the schema (plus ``loop_points``, the nodes per loop of each loop type, and
``cpu_scaled``). ``conservcheck.report_schema()`` gives the
schema of this installation's options.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources
from typing import Any

from conservcheck.settings import Option

SCHEMA_VERSION = "1.4"


@lru_cache(maxsize=1)
def _fixed() -> dict[str, Any]:
    text = resources.files("conservcheck").joinpath("schema/report.schema.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def report_schema(options: Iterable[Option]) -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of a report whose audit had ``options``."""
    schema = copy.deepcopy(_fixed())
    numeric = [o for o in options if o.numeric]
    props = {o.name: copy.deepcopy(o.schema) for o in numeric}
    props["loop_points"] = {
        "type": "object",
        "additionalProperties": {"oneOf": [{"type": "integer", "minimum": 4}, {"const": "auto"}]},
    }
    props["cpu_scaled"] = {"type": "boolean"}
    schema["properties"]["options"] = {
        "type": "object",
        "required": [name for name in props if name != "loop_points"],
        "properties": props,
        "additionalProperties": False,
    }
    return schema


__all__ = ["SCHEMA_VERSION", "report_schema"]
