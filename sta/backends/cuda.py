"""The ``cuda`` backend: the compiled ops of ``sta._C`` on CUDA tensors (csrc/cuda), for every op.

Same ops, fakes and autograd as the ``cpu`` backend (:mod:`sta.backends.compiled`): the op library
dispatches CUDA tensors to the kernels of ``csrc/cuda``. The flow step never synchronises with the
host, so it can be captured in a CUDA graph.

Registers itself on import and never fails the import: its ``why_not`` says why it cannot run
(torch without CUDA, no GPU visible, extension built without CUDA, device, dtype).
"""
from __future__ import annotations

import torch

from .. import _extension
from . import register
from .compiled import IMPLEMENTATIONS

__all__ = ["machine_reasons"]


def machine_reasons() -> list[str]:
    """Empty when torch has CUDA, a GPU is visible and the extension was built with CUDA."""
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


for implementation in IMPLEMENTATIONS:
    register(implementation("cuda", machine_reasons))
