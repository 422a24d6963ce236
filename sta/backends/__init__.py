"""The backend registry of every op: which implementations exist, and why one cannot take a request.

An *op* (``flow_step``, ``grid_transport``, ...) is defined once, in its own module
(:mod:`sta.ops`, :mod:`sta.grid.transport`): signature, validation, the torch reference, a call to
:func:`define_op` naming the methods an implementation provides, and the registration of the
reference as the op's ``torch`` implementation. The other backends live in :data:`PLUGIN_MODULES`
(``cpu``, ``triton``, ``cuda``: modules of this package); each registers its implementation of
every op it provides when imported. All of them register through :func:`register`, one
:class:`Backend` object per (op, backend name).

A plugin that is missing or fails to import, or does not implement an op, leaves a placeholder whose
``why_not`` gives the reason, so ``import sta`` never fails because an extension is missing, and
``python -m sta.info`` lists every op x backend with its reasons.

Selection (:func:`select`), one rule for every op: a named backend runs the request or raises
:class:`BackendUnavailableError` listing its reasons; ``"auto"`` (the default, overridden by the
environment variable ``STA_BACKEND``) takes the first backend of :data:`AUTO_ORDER` that can run
the request, silently.
"""
from __future__ import annotations

import importlib
import os
import threading
from typing import NamedTuple, Optional

import torch

__all__ = [
    "Request",
    "Backend",
    "BackendUnavailableError",
    "define_op",
    "op_names",
    "register",
    "get_backend",
    "all_backends",
    "check_backend_name",
    "requested_backend",
    "select",
    "AUTO_ORDER",
    "PLUGIN_MODULES",
    "BACKEND_NAMES",
    "dtype_name",
]

#: Fastest first: what ``auto`` tries, in order. A backend refuses a device it does not take, so
#: on a GPU this is cuda, triton, torch and on the CPU cpu, torch (the interpreter: see triton.py).
AUTO_ORDER = ("cuda", "triton", "cpu", "torch")
BACKEND_NAMES = ("torch", "cpu", "triton", "cuda")
#: Module that registers each non-reference backend's implementations when imported.
PLUGIN_MODULES = {
    "cpu": "sta.backends.cpu",
    "triton": "sta.backends.triton",
    "cuda": "sta.backends.cuda",
}


class Request(NamedTuple):
    """What an op asks of a backend, without the data: enough to decide whether it can run.

    op: the op's name (:func:`op_names`); device, dtype: of its main input (``z``, ``rho``);
    requires_grad: a backward through the op will follow.
    """

    op: str
    device: torch.device
    dtype: torch.dtype
    requires_grad: bool = False


class BackendUnavailableError(RuntimeError):
    """A backend that was asked for by name cannot run the request; the message lists why."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``: how messages name a dtype."""
    return str(dtype).replace("torch.", "")


class Backend:
    """One backend's implementation of one op.

    Subclasses set ``op``, ``name``, what they take (``device_type``, ``dtypes``,
    ``differentiable``), override :meth:`unavailable` with what they need from the machine, and
    define the op's methods (:func:`define_op`). :meth:`why_not` turns these into reasons.
    """

    op = "base"
    name = "base"
    #: the device type it takes (None: any device)
    device_type: Optional[str] = None
    dtypes = frozenset({torch.float32, torch.float64})
    #: whether a backward through it works (a forward-only kernel refuses requires_grad requests)
    differentiable = True

    def unavailable(self) -> list[str]:
        """Reasons this backend cannot run at all on this machine (empty when it can)."""
        return []

    def why_not(self, request: Request) -> list[str]:
        """Reasons this backend cannot run ``request`` (empty when it can)."""
        reasons = []
        if self.device_type is not None and request.device.type != self.device_type:
            reasons.append(f"device {request.device}: the {self.name} backend takes "
                           f"{self.device_type.upper()} tensors only")
        if request.dtype not in self.dtypes:
            names = ", ".join(sorted(dtype_name(d) for d in self.dtypes))
            reasons.append(f"dtype {dtype_name(request.dtype)} not supported (supports {names})")
        if request.requires_grad and not self.differentiable:
            reasons.append(f"not differentiable (the torch backend is): {self.op} on {self.name} is forward only")
        if not reasons:  # load (maybe compile) an extension only for a request it could otherwise run
            reasons = list(self.unavailable())
        return reasons

    def why_not_auto(self, request: Request) -> list[str]:
        """Reasons ``auto`` skips this backend: ``why_not`` plus modes that run only when named
        (e.g. the Triton interpreter on CPU, a test mode)."""
        return self.why_not(request)

    def __repr__(self) -> str:
        return f"<sta backend {self.name!r} of {self.op}>"


class _Missing(Backend):
    """Placeholder for an (op, backend) with no implementation on this machine."""

    def __init__(self, op: str, name: str, reason: str):
        self.op, self.name, self._reason = op, name, reason

    def unavailable(self) -> list[str]:
        return [self._reason]

    def why_not(self, request: Request) -> list[str]:
        return [self._reason]


class _OpDef(NamedTuple):
    methods: tuple          # what every implementation defines
    runs_on: Optional[str]  # another op whose implementations run this one (no registrations of its own)


#: op name -> its definition, in the order of definition
_OPS: dict[str, _OpDef] = {}
_REGISTRY: dict[tuple[str, str], Backend] = {}
#: plugin name -> why its module could not be imported
_PLUGIN_ERRORS: dict[str, str] = {}
_plugins_loaded = False
_lock = threading.Lock()


def define_op(op: str, methods: tuple = (), runs_on: Optional[str] = None) -> None:
    """Declare an op: the ``methods`` every implementation defines, or ``runs_on`` another op whose
    implementations run it (flow_path chains flow_step's)."""
    _OPS[op] = _OpDef(tuple(methods), runs_on)


def op_names() -> list[str]:
    """Every defined op, in the order of definition."""
    return list(_OPS)


def register(impl: Backend) -> None:
    """Add (or replace) the implementation of ``impl.op`` by backend ``impl.name``."""
    if impl.op not in _OPS or _OPS[impl.op].runs_on:
        raise ValueError(f"impl: op {impl.op!r} is not an op with implementations (define_op); "
                         f"defined: {tuple(_OPS)}")
    if impl.name not in BACKEND_NAMES:
        raise ValueError(f"impl: backend {impl.name!r} is not one of {BACKEND_NAMES}")
    missing = [m for m in _OPS[impl.op].methods if not callable(getattr(impl, m, None))]
    if missing:
        raise TypeError(f"impl: {type(impl).__name__} implements {impl.op} but lacks {missing}")
    _REGISTRY[(impl.op, impl.name)] = impl


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    with _lock:
        if _plugins_loaded:
            return
        for name, module in PLUGIN_MODULES.items():
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as err:
                _PLUGIN_ERRORS[name] = "not implemented yet" if err.name == module else f"import failed: {err}"
            except Exception as err:  # an extension built for another torch, a broken triton, ...
                _PLUGIN_ERRORS[name] = f"import of {module} failed: {type(err).__name__}: {err}"
        _plugins_loaded = True


def get_backend(name: str, op: str = "flow_step") -> Backend:
    """The implementation of ``op`` by backend ``name`` (one of :data:`BACKEND_NAMES`); a
    placeholder saying why when there is none."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend: expected 'auto' or one of {BACKEND_NAMES}, got {name!r}")
    if op not in _OPS:
        raise ValueError(f"op: expected one of {tuple(_OPS)}, got {op!r}")
    op = _OPS[op].runs_on or op
    _load_plugins()
    impl = _REGISTRY.get((op, name))
    if impl is None:
        reason = _PLUGIN_ERRORS.get(name) or f"backend {name!r} does not implement {op}"
        impl = _Missing(op, name, reason)
    return impl


def all_backends(op: str = "flow_step") -> list[Backend]:
    """Every backend's implementation of ``op``, in :data:`BACKEND_NAMES` order (placeholders included)."""
    return [get_backend(name, op) for name in BACKEND_NAMES]


def check_backend_name(backend) -> str:
    """``backend`` if it is "auto" or one of :data:`BACKEND_NAMES`, else a ValueError naming it."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKEND_NAMES):
        raise ValueError(f"backend: expected 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
    return backend


def requested_backend(backend: Optional[str]) -> str:
    """The backend name to use: the argument, or ``STA_BACKEND`` when the argument is "auto"."""
    if backend is None or backend == "auto":
        backend = os.environ.get("STA_BACKEND", "auto") or "auto"
    return check_backend_name(backend)


def select(request: Request, backend: Optional[str] = "auto") -> Backend:
    """The implementation that will run ``request``.

    A named backend is returned if it can run the request, else BackendUnavailableError lists its
    reasons. "auto" returns the first of AUTO_ORDER that can (the torch reference always can).
    """
    name = requested_backend(backend)
    if name != "auto":
        chosen = get_backend(name, request.op)
        reasons = chosen.why_not(request)
        if reasons:
            raise BackendUnavailableError(
                f"backend {name!r} cannot run {request.op}: " + "; ".join(reasons)
                + ". Use backend='auto' to fall back, or see `python -m sta.info`.")
        return chosen
    for candidate in AUTO_ORDER:
        chosen = get_backend(candidate, request.op)
        if not chosen.why_not_auto(request):
            return chosen
    raise BackendUnavailableError(f"no backend can run {request.op}: " + "; ".join(
        f"{b.name}: {', '.join(b.why_not(request))}" for b in all_backends(request.op)))
