"""Loading the compiled ops of ``sta._C`` (C++ CPU and, when built, CUDA), never failing ``import sta``.

:func:`load` returns the loaded extension module (its ops are then registered as
``torch.ops.sta.*``) or None; :func:`error` says why it is None. Order:

1. ``sta._C``, built ahead of time by ``pip install`` (``sta/_build.py``). It must have been compiled
   against the running torch: a stale build is refused with the rebuild command.
2. Otherwise the same sources are compiled just in time with ``torch.utils.cpp_extension.load``
   (ninja) into ``$STA_CACHE_DIR`` or ``~/.cache/sta/torch-<version>`` -- once; later processes
   reuse the cached library. ``STA_JIT=0`` disables this step.

``python -m sta._extension`` builds (if needed) and prints the status.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import threading
import time
import warnings
from types import ModuleType
from typing import Callable, Optional

import torch

from . import _build

__all__ = ["load", "on_load", "error", "status", "REBUILD_COMMAND", "cache_dir"]

_log = logging.getLogger("sta")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: What to run to (re)build the extension ahead of time, from the sta checkout.
REBUILD_COMMAND = "STA_BUILD_EXT=1 pip install --no-build-isolation -e .  (or: python -m sta._extension)"

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_error: Optional[str] = None
_tried = False
_how = ""
#: what to run once the ops are loaded (:func:`on_load`)
_on_load: list[Callable[[], None]] = []


def _torch_version() -> str:
    return torch.__version__.split("+")[0]


def cache_dir() -> str:
    """Where the just-in-time build goes: ``$STA_CACHE_DIR`` or ``~/.cache/sta/torch-<version>[-cuda]``."""
    base = os.environ.get("STA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "sta")
    tag = f"torch-{torch.__version__}".replace("+", "-")
    return os.path.join(base, tag)


def _check_version(module: ModuleType, origin: str) -> Optional[str]:
    built = getattr(module, "TORCH_VERSION", None)
    if built != _torch_version():
        return (f"{origin} was built for torch {built} but torch {torch.__version__} is running; "
                f"rebuild it: {REBUILD_COMMAND}")
    return None


def _load_aot() -> tuple[Optional[ModuleType], Optional[str], bool]:
    """(module, error, absent): the ahead-of-time ``sta._C``."""
    try:
        module = importlib.import_module("sta._C")
    except ModuleNotFoundError as err:
        if err.name == "sta._C":
            return None, None, True
        return None, f"import sta._C failed ({err}); rebuild it: {REBUILD_COMMAND}", False
    except Exception as err:  # built against another torch: undefined symbols, ...
        return None, f"import sta._C failed ({type(err).__name__}: {err}); rebuild it: {REBUILD_COMMAND}", False
    problem = _check_version(module, "sta._C")
    return (None, problem, False) if problem else (module, None, False)


def _load_jit() -> tuple[Optional[ModuleType], Optional[str]]:
    if os.environ.get("STA_JIT", "1") == "0":
        return None, f"sta._C is not built and STA_JIT=0; build it: {REBUILD_COMMAND}"
    cuda = False
    try:
        cuda = _build.want_cuda()
    except Exception as err:
        return None, f"STA_BUILD_CUDA: {err}"
    sources = _build.sources_of(REPO_ROOT, cuda)
    if not sources:
        return None, f"sta._C is not built and its sources (csrc/) are not in {REPO_ROOT}; reinstall sta from a checkout"
    if not _build.have_cxx():
        return None, f"sta._C is not built and no C++ compiler (c++/g++ or $CXX) was found; install one and run: {REBUILD_COMMAND}"
    from torch.utils import cpp_extension

    build_dir = cache_dir() + ("-cuda" if cuda else "")
    os.makedirs(build_dir, exist_ok=True)
    name = "sta_C_cuda" if cuda else "sta_C"
    library = os.path.join(build_dir, name + ".so")
    fresh = not os.path.exists(library) or any(os.path.getmtime(s) > os.path.getmtime(library) for s in sources)
    if fresh:
        message = (f"sta: compiling the C++ extension for torch {torch.__version__} into {build_dir} "
                   f"(once; about a minute). To build it at install time instead: {REBUILD_COMMAND}")
        warnings.warn(message, stacklevel=3)
        _log.warning(message)
    start = time.time()
    try:
        module = cpp_extension.load(
            name=name, sources=sources, build_directory=build_dir,
            extra_cflags=_build.CXX_FLAGS + (["-DSTA_WITH_CUDA"] if cuda else []),
            extra_cuda_cflags=_build.nvcc_flags() if cuda else None,
            extra_ldflags=_build.LINK_FLAGS, extra_include_paths=[_build.csrc_dir(REPO_ROOT)],
            is_python_module=True, verbose=os.environ.get("STA_VERBOSE_BUILD") == "1",
        )
    except Exception as err:
        text = str(err).strip().splitlines()
        tail = " | ".join(text[-6:]) if text else type(err).__name__
        return None, (f"compiling sta._C failed ({tail}); see the log with STA_VERBOSE_BUILD=1, then rebuild: "
                      f"{REBUILD_COMMAND}")
    if fresh:
        _log.warning("sta: compiled the C++ extension in %.0f s", time.time() - start)
    problem = _check_version(module, f"the cached build in {build_dir}")
    return (None, problem) if problem else (module, None)


def load() -> Optional[ModuleType]:
    """The loaded extension module (ops registered in ``torch.ops.sta``), or None (see :func:`error`).

    The first call may compile the extension (once per torch version and machine); the result,
    success or failure, is cached for the process.
    """
    if not _tried:
        _load_once()
    return _module


# Run eagerly even while dynamo traces a caller (torch.compile(fullgraph=True) around the first
# flow_step of a process): dynamo cannot trace the lock or the compiler, and the outcome is fixed.
@torch._dynamo.assume_constant_result
def _load_once() -> bool:
    global _module, _error, _tried, _how
    with _lock:
        if _tried:
            return True
        module, problem, absent = _load_aot()
        how = "ahead-of-time build (sta._C)"
        if absent:
            module, problem = _load_jit()
            how = f"just-in-time build in {cache_dir()}"
        if module is not None:
            try:
                for callback in _on_load:
                    callback()
            except Exception as err:
                module, problem = None, f"registering the Python side of the ops failed: {type(err).__name__}: {err}"
        _module, _error, _how, _tried = module, problem, how, True
    return True


def on_load(callback: Callable[[], None]) -> None:
    """Run ``callback()`` right after the extension's ops are loaded (now, if they already are).

    The backends register the ops' fake kernels and autograd formulas this way
    (:mod:`sta.backends.compiled`), so this loader imports none of them. If a callback raises
    during the load, the extension counts as not loaded, with that error.
    """
    _on_load.append(callback)
    if _module is not None:
        callback()


def is_built() -> bool:
    """Whether the extension can be loaded without compiling (AOT module or an up-to-date JIT cache)."""
    if _tried:
        return _module is not None
    if importlib.util.find_spec("sta._C") is not None:
        return True
    library = os.path.join(cache_dir(), "sta_C.so")
    return os.path.exists(library)


def error() -> Optional[str]:
    """Why :func:`load` returned None (None when it loaded or was not tried yet)."""
    return _error


def status() -> str:
    """One line for ``python -m sta.info``."""
    if not _tried:
        return "not loaded yet" + (" (built)" if is_built() else " (not built: compiles on first use)")
    if _module is not None:
        if getattr(_module, "WITH_CUDA", 0):
            cuda = " with CUDA"
        else:
            cuda = f", CPU kernels only ({_build.why_no_cuda() or 'built without CUDA: rebuild'})"
        return f"loaded{cuda}: {_how}, torch {getattr(_module, 'TORCH_VERSION', '?')}"
    return f"unavailable: {_error}"


def main() -> None:
    start = time.time()
    module = load()
    print(f"sta extension: {status()} ({time.time() - start:.1f} s)")
    sys.exit(0 if module is not None else 1)


if __name__ == "__main__":
    main()
