"""conservcheck: does a diffusion model's learned vector field behave like a score?

The public API: :func:`load` a model as a :class:`VectorFieldProbe` (a field in score units at canonical
time), run the diagnostics on it one by one (:func:`loop_diagnostic`, :func:`curl_subjacobian`,
:func:`curl_hutchinson`, :func:`stein_diagnostic`, :func:`transport_check`) at a :class:`TimePoint`, or
all of them at once with :func:`audit`, which returns an :class:`AuditReport`. Everything else is
reachable through its module; names starting with an underscore are private.
"""

from typing import Any

from conservcheck.batching import Batcher
from conservcheck.diagnostics.curl import curl_hutchinson, curl_subjacobian
from conservcheck.diagnostics.loop_integral import loop_diagnostic
from conservcheck.diagnostics.result import DiagnosticResult
from conservcheck.diagnostics.stein import stein_diagnostic
from conservcheck.diagnostics.transport import transport_check
from conservcheck.errors import ConservcheckError, ModelLoadError, ProbeContractError, UsageError
from conservcheck.probe import ProbeInfo, VectorFieldProbe
from conservcheck.process import (
    DiscreteSchedule,
    FlowProcess,
    OUProcess,
    Process,
    SubVPProcess,
    TimeConvention,
    VEProcess,
    VPSDETime,
    get_process,
)
from conservcheck.report import AuditReport
from conservcheck.report import report_schema as _report_schema
from conservcheck.runner.audit import AuditInterrupted, audit, load
from conservcheck.runner.merge import merge
from conservcheck.runner.options import audit_options
from conservcheck.timepoints import TimePoint, forward_samples, time_points
from conservcheck.version import __version__


def report_schema() -> dict[str, Any]:
    """The JSON schema of a report written by this installation (its registered options included)."""
    return _report_schema(audit_options())


__all__ = [
    "AuditInterrupted",
    "AuditReport",
    "Batcher",
    "ConservcheckError",
    "DiagnosticResult",
    "DiscreteSchedule",
    "FlowProcess",
    "ModelLoadError",
    "OUProcess",
    "Process",
    "ProbeContractError",
    "ProbeInfo",
    "SubVPProcess",
    "TimeConvention",
    "TimePoint",
    "UsageError",
    "VEProcess",
    "VPSDETime",
    "VectorFieldProbe",
    "__version__",
    "audit",
    "curl_hutchinson",
    "curl_subjacobian",
    "forward_samples",
    "get_process",
    "load",
    "loop_diagnostic",
    "merge",
    "report_schema",
    "stein_diagnostic",
    "time_points",
    "transport_check",
]
