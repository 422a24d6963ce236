"""The ``cpu`` backend: the compiled ops of ``sta._C`` on CPU tensors (csrc/cpu), for every op.

Registers itself on import and never fails the import: its ``why_not`` says why it cannot run
(device, dtype, extension not built). The implementations are :mod:`sta.backends.compiled`.
"""
from __future__ import annotations

from .. import _extension
from . import register
from .compiled import IMPLEMENTATIONS

__all__ = ["machine_reasons"]


def machine_reasons() -> list[str]:
    """Empty once the extension is loaded; the first call may compile it (once per machine)."""
    if _extension.load() is None:
        return [f"C++ extension not available: {_extension.error()}"]
    return []


for implementation in IMPLEMENTATIONS:
    register(implementation("cpu", machine_reasons))
