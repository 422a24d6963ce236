"""sta: Sparse Transformation Analysis (Song, Keller, Yue, Perona, Welling, T-PAMI 2025), made fast.

Public API::

    sta.FieldBank            the learned fields (potential + rotational), parameters stacked per field
    sta.flow_step            the fused sparse flow step (functional), see help(sta.flow_step)
    sta.FlowStepOut          its result
    sta.nn.SparseFlowLayer   drop-in module over flow_step, with the log-density update

``python -m sta.info`` prints versions, devices and the availability of every backend.
"""
from . import nn, reference
from .backends import BackendUnavailableError
from .fields import FieldBank, PotentialFields, RotationalFields, TimeEmbedding
from .ops import OUTPUT_NAMES, FlowStepOut, flow_step

__version__ = "0.1.0"

__all__ = [
    "FieldBank",
    "PotentialFields",
    "RotationalFields",
    "TimeEmbedding",
    "flow_step",
    "FlowStepOut",
    "OUTPUT_NAMES",
    "BackendUnavailableError",
    "nn",
    "reference",
    "__version__",
]
