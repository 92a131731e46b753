"""brainnorm: normalization layers for brainstate.

Layers are ``brainstate.nn.Module`` subclasses built on the pure functions of
:mod:`brainnorm.functional`, which share one statistics core.
"""

from . import functional
from ._backend import backend_info, warn_about_environment
from ._batch_norm import BatchNorm0d, BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchRenorm
from ._conversion import normalize_for_conversion, record_activations
from ._deploy import fold_batch_norm, fold_threshold
from ._divisive import GDN, DivisiveNormalization, DynamicDivisiveNormalization
from ._group_norm import GroupNorm, InstanceNorm
from ._layer_norm import LayerNorm, RMSNorm
from ._local_response_norm import LocalResponseNorm
from ._spiking import NeuNorm, TemporalAccumulatedBatchNorm
from ._states import NormalizationParamState
from ._temporal import BatchNormThroughTime, TemporalEffectiveBatchNorm, ThresholdDependentBatchNorm
from ._weight_norm import SpectralNorm, WeightNorm
from .functional import weight_standardization

__version__ = "0.1.0"

warn_about_environment()
del warn_about_environment

__all__ = [
    "NormalizationParamState",
    "BatchNorm0d",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm",
    "LayerNorm",
    "RMSNorm",
    "GroupNorm",
    "InstanceNorm",
    "LocalResponseNorm",
    "WeightNorm",
    "SpectralNorm",
    "BatchNormThroughTime",
    "ThresholdDependentBatchNorm",
    "TemporalEffectiveBatchNorm",
    "TemporalAccumulatedBatchNorm",
    "NeuNorm",
    "fold_batch_norm",
    "fold_threshold",
    "normalize_for_conversion",
    "record_activations",
    "DivisiveNormalization",
    "GDN",
    "DynamicDivisiveNormalization",
    "weight_standardization",
    "functional",
    "backend_info",
]

from ._signatures import expose_signatures  # noqa: E402  (needs every public class imported above)

expose_signatures(globals())
del expose_signatures
