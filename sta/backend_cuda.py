"""The ``cuda`` backend: the fused sparse flow step in CUDA (csrc/cuda), through ``torch.ops.sta.*``.

Same ops, autograd and fake kernels as the ``cpu`` backend (:mod:`sta.backend_cpu`): the op
library dispatches CUDA tensors to the kernels of ``csrc/cuda/flow_step_binding.cpp``. The step
never synchronises with the host, so it can be captured in a CUDA graph.

Registers itself on import and never fails the import: :meth:`CudaBackend.why_not` says why it
cannot run (torch without CUDA, no GPU visible, extension built without CUDA, device, dtype).
"""
from __future__ import annotations

import torch

from . import _extension
from .backend_cpu import CpuBackend
from .backends import StepRequest, register

__all__ = ["CudaBackend"]


class CudaBackend(CpuBackend):
    """Sparse fused flow step on CUDA tensors (float32, float64); semantics of :mod:`sta.reference`."""

    name = "cuda"
    dtypes = frozenset({torch.float32, torch.float64})

    def unavailable(self) -> list[str]:
        if torch.version.cuda is None:
            return [f"torch {torch.__version__} has no CUDA"]
        if not torch.cuda.is_available():
            return ["no GPU visible (torch.cuda.is_available() is False)"]
        module = _extension.load()
        if module is None:
            return [f"C++/CUDA extension not available: {_extension.error()}"]
        if not getattr(module, "WITH_CUDA", 0):
            return ["the sta extension was built without CUDA (STA_BUILD_CUDA=0, or nvcc/CUDA_HOME not found "
                    f"at build time); rebuild: STA_BUILD_CUDA=1 {_extension.REBUILD_COMMAND}"]
        return []

    def why_not(self, request: StepRequest) -> list[str]:
        reasons = []
        if request.device.type != "cuda":
            reasons.append(f"device {request.device}: the cuda backend takes CUDA tensors only")
        if request.dtype not in self.dtypes:
            reasons.append(f"dtype {str(request.dtype).replace('torch.', '')} not supported (supports float32, float64)")
        reasons.extend(self.unavailable())
        return reasons


register(CudaBackend())
