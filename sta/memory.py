"""Reusing freed memory on the CPU: :func:`reuse_freed_memory`.

PyTorch's CPU tensors come from the C library's ``malloc``. With glibc (Linux), a block larger than
the mmap threshold (at most 32 MB) is mapped fresh from the kernel at every allocation and unmapped
when freed, so each large tensor pays a page fault per 4 KB page the first time it is written: a
64 MB tensor costs ~45 ms before any arithmetic (AMD EPYC, one thread). At large latent sizes
every step allocates such tensors (the per-field weight gradients ``(K, H, D)``, the mlp fields'
divergence matrix ``(K, D, H)``, the per-pair rows saved for the backward), and the faults are a
large part of the time:

================================================  ==========  ===========
one thread, AMD EPYC (the measurements of         default     freed memory
docs/performance.md)                              malloc      reused
================================================  ==========  ===========
training iteration, D 1024, K 32, batch 32        9.39 s      7.39 s
flow_step forward+backward, S3 (D = H = 1024)     803 ms      370 ms
================================================  ==========  ===========

Telling glibc never to map blocks of their own (``mallopt(M_MMAP_MAX, 0)``) and not to return freed
memory to the kernel (``M_TRIM_THRESHOLD``) lets every later allocation reuse pages that are
already mapped. The price is that the process keeps its peak memory mapped until it exits (the
resident size stays at the peak; S3 above: 1.47 GB against 1.03 GB). ``sta train`` does this by
default for CPU training (``--no-reuse-memory`` turns it off); a library user can call
:func:`reuse_freed_memory` at the start of a training script, or set the environment variables
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824`` before Python starts (the same effect), or
preload jemalloc / tcmalloc, the usual advice for PyTorch on the CPU. Results do not change:
only where the memory comes from does.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["reuse_freed_memory"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: freed memory above this much at the top of the heap would be returned to the kernel
_TRIM_THRESHOLD = 1 << 30


def reuse_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory mapped for reuse (see the module docstring).

    Affects the whole process from this call on. Returns True when applied, False where it does
    not apply (not Linux, or a C library without glibc's ``mallopt``, e.g. musl); never raises.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # both or neither: mallopt returns 1 on success
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
