"""The compiled ops ``torch.ops.sta.*`` (``sta._C``: C++ on CPU, CUDA where built) and the
implementations over them, shared by the ``cpu`` and ``cuda`` backends (:mod:`sta.backends.cpu`,
:mod:`sta.backends.cuda`), which differ only in the device they take and what they need from the
machine. The op library dispatches on the tensors' device.

The ops are defined in C++ (schemas in csrc/README.md). This module gives them what the torch op
library needs from Python once the extension is loaded (:func:`sta._extension.on_load`): fake
(meta) kernels for ``torch.compile`` and ``opcheck``, and the autograd formula of each flow-step
op (forward op -> backward op). ``sta::grid_transport`` is forward only.

Per-step matrices that only some outputs need are formed here from the parameters, so autograd
carries their gradients back to the parameters: the curl matrix ``C = G - N o N^T`` of the
hamiltonian fields (:func:`sta.reference.hamiltonian_curl_matrices`) and the divergence matrix
``Pdiv = W2 o W1^T`` of the mlp fields (names of docs/ops.md section 7). The curl of an mlp field
is a diagnostic (docs/maths.md 1.3): it is computed by the reference (:func:`sta.reference.mlp_terms`,
torch autograd) on the active rows.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .. import _extension, reference
from ..grid.transport import LIMITERS
from ..reference import FieldTerms
from . import Backend
from .library import register_torch_op

__all__ = ["CompiledFlowStep", "CompiledGridTransport", "IMPLEMENTATIONS"]


# ----------------------------------------------------------------------------------------------
# Fake kernels: output shapes only (all outputs are fresh, contiguous, of z's dtype).
# ----------------------------------------------------------------------------------------------

def _fake_saved_rows(save: bool, z, g, N):
    """The rows a forward saves for its backward: (B * K, N), or (0,) (csrc/flow_step_pipeline.h)."""
    return z.new_empty(z.shape[0] * g.shape[1], N) if save else z.new_empty(0)


def _fake_potential_fwd(z, g, W, c, a, de, save=False):
    B, D = z.shape
    K, H = W.shape[:2]
    return (z.new_empty(B, D), z.new_empty(B), z.new_empty(B, K), z.new_empty(B, K),
            _fake_saved_rows(save, z, g, H), _fake_saved_rows(save, z, g, D))


def _fake_potential_bwd(grad_velocity, grad_div, grad_hj, grad_u, z, g, W, c, a, de, s=None, v=None):
    return (z.new_empty(z.shape), z.new_empty(g.shape), z.new_empty(W.shape), z.new_empty(c.shape),
            z.new_empty(a.shape), z.new_empty(de.shape))


def _fake_hamiltonian_fwd(z, g, W, c, a, M, C, save=False):
    return z.new_empty(z.shape), z.new_empty(g.shape), _fake_saved_rows(save, z, g, W.shape[1])


def _fake_hamiltonian_bwd(grad_velocity, grad_curl, z, g, W, c, a, M, C, s=None):
    return (z.new_empty(z.shape), z.new_empty(g.shape), z.new_empty(W.shape), z.new_empty(c.shape),
            z.new_empty(a.shape), z.new_empty(M.shape), z.new_empty(C.shape) if C is not None else z.new_empty(0))


def _fake_mlp_fwd(z, g, W1, c1, W2, b2, Pdiv, save=False):
    D = z.shape[1]
    return (z.new_empty(z.shape), z.new_empty(z.shape[0]), z.new_empty(g.shape),
            _fake_saved_rows(save, z, g, W1.shape[1]), _fake_saved_rows(save, z, g, D),
            _fake_saved_rows(save and Pdiv is not None, z, g, D))


def _fake_mlp_bwd(grad_velocity, grad_div, grad_div_rot, z, g, W1, c1, W2, b2, Pdiv, s=None, r=None, e=None):
    return (z.new_empty(z.shape), z.new_empty(g.shape), z.new_empty(W1.shape), z.new_empty(c1.shape),
            z.new_empty(W2.shape), z.new_empty(b2.shape), z.new_empty(Pdiv.shape) if Pdiv is not None else z.new_empty(0))


def _fake_divergence_matrix(W1, W2):
    return W2.new_empty(W2.shape)


def _fake_divergence_matrix_bwd(grad, W1, W2):
    return W1.new_empty(W1.shape), W2.new_empty(W2.shape)


def _fake_grid_transport(rho, u0, u1, u2, c0, c1, c2, periodic, limiter):
    return torch.empty_like(rho, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------------------------
# Autograd: the backward of each *_fwd op is its *_bwd op. Gradients of outputs that were not
# used arrive as None (set_materialize_grads(False)), so the op skips those branches.
# The forwards called with save=True also return the per-pair rows that their backward would
# otherwise recompute with one (rows x D x H) product per field each (potential: s = tanh(h), v;
# hamiltonian: s; mlp: s, r = tanh(h2), e = Pdiv ds1); the backward takes them back (docs/ops.md,
# "Saved rows").
# ----------------------------------------------------------------------------------------------

def _setup_saving(num_saved: int):
    """The setup of a forward op whose last ``num_saved`` outputs are saved rows: it saves the
    tensor inputs (all but the trailing ``save`` flag) and those outputs."""
    def setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs[:-1], *output[-num_saved:])
    return setup


def _grad_or_none(x, needed: bool):
    return x if needed else None


def _potential_backward(ctx, grad_velocity, grad_div, grad_hj, grad_u, _grad_s=None, _grad_v=None):
    z, g, W, c, a, de, s, v = ctx.saved_tensors
    grads = torch.ops.sta.potential_bwd(grad_velocity, grad_div, grad_hj, grad_u, z, g, W, c, a, de, s, v)
    return tuple(_grad_or_none(x, n) for x, n in zip(grads, ctx.needs_input_grad)) + (None,)  # save: no grad


def _hamiltonian_backward(ctx, grad_velocity, grad_curl, _grad_s=None):
    z, g, W, c, a, M, C, s = ctx.saved_tensors
    grads = torch.ops.sta.hamiltonian_bwd(grad_velocity, grad_curl, z, g, W, c, a, M, C, s)
    return tuple(_grad_or_none(x, n) for x, n in zip(grads[:6], ctx.needs_input_grad[:6])) + (
        grads[6] if C is not None and ctx.needs_input_grad[6] else None, None)


def _mlp_backward(ctx, grad_velocity, grad_div, grad_div_rot, _grad_s=None, _grad_r=None, _grad_e=None):
    z, g, W1, c1, W2, b2, Pdiv, s, r, e = ctx.saved_tensors
    grads = torch.ops.sta.mlp_bwd(grad_velocity, grad_div, grad_div_rot, z, g, W1, c1, W2, b2, Pdiv, s, r, e)
    return tuple(_grad_or_none(x, n) for x, n in zip(grads[:6], ctx.needs_input_grad[:6])) + (
        grads[6] if Pdiv is not None and ctx.needs_input_grad[6] else None, None)


def _setup_divergence_matrix(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _divergence_matrix_backward(ctx, grad):
    W1, W2 = ctx.saved_tensors
    grad_W1, grad_W2 = torch.ops.sta.divergence_matrix_bwd(grad, W1, W2)
    return _grad_or_none(grad_W1, ctx.needs_input_grad[0]), _grad_or_none(grad_W2, ctx.needs_input_grad[1])


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "the backward ops of the cpu/cuda flow step are not differentiable (no double backward); "
        "use backend='torch' for higher-order derivatives")


def _setup_bwd(ctx, inputs, output):
    pass


#: op -> fake kernel; the forward ops' backward formulas
_FAKES = {"potential_fwd": _fake_potential_fwd, "potential_bwd": _fake_potential_bwd,
          "hamiltonian_fwd": _fake_hamiltonian_fwd, "hamiltonian_bwd": _fake_hamiltonian_bwd,
          "mlp_fwd": _fake_mlp_fwd, "mlp_bwd": _fake_mlp_bwd, "divergence_matrix": _fake_divergence_matrix,
          "divergence_matrix_bwd": _fake_divergence_matrix_bwd, "grid_transport": _fake_grid_transport}
_BACKWARDS = {"potential_fwd": _potential_backward, "hamiltonian_fwd": _hamiltonian_backward,
              "mlp_fwd": _mlp_backward, "divergence_matrix": _divergence_matrix_backward}
_SETUPS = {"potential_fwd": _setup_saving(2), "hamiltonian_fwd": _setup_saving(1),  # s, v / s
           "mlp_fwd": _setup_saving(3),                                                  # s, r, e
           "divergence_matrix": _setup_divergence_matrix}


def _register_library_side() -> None:
    """Fakes and autograd of the compiled ops; run once by the loader, right after it loads them."""
    for name, fake in _FAKES.items():
        if name in _BACKWARDS:
            register_torch_op(f"sta::{name}", fake, backward=_BACKWARDS[name], setup_context=_SETUPS[name])
        elif name.endswith("_bwd"):  # a clear error on double backward
            register_torch_op(f"sta::{name}", fake, backward=_no_double_backward, setup_context=_setup_bwd)
        else:
            register_torch_op(f"sta::{name}", fake)


_extension.on_load(_register_library_side)


# ----------------------------------------------------------------------------------------------
# The implementations
# ----------------------------------------------------------------------------------------------

class _Compiled(Backend):
    """An implementation over ``torch.ops.sta.*`` on one device type: ``machine_reasons()`` says
    what the machine lacks for it (the extension, CUDA, ...)."""

    dtypes = frozenset({torch.float32, torch.float64})

    def __init__(self, name: str, machine_reasons: Callable[[], list]):
        self.name = self.device_type = name
        self._machine_reasons = machine_reasons

    def unavailable(self) -> list[str]:
        return self._machine_reasons()


def _saving(*inputs) -> bool:
    """Whether a forward op should save its per-pair rows: a backward through it will follow.

    Saving trades memory, (B * K) x (H [+ D]) floats per call, for one (rows x D x H) product per
    field in the backward (two for the potential fields with the HJ residual): a training
    iteration at D = 512, K = 16, hidden 512 took 1.02 s instead of 1.16 s at batch 32 and 2.28 s
    instead of 2.63 s at batch 128 (one thread, AMD EPYC; docs/ops.md, "flow_path").
    """
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)


def _pair_zeros(z: Tensor, K: int, want, names) -> dict:
    """Zero (B, K) outputs for requested per-pair names this field kind does not produce."""
    return {name: z.new_zeros(z.shape[0], K) for name in names if name in want}


class CompiledFlowStep(_Compiled):
    """Sparse fused flow step (float32, float64): ``torch.ops.sta.{potential,hamiltonian,mlp}_fwd``.

    Exactly the semantics of :func:`sta.reference.potential_terms`, :func:`~sta.reference.hamiltonian_terms`
    and :func:`~sta.reference.mlp_terms`, differentiable in every input.
    """

    op = "flow_step"

    def potential_terms(self, z, g, p, want=("div",)):
        velocity, div, hj, u, _, _ = torch.ops.sta.potential_fwd(z, g, p.W, p.c, p.a, p.de,
                                                                 _saving(z, g, p.W, p.c, p.a, p.de))
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
        velocity, curl, _ = torch.ops.sta.hamiltonian_fwd(z, g, p.W, p.c, p.a, p.M, C,
                                                         _saving(z, g, p.W, p.c, p.a, p.M, C))
        extra = _pair_zeros(z, K, want, ("hj", "u", "div_rot"))  # div r = 0 exactly
        return FieldTerms(velocity=velocity, div=z.new_zeros(B) if "div" in want else None,
                          curl=curl if "curl" in want else None, **extra)

    def divergence_matrix(self, p) -> Tensor:
        """``Pdiv = W2 o W1^T: (K, D, H)`` of :func:`sta.reference.mlp_divergence_matrix` (``p.Pdiv``
        when prepared): on the CPU by ``sta::divergence_matrix``, which reads the transposed operand
        in tiles (K 16, D = H = 1024, one thread: forward 68 ms and backward 127 ms against ATen's
        103 and 250; csrc/cpu/divergence_matrix.cpp); elsewhere ATen's strided product."""
        if p.Pdiv is not None or p.W2.device.type != "cpu":
            return reference.mlp_divergence_matrix(p)
        return torch.ops.sta.divergence_matrix(p.W1, p.W2)

    def mlp_terms(self, z, g, p, want=("div",)):
        K = g.shape[1]
        need_div = "div" in want or "div_rot" in want
        Pdiv = self.divergence_matrix(p) if need_div else None  # (K, D, H): div = ds2 . (Pdiv ds1)
        velocity, div, div_rot, *_ = torch.ops.sta.mlp_fwd(z, g, p.W1, p.c1, p.W2, p.b2, Pdiv,
                                                           _saving(z, g, p.W1, p.c1, p.W2, p.b2, Pdiv))
        curl = reference.mlp_terms(z, g, p, ("curl",)).curl if "curl" in want else None  # diagnostic
        extra = _pair_zeros(z, K, want, ("hj", "u"))
        return FieldTerms(velocity=velocity, div=div if "div" in want else None,
                          div_rot=div_rot if "div_rot" in want else None, curl=curl, **extra)


class CompiledGridTransport(_Compiled):
    """One finite-volume step, ``torch.ops.sta.grid_transport`` (float32, float64; forward only)."""

    op = "grid_transport"
    differentiable = False

    def transport(self, rho, faces, coef, periodic, limiter):
        u3 = faces[2] if len(faces) == 3 else rho.new_empty(0)
        c3 = coef[2] if len(coef) == 3 else 0.0
        return torch.ops.sta.grid_transport(rho.contiguous(), faces[0], faces[1], u3, coef[0], coef[1], c3,
                                            periodic, LIMITERS[limiter])


#: What the cpu and cuda backends register, one instance each per device type.
IMPLEMENTATIONS = (CompiledFlowStep, CompiledGridTransport)
