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

__all__ = [
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
    "get_process",
    "__version__",
]
