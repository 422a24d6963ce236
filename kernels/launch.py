"""One launch point for every Triton kernel of ``sta.kernels``.

The launchers of :mod:`sta.kernels.flow_step` and :mod:`sta.kernels.grid_transport` call
:func:`launch` instead of ``kernel[grid](...)``, so that two tools see exactly the arguments the
launchers pass, without a GPU and without a second, hand-written copy of the argument lists:

* :func:`recording` collects the launches instead of running them; :mod:`sta.kernels.aot`
  builds ahead-of-time compile signatures from them (tests/test_triton_aot.py).
* :func:`forced_config` runs an autotuned kernel with one given ``triton.Config`` (bypassing the
  autotuner), so that the interpreter parity tests can run every kept tile configuration.
"""
from __future__ import annotations

import contextlib
from typing import Any, NamedTuple, Optional

import triton

__all__ = ["Launch", "launch", "recording", "forced_config"]


class Launch(NamedTuple):
    """One kernel launch as the launcher made it: ``kernel`` (JITFunction or Autotuner), grid,
    positional runtime arguments and constexpr keyword arguments (tile sizes of an autotuned
    kernel excluded: the autotuner adds them)."""

    kernel: Any
    grid: tuple
    args: tuple
    meta: dict


_recorder: Optional[list] = None
_forced: Optional[triton.Config] = None


def launch(kernel, grid, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``, or record the launch when :func:`recording` is active."""
    if _recorder is not None:
        _recorder.append(Launch(kernel, tuple(grid), args, meta))
        return
    if _forced is not None and isinstance(kernel, triton.runtime.Autotuner):
        cfg = _forced
        if cfg.pre_hook is not None:  # pragma: no cover - no config of sta carries a pre-hook
            cfg.pre_hook({**dict(zip(kernel.arg_names, args)), **meta, **cfg.kwargs})
        # the autotuner would zero these before every run (atomically accumulated outputs);
        # the launchers allocate them zeroed, so a single forced run needs nothing more
        kernel.fn[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return
    kernel[grid](*args, **meta)


@contextlib.contextmanager
def recording():
    """Collect the launches made inside the block (nothing runs); yields the list of :class:`Launch`."""
    global _recorder
    previous, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = previous


@contextlib.contextmanager
def forced_config(config: triton.Config):
    """Run every autotuned kernel launched inside the block with ``config`` (tests only)."""
    global _forced
    previous, _forced = _forced, config
    try:
        yield
    finally:
        _forced = previous
