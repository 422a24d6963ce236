"""sta: Sparse Transformation Analysis (Song, Keller, Yue, Perona, Welling, T-PAMI 2025), made fast.

Public API::

    sta.FieldBank            the learned fields (potential + rotational), parameters stacked per field
    sta.flow_step            the fused sparse flow step (functional), see help(sta.flow_step)
    sta.FlowStepOut          its result
    sta.flow_path            T chained flow steps in one call (a sequence's whole latent path)
    sta.nn.SparseFlowLayer   drop-in module over flow_step, with the log-density update
    sta.latent_grid          the field mix sampled on a 2-D/3-D grid of latent coordinates (sta.grid)
    sta.grid_transport       one conservative finite-volume step of the density; sta.transport_for
    sta.grid_divergence      divergence / curl on the grid by central differences; sta.grid_curl

``python -m sta.info`` prints versions, devices and the availability of every op x backend.
"""
from . import nn, reference
from .backends import BackendUnavailableError
from .fields import FieldBank, PotentialFields, RotationalFields, TimeEmbedding
from .grid import LatentGrid, grid_curl, grid_divergence, grid_transport, latent_grid, transport_for
from .ops import OUTPUT_NAMES, FlowStepOut, flow_step
from .path import FlowPathOut, flow_path

__version__ = "0.1.0"

__all__ = [
    "FieldBank",
    "PotentialFields",
    "RotationalFields",
    "TimeEmbedding",
    "flow_step",
    "FlowStepOut",
    "flow_path",
    "FlowPathOut",
    "OUTPUT_NAMES",
    "BackendUnavailableError",
    "LatentGrid",
    "latent_grid",
    "grid_transport",
    "transport_for",
    "grid_divergence",
    "grid_curl",
    "nn",
    "reference",
    "__version__",
]

# Register the compiled backends now (about 0.25 s; nothing is compiled here) rather than on the
# first flow_step: the first call may be inside torch.compile(fullgraph=True), where dynamo
# cannot trace the registry's import lock.
from .backends import _load_plugins as _register_backends  # noqa: E402

_register_backends()
del _register_backends

