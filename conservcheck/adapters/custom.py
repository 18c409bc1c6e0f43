"""Your own model through a ``module:factory`` reference.

``load_factory("package.module:factory")`` imports the module and calls the factory — with ``device=``
and ``dtype=`` when its signature takes them — which returns either

* a ready :class:`VectorFieldProbe`, or
* a pair ``(model, declaration)``: a callable ``model(x, native_time)`` and a dict declaring its units::

      def make(device="cpu", dtype=torch.float32):
          net = MyEpsNet.load("weights.safetensors")
          return net, dict(parameterization="epsilon", process="ou", time_convention="linear", sample_shape=(3, 32, 32))

Declaration keys: ``parameterization`` (score, epsilon, x0, v, velocity), ``process`` (a
:class:`~conservcheck.process.Process` or ``ou``/``vp``, ``ve``, ``flow``, ``subvp``), ``sample_shape`` — all three
required — and optionally ``time_convention`` (a :class:`~conservcheck.process.TimeConvention` or one of
:data:`TIME_CONVENTIONS`: the identity, DDPM schedules with T = 1000 and their default β, score_sde's VP
time), ``data_range`` (default (−1, 1)), ``precision`` and ``name``. A model that is an ``nn.Module`` is
moved to the device and dtype, put in eval mode and frozen.

A factory for a conditional model returns a probe whose ``fn`` is a
:class:`~conservcheck.conditioning.ConditionalField`; it receives the audit's ``prompt``,
``negative_prompt`` and ``class_label`` as keywords when its signature names them.

A module that is not importable from the installed packages is looked for in the current folder too.

Identity: the probe's ``info.extra["identity"]`` records the module file and its SHA-256, the factory's
name and the SHA-256 of the weights the factory returned (every tensor reachable from the returned model:
an ``nn.Module``'s state dict, a bound method's object, a closure's cells;
:func:`conservcheck.probe.weights_digest`), so an
audit resumed or merged with another model, other code or other weights is refused. A factory that ends
the process (``sys.exit``) is reported as a load error, and references into Python's standard library
(``os:abort``) are refused before anything is called.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from conservcheck.errors import ConservcheckError, ModelLoadError, UsageError, reason
from conservcheck.parameterization import canonical_name, conversion
from conservcheck.probe import ProbeInfo, VectorFieldProbe, weights_digest
from conservcheck.process import DiscreteSchedule, Process, TimeConvention, VPSDETime, get_process

NAME = "custom"

#: Names accepted for ``time_convention`` in a declaration.
TIME_CONVENTIONS: dict[str, Callable[[], TimeConvention]] = {
    "canonical": TimeConvention,
    "linear": DiscreteSchedule.linear,
    "scaled_linear": DiscreteSchedule.scaled_linear,
    "cosine": DiscreteSchedule.cosine,
    "sigmoid": DiscreteSchedule.sigmoid,
    "vpsde": VPSDETime,
}
REQUIRED = ("parameterization", "process", "sample_shape")
OPTIONAL = ("time_convention", "data_range", "precision", "name")
_RECIPE = "return VectorFieldProbe(...) or (model, dict(parameterization=..., process=..., sample_shape=...))"


def detect(path: Any) -> bool:
    """Always False: factories are reached by a ``module:factory`` reference, never by path."""
    return False


def load(
    path: Any,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    **options: Any,
) -> VectorFieldProbe:
    """The adapter contract's entry point: ``path`` is the ``module:factory`` reference itself."""
    if options:
        raise UsageError(
            f"unknown option(s) {', '.join(sorted(options))} for a factory", "pass options to the factory itself"
        )
    return load_factory(str(path), device=device, dtype=dtype)


def split_spec(spec: str) -> tuple[str, str]:
    """``"package.module:attr.path"`` → (module, attribute path)."""
    module, sep, attr = str(spec).strip().partition(":")
    if not sep or not module or not attr:
        raise UsageError(f"{spec!r} is not a module:factory reference", "write package.module:function")
    return module, attr


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        cwd = os.getcwd()
        top = module.partition(".")[0]
        if err.name == top and cwd not in sys.path:
            sys.path.append(cwd)
            return _import(module)
        raise ModelLoadError(
            f"cannot import {module!r} ({reason(err)})",
            "install the package, or run from (or put on PYTHONPATH) the folder that holds the module",
        ) from err
    except Exception as err:
        raise ModelLoadError(
            f"importing {module!r} failed ({reason(err)})",
            "import the module directly to see the traceback",
        ) from err


def resolve_factory(spec: str) -> Callable[..., Any]:
    """The callable a ``module:factory`` reference names (attribute paths like ``mod:Class.build`` work)."""
    module_name, attr = split_spec(spec)
    if module_name.partition(".")[0] in getattr(sys, "stdlib_module_names", ()):
        raise ModelLoadError(
            f"{spec} names a function of Python's standard library, not a model factory",
            "write a function in your own module that returns the model; " + _RECIPE,
        )
    obj: Any = _import(module_name)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(
                f"module {module_name!r} has no attribute {attr!r}", "name a function defined in that module"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(f"{spec} is a {type(obj).__name__}, not a callable factory", _RECIPE)
    factory: Callable[..., Any] = obj
    return factory


def _call(factory: Callable[..., Any], spec: str, device: Any, dtype: torch.dtype, condition: dict[str, Any]) -> Any:
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if k in params or var_kw}
    refused = [k for k in condition if not (k in params or var_kw)]
    if refused:
        flags = ", ".join("--" + k.replace("_", "-") for k in refused)
        raise UsageError(
            f"factory {spec} takes no {', '.join(refused)} argument for {flags}",
            f"drop {flags}, or give the factory a keyword parameter {refused[0]}",
        )
    kwargs.update(condition)
    try:
        return factory(**kwargs)
    except ConservcheckError:
        raise
    except SystemExit as err:
        raise ModelLoadError(
            f"factory {spec} called sys.exit({err.code!r}) instead of returning a model", _RECIPE
        ) from None
    except Exception as err:
        raise ModelLoadError(
            f"factory {spec} raised {reason(err)}",
            "call the factory directly to see the traceback",
        ) from err


def _time_convention(value: Any) -> TimeConvention:
    if isinstance(value, TimeConvention):
        return value
    if isinstance(value, str) and value.lower() in TIME_CONVENTIONS:
        return TIME_CONVENTIONS[value.lower()]()
    raise UsageError(
        f"unknown time_convention {value!r}",
        f"pass a conservcheck.process.TimeConvention or one of {', '.join(TIME_CONVENTIONS)}",
    )


def from_declaration(
    model: Callable[..., Any],
    declaration: Mapping[str, Any],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    reference: str | None = None,
) -> VectorFieldProbe:
    """A probe for ``model(x, native_time)`` with the units a declaration dict gives (keys in the module docstring)."""
    where = f" in the declaration of {reference}" if reference else ""
    unknown = sorted(set(declaration) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise UsageError(f"unknown key(s) {', '.join(unknown)}{where}", f"accepted: {', '.join(REQUIRED + OPTIONAL)}")
    missing = [k for k in REQUIRED if k not in declaration]
    if missing:
        raise UsageError(
            f"missing key(s) {', '.join(missing)}{where}", "declare parameterization, process and sample_shape"
        )
    proc = declaration["process"]
    process = proc if isinstance(proc, Process) else get_process(str(proc))
    param = canonical_name(str(declaration["parameterization"]))
    time = _time_convention(declaration.get("time_convention", "canonical"))
    data_range = tuple(declaration.get("data_range", (-1.0, 1.0)))
    if isinstance(model, torch.nn.Module):
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    info = ProbeInfo(
        name=str(declaration.get("name") or reference or type(model).__name__),
        adapter=NAME,
        reference=reference,
        extra={
            "factory": reference,
            "native_time": time.to_dict(),
            "output": param,
            "data_range": list(data_range),
            "conversion": conversion(param),
        },
    )
    return VectorFieldProbe(
        model,
        process=process,
        sample_shape=tuple(declaration["sample_shape"]),
        parameterization=param,
        time_convention=time,
        data_range=data_range,
        device=device,
        dtype=dtype,
        precision=declaration.get("precision"),
        info=info,
    )


def _module_sha256(module_name: str) -> str | None:
    module = sys.modules.get(module_name)
    try:
        source = inspect.getsourcefile(module) if module is not None else None
    except TypeError:
        source = None
    if not source or not os.path.isfile(source):
        return None
    return hashlib.sha256(Path(source).read_bytes()).hexdigest()


def identity(spec: str, model: Any) -> dict[str, Any]:
    """What identifies a factory's numbers: its module and the SHA-256 of its file, the factory's name, and
    the SHA-256 of the weights it returned (None where there are none, or the module has no source file)."""
    module_name, attr = split_spec(spec)
    return {
        "module": module_name,
        "module_sha256": _module_sha256(module_name),
        "factory": attr,
        "weights_sha256": weights_digest(model),
    }


def load_factory(
    spec: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, **condition: Any
) -> VectorFieldProbe:
    """Import ``module``, call ``factory`` and return its probe (see the module docstring).

    ``condition`` (``prompt``, ``negative_prompt``, ``class_label``: a conditional model's conditions, as
    the audit parsed them) is passed as keywords; a factory without such a parameter refuses them.
    """
    factory = resolve_factory(spec)
    result = _call(factory, spec, device, dtype, condition)
    if isinstance(result, VectorFieldProbe):
        result.info.extra.setdefault("factory", spec)
        result.info.extra.setdefault("identity", identity(spec, result.fn))
        return result
    if isinstance(result, tuple) and len(result) == 2 and callable(result[0]) and isinstance(result[1], Mapping):
        probe = from_declaration(result[0], result[1], device=device, dtype=dtype, reference=spec)
        probe.info.extra["identity"] = identity(spec, probe.fn)
        return probe
    raise ModelLoadError(
        f"factory {spec} returned a {type(result).__name__}, not a VectorFieldProbe or a (model, dict) pair", _RECIPE
    )
