"""conservcheck: does a diffusion model's learned vector field behave like a score?"""

from .errors import ConservcheckError, ModelLoadError, ProbeContractError, UsageError
from .probe import ProbeInfo, VectorFieldProbe
from .process import (
    DiscreteSchedule,
    FlowProcess,
    OUProcess,
    Process,
    TimeConvention,
    VEProcess,
    VPSDETime,
    get_process,
)

__version__ = "0.1.0"

# Bound after __version__ (the audit records it); the function shadows its module's name on purpose, so
# `conservcheck.audit(...)` is the call and `from conservcheck.audit import merge` still reaches the module.
from .audit import audit, merge  # noqa: E402
from .report import AuditReport  # noqa: E402

__all__ = [
    "AuditReport",
    "ConservcheckError",
    "DiscreteSchedule",
    "FlowProcess",
    "ModelLoadError",
    "OUProcess",
    "Process",
    "ProbeContractError",
    "ProbeInfo",
    "TimeConvention",
    "UsageError",
    "VEProcess",
    "VPSDETime",
    "VectorFieldProbe",
    "audit",
    "merge",
    "get_process",
    "__version__",
]
