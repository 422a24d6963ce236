"""The ``cpu`` backend: the compiled ops of ``sta._C`` on CPU tensors (csrc/cpu), for every op.

Registers itself on import and never fails the import: its ``why_not`` says why it cannot run
(device, dtype, extension not built). The implementations are :mod:`sta.backends.compiled`.
"""
from __future__ import annotations

from .. import _extension
from . import register
from .compiled import IMPLEMENTATIONS

__all__ = ["machine_reasons", "memory_stats", "set_cache_limit", "empty_cache"]


def machine_reasons() -> list[str]:
    """Empty once the extension is loaded; the first call may compile it (once per machine)."""
    if _extension.load() is None:
        return [f"C++ extension not available: {_extension.error()}"]
    return []


for implementation in IMPLEMENTATIONS:
    register(implementation("cpu", machine_reasons))


# ----------------------------------------------------------------------------------------------
# The buffer pool of the compiled CPU ops (csrc/buffer_pool.h)
# ----------------------------------------------------------------------------------------------

def _pool_ops():
    if _extension.load() is None:
        raise RuntimeError(f"sta's C++ extension is not available, so there is no CPU buffer pool: "
                           f"{_extension.error()}")
    import torch
    return torch.ops.sta


def memory_stats() -> dict:
    """The CPU buffer pool of the ``cpu`` backend's ops, in bytes: ``cached`` (free blocks it holds
    for the next call), ``in_use`` (blocks inside live tensors) and ``limit`` (the most it holds
    free). The ops take their buffers of 1 MiB and more from it, so that a block is faulted in from
    the kernel once, not at every call (S3 of benchmarks/bench_flow_step.py, forward + backward:
    410-532 ms against 683-773 ms with fresh memory, one thread, AMD EPYC; docs/ops.md)."""
    cached, in_use, limit = _pool_ops().cpu_pool_stats()
    return {"cached": int(cached), "in_use": int(in_use), "limit": int(limit)}


def set_cache_limit(limit_bytes: int) -> None:
    """Hold at most ``limit_bytes`` of free blocks (default 1 GiB, or ``STA_CPU_POOL_MB`` MiB read at
    the first allocation); the excess goes back to the system at once; 0 turns the pool off."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes < 0:
        raise ValueError(f"limit_bytes must be an int >= 0, got {limit_bytes!r}")
    _pool_ops().cpu_pool_set_limit(limit_bytes)


def empty_cache() -> int:
    """Return every free block of the pool to the system (like ``torch.cuda.empty_cache``); the bytes
    returned. Tensors still alive keep theirs."""
    return int(_pool_ops().cpu_pool_release())
