"""The ``cpu`` backend: the fused sparse flow step in C++ (``csrc/cpu/flow_step.cpp``).

The ops ``torch.ops.sta.{potential,hamiltonian,mlp}_{fwd,bwd}`` are defined in C++ (schemas in
csrc/README.md). This module gives them what the torch op library needs from Python -- fake
(meta) kernels for ``torch.compile`` and the autograd formula (forward op -> backward op) -- and
a thin :class:`CpuBackend` with the term methods of :mod:`sta.reference`. The CUDA backend
registers kernels for the same ops and reuses the fakes and autograd registered here
(:func:`register_python_side` runs once, when :func:`sta._extension.load` succeeds).

Per-step matrices that only some outputs need are formed here from the parameters, so autograd
carries their gradients back to the parameters: the curl matrix ``C = G - N o N^T`` of the
hamiltonian fields (:func:`sta.reference.hamiltonian_curl_matrices`) and the divergence matrix
``P = W2 o W1^T`` of the mlp fields. The curl of an mlp field is a diagnostic (docs/maths.md 1.3): it is
computed by the reference (:func:`sta.reference.mlp_terms`, torch autograd) on the active rows.
"""
from __future__ import annotations

import threading

import torch
from torch import Tensor

from . import _extension, reference
from .backends import Backend, StepRequest, register
from .reference import FieldTerms

__all__ = ["CpuBackend", "register_python_side", "OPS"]

#: The flow-step ops this module registers fakes and autograd for.
OPS = ("potential_fwd", "potential_bwd", "hamiltonian_fwd", "hamiltonian_bwd", "mlp_fwd", "mlp_bwd")

_registered = False
_lock = threading.Lock()


# ----------------------------------------------------------------------------------------------
# Fake kernels: output shapes only (all outputs are fresh, contiguous, of z's dtype).
# ----------------------------------------------------------------------------------------------

def _fake_potential_fwd(z, g, W, c, a, de):
    B, D = z.shape
    K = g.shape[1]
    return z.new_empty(B, D), z.new_empty(B), z.new_empty(B, K), z.new_empty(B, K)


def _fake_potential_bwd(grad_velocity, grad_div, grad_hj, grad_u, z, g, W, c, a, de):
    return (z.new_empty(z.shape), z.new_empty(g.shape), z.new_empty(W.shape), z.new_empty(c.shape),
            z.new_empty(a.shape), z.new_empty(de.shape))


def _fake_hamiltonian_fwd(z, g, W, c, a, M, C):
    return z.new_empty(z.shape), z.new_empty(g.shape)


def _fake_hamiltonian_bwd(grad_velocity, grad_curl, z, g, W, c, a, M, C):
    return (z.new_empty(z.shape), z.new_empty(g.shape), z.new_empty(W.shape), z.new_empty(c.shape),
            z.new_empty(a.shape), z.new_empty(M.shape), z.new_empty(C.shape) if C is not None else z.new_empty(0))


def _fake_mlp_fwd(z, g, W1, c1, W2, b2, P):
    return z.new_empty(z.shape), z.new_empty(z.shape[0]), z.new_empty(g.shape)


def _fake_mlp_bwd(grad_velocity, grad_div, grad_div_rot, z, g, W1, c1, W2, b2, P):
    return (z.new_empty(z.shape), z.new_empty(g.shape), z.new_empty(W1.shape), z.new_empty(c1.shape),
            z.new_empty(W2.shape), z.new_empty(b2.shape), z.new_empty(P.shape) if P is not None else z.new_empty(0))


# ----------------------------------------------------------------------------------------------
# Autograd: the backward of each *_fwd op is its *_bwd op. Gradients of outputs that were not
# used arrive as None (set_materialize_grads(False)), so the op skips those branches.
# ----------------------------------------------------------------------------------------------

def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs)


def _grad_or_none(x, needed: bool):
    return x if needed else None


def _potential_backward(ctx, grad_velocity, grad_div, grad_hj, grad_u):
    z, g, W, c, a, de = ctx.saved_tensors
    grads = torch.ops.sta.potential_bwd(grad_velocity, grad_div, grad_hj, grad_u, z, g, W, c, a, de)
    return tuple(_grad_or_none(x, n) for x, n in zip(grads, ctx.needs_input_grad))


def _hamiltonian_backward(ctx, grad_velocity, grad_curl):
    z, g, W, c, a, M, C = ctx.saved_tensors
    grads = torch.ops.sta.hamiltonian_bwd(grad_velocity, grad_curl, z, g, W, c, a, M, C)
    return tuple(_grad_or_none(x, n) for x, n in zip(grads[:6], ctx.needs_input_grad[:6])) + (
        grads[6] if C is not None and ctx.needs_input_grad[6] else None,)


def _mlp_backward(ctx, grad_velocity, grad_div, grad_div_rot):
    z, g, W1, c1, W2, b2, P = ctx.saved_tensors
    grads = torch.ops.sta.mlp_bwd(grad_velocity, grad_div, grad_div_rot, z, g, W1, c1, W2, b2, P)
    return tuple(_grad_or_none(x, n) for x, n in zip(grads[:6], ctx.needs_input_grad[:6])) + (
        grads[6] if P is not None and ctx.needs_input_grad[6] else None,)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "the backward ops of the cpu/cuda flow step are not differentiable (no double backward); "
        "use backend='torch' for higher-order derivatives")


def _setup_bwd(ctx, inputs, output):
    pass


def register_python_side() -> None:
    """Register the fakes and autograd of the flow-step ops (idempotent; needs the ops loaded)."""
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        fakes = {"potential_fwd": _fake_potential_fwd, "potential_bwd": _fake_potential_bwd,
                 "hamiltonian_fwd": _fake_hamiltonian_fwd, "hamiltonian_bwd": _fake_hamiltonian_bwd,
                 "mlp_fwd": _fake_mlp_fwd, "mlp_bwd": _fake_mlp_bwd}
        for name, fake in fakes.items():
            torch.library.register_fake(f"sta::{name}", fake)
        torch.library.register_autograd("sta::potential_fwd", _potential_backward, setup_context=_setup)
        torch.library.register_autograd("sta::hamiltonian_fwd", _hamiltonian_backward, setup_context=_setup)
        torch.library.register_autograd("sta::mlp_fwd", _mlp_backward, setup_context=_setup)
        for name in ("potential_bwd", "hamiltonian_bwd", "mlp_bwd"):  # a clear error on double backward
            torch.library.register_autograd(f"sta::{name}", _no_double_backward, setup_context=_setup_bwd)
        _registered = True


# ----------------------------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------------------------

def _pair_zeros(z: Tensor, K: int, want, names) -> dict:
    """Zero (B, K) outputs for requested per-pair names this field kind does not produce."""
    return {name: z.new_zeros(z.shape[0], K) for name in names if name in want}


class CpuBackend(Backend):
    """Sparse fused flow step in C++ on CPU tensors (float32, float64): ``torch.ops.sta.*``.

    Exactly the semantics of :func:`sta.reference.potential_terms`, :func:`~sta.reference.hamiltonian_terms`
    and :func:`~sta.reference.mlp_terms`, differentiable in every input.
    """

    name = "cpu"
    dtypes = frozenset({torch.float32, torch.float64})

    def unavailable(self) -> list[str]:
        """Empty once the extension is loaded; the first call may compile it (once per machine)."""
        if _extension.load() is None:
            return [f"C++ extension not available: {_extension.error()}"]
        return []

    def why_not(self, request: StepRequest) -> list[str]:
        reasons = []
        if request.device.type != "cpu":
            reasons.append(f"device {request.device}: the cpu backend takes CPU tensors only")
        if request.dtype not in self.dtypes:
            reasons.append(f"dtype {str(request.dtype).replace('torch.', '')} not supported (supports float32, float64)")
        if not reasons:  # only compile/load the extension for a request it could run
            reasons.extend(self.unavailable())
        return reasons

    def potential_terms(self, z, g, p, want=("div",)):
        velocity, div, hj, u = torch.ops.sta.potential_fwd(z, g, p.W, p.c, p.a, p.de)
        K = g.shape[1]
        extra = _pair_zeros(z, K, want, ("div_rot", "curl"))  # a potential field has no curl
        return FieldTerms(velocity=velocity, div=div if "div" in want else None,
                          hj=hj if "hj" in want else None, u=u if "u" in want else None, **extra)

    def hamiltonian_terms(self, z, g, p, want=("div",)):
        B, K = g.shape
        C = None
        if "curl" in want:
            G, N = reference.hamiltonian_curl_matrices(p)
            C = G - N * N.transpose(1, 2)  # curl = d^T C d (docs/maths.md 1.3)
        velocity, curl = torch.ops.sta.hamiltonian_fwd(z, g, p.W, p.c, p.a, p.M, C)
        extra = _pair_zeros(z, K, want, ("hj", "u", "div_rot"))  # div r = 0 exactly
        return FieldTerms(velocity=velocity, div=z.new_zeros(B) if "div" in want else None,
                          curl=curl if "curl" in want else None, **extra)

    def mlp_terms(self, z, g, p, want=("div",)):
        K = g.shape[1]
        need_div = "div" in want or "div_rot" in want
        P = p.W2 * p.W1.transpose(1, 2) if need_div else None  # (K, D, H): div = ds2 . (P ds1)
        velocity, div, div_rot = torch.ops.sta.mlp_fwd(z, g, p.W1, p.c1, p.W2, p.b2, P)
        curl = reference.mlp_terms(z, g, p, ("curl",)).curl if "curl" in want else None  # diagnostic
        extra = _pair_zeros(z, K, want, ("hj", "u"))
        return FieldTerms(velocity=velocity, div=div if "div" in want else None,
                          div_rot=div_rot if "div_rot" in want else None, curl=curl, **extra)


register(CpuBackend())
