"""Backend registry: which implementations of the fused ops exist, and why one cannot take an input.

A backend is an object with a ``name``, the ``dtypes`` it computes in, and three methods with the
signatures of :func:`sta.reference.potential_terms`, :func:`~sta.reference.hamiltonian_terms` and
:func:`~sta.reference.mlp_terms` (differentiable; the returned tensors carry autograd history).
``why_not(request)`` returns the reasons it cannot run a request (an empty list means it can).

Backends other than ``torch`` live in their own modules, listed in :data:`PLUGIN_MODULES`; each
such module calls :func:`register` when imported. A module that is missing or fails to import
leaves a placeholder backend whose ``why_not`` gives the import error, so ``import sta`` never
fails because an extension is missing.

Selection (:func:`select`): a named backend runs or raises :class:`BackendUnavailableError` listing
its reasons; ``"auto"`` (the default, overridden by the environment variable ``STA_BACKEND``)
takes the first backend of :data:`AUTO_ORDER` with no reasons, silently.
"""
from __future__ import annotations

import importlib
import os
import threading
from typing import NamedTuple, Optional

import torch

from . import reference

__all__ = [
    "StepRequest",
    "Backend",
    "TorchBackend",
    "BackendUnavailableError",
    "register",
    "get_backend",
    "all_backends",
    "select",
    "AUTO_ORDER",
    "PLUGIN_MODULES",
    "BACKEND_NAMES",
]

#: Fastest first: what ``auto`` tries, in order.
AUTO_ORDER = ("cuda", "triton", "cpu", "torch")
BACKEND_NAMES = ("torch", "cpu", "triton", "cuda")
#: Module that registers each non-reference backend when imported.
PLUGIN_MODULES = {
    "cpu": "sta.backend_cpu",
    "triton": "sta.kernels.backend",
    "cuda": "sta.backend_cuda",
}


class StepRequest(NamedTuple):
    """What a backend is asked to compute, without the data: enough to decide if it can.

    device, dtype: of z; B, D, H: sizes; Kp, Kr: numbers of fields; rotational: "hamiltonian" or
    "mlp"; outputs: the requested optional outputs; requires_grad: whether a backward will follow.
    """

    device: torch.device
    dtype: torch.dtype
    B: int
    D: int
    H: int
    Kp: int
    Kr: int
    rotational: str
    outputs: frozenset
    requires_grad: bool


class BackendUnavailableError(RuntimeError):
    """A backend that was asked for by name cannot run the request; the message lists why."""


class Backend:
    """Base class. Subclasses set ``name``, ``dtypes``, and override the three term methods."""

    name = "base"
    dtypes = frozenset({torch.float32, torch.float64})

    def unavailable(self) -> list[str]:
        """Reasons this backend cannot run at all on this machine (empty when it can)."""
        return []

    def why_not(self, request: StepRequest) -> list[str]:
        """Reasons this backend cannot run ``request`` (empty when it can)."""
        reasons = list(self.unavailable())
        if request.dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).replace("torch.", "") for d in self.dtypes))
            reasons.append(f"dtype {str(request.dtype).replace('torch.', '')} not supported (supports {names})")
        return reasons

    def why_not_auto(self, request: StepRequest) -> list[str]:
        """Reasons ``auto`` skips this backend: ``why_not`` plus modes that run only when named
        (e.g. the Triton interpreter on CPU, a test mode)."""
        return self.why_not(request)

    def potential_terms(self, z, g, params, want):
        raise NotImplementedError

    def hamiltonian_terms(self, z, g, params, want):
        raise NotImplementedError

    def mlp_terms(self, z, g, params, want):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<sta backend {self.name!r}>"


class TorchBackend(Backend):
    """The pure-PyTorch reference (:mod:`sta.reference`): any device, autograd for gradients."""

    name = "torch"
    dtypes = frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16})

    def potential_terms(self, z, g, params, want):
        return reference.potential_terms(z, g, params, want)

    def hamiltonian_terms(self, z, g, params, want):
        return reference.hamiltonian_terms(z, g, params, want)

    def mlp_terms(self, z, g, params, want):
        return reference.mlp_terms(z, g, params, want)


class _MissingBackend(Backend):
    """Placeholder for a plugin that is not implemented or failed to import."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self._reason = reason

    def unavailable(self) -> list[str]:
        return [self._reason]


_REGISTRY: dict[str, Backend] = {"torch": TorchBackend()}
_plugins_loaded = False
_lock = threading.Lock()


def register(backend: Backend) -> None:
    """Add (or replace) a backend under ``backend.name``."""
    _REGISTRY[backend.name] = backend


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    with _lock:
        if _plugins_loaded:
            return
        for name, module in PLUGIN_MODULES.items():
            if name in _REGISTRY:
                continue
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as err:
                reason = "not implemented yet" if err.name == module else f"import failed: {err}"
                register(_MissingBackend(name, reason))
            except Exception as err:  # an extension built for another torch, a broken triton, ...
                register(_MissingBackend(name, f"import of {module} failed: {type(err).__name__}: {err}"))
            if name not in _REGISTRY:
                register(_MissingBackend(name, f"{module} did not register a backend"))
        _plugins_loaded = True


def get_backend(name: str) -> Backend:
    """The backend registered under ``name`` (one of :data:`BACKEND_NAMES`)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend: expected 'auto' or one of {BACKEND_NAMES}, got {name!r}")
    _load_plugins()
    return _REGISTRY[name]


def all_backends() -> list[Backend]:
    """Every known backend, in :data:`BACKEND_NAMES` order (placeholders included)."""
    _load_plugins()
    return [_REGISTRY[name] for name in BACKEND_NAMES]


def requested_backend(backend: Optional[str]) -> str:
    """The backend name to use: the argument, or ``STA_BACKEND`` when the argument is "auto"."""
    if backend is None or backend == "auto":
        backend = os.environ.get("STA_BACKEND", "auto") or "auto"
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKEND_NAMES):
        raise ValueError(f"backend: expected 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
    return backend


def select(request: StepRequest, backend: Optional[str] = "auto") -> Backend:
    """The backend that will run ``request``.

    A named backend is returned if it can run the request, else BackendUnavailableError lists its
    reasons. "auto" returns the first of AUTO_ORDER that can (the torch reference always can).
    """
    name = requested_backend(backend)
    if name != "auto":
        chosen = get_backend(name)
        reasons = chosen.why_not(request)
        if reasons:
            raise BackendUnavailableError(
                f"backend {name!r} cannot run this flow_step: " + "; ".join(reasons)
                + ". Use backend='auto' to fall back, or see `python -m sta.info`."
            )
        return chosen
    _load_plugins()
    for candidate in AUTO_ORDER:
        chosen = _REGISTRY[candidate]
        if not chosen.why_not_auto(request):
            return chosen
    raise BackendUnavailableError("no backend can run this flow_step: " + "; ".join(
        f"{b.name}: {', '.join(b.why_not(request))}" for b in all_backends()))
