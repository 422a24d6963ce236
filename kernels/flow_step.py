"""The Triton flow step (docs/maths.md section 2): launchers, the registered torch ops, forward and backward.

Mixture-of-experts layout. The active (sample, field) pairs -- ``g[b, k] != 0`` -- are sorted by
field and each field's list of sample indices is padded to a multiple of ``BLOCK_M`` with -1
(:func:`sta.kernels.routing.route`): the index lists are padded, never the data. A program owns
one block of ``BLOCK_M`` rows of one field; it gathers its rows of ``z`` by index, runs the grouped
matrix products with ``tl.dot`` (fp32 accumulation; operand precision from :func:`precision_for`)
and applies the field's epilogue in registers. Per-row intermediates live in padded buffers of
shape ``(Npad, H)`` or ``(Npad, D)``, ``Npad = BLOCK_M * num_blocks <= B*K + K*BLOCK_M``; padding
rows are written as exact zeros, so per-field reductions can run over whole blocks.

Field kinds (``KIND``), with the maths of :mod:`sta.reference` and the names of docs/ops.md
section 7 (s = tanh h, s1 = 1 - s^2, s2 = -2 s s1, s3 = -2 s1 (1 - 3 s^2)):

* ``POTENTIAL`` (0): h = W z + c; v = W^T (a s1); u = a.s; lap = sum a s2 wn with wn = |W_j|^2;
  du/dt = sum a s1 de; hj = du/dt + |v|^2 / 2.
* ``HAMILTONIAN`` (1): same hidden layer; r = M (a s1) with M = A W^T (K, D, H) precomputed per
  step; div = 0 exactly; curl = d^T C d with d = a s2 and the curl matrix C = G - N o N^T
  (K, H, H) built from :func:`sta.reference.hamiltonian_curl_matrices` by the caller.
* ``MLP`` (2): s = tanh(W1 z + c1); r = tanh(W2 s + b2); div = sum_i (1 - r_i^2) [Pdiv (1 - s^2)]_i
  with the divergence matrix Pdiv = W2 o W1^T (K, D, H) precomputed per step by the caller.

Forward (:func:`flow_step_fwd`): ``_flow_step_hidden_fwd_kernel`` (z -> hidden activations and
per-row scalars) then ``_flow_step_fwd_kernel`` (hidden -> velocity rows, fused epilogue, g-weighted
scatter-add into ``velocity`` and ``div``, per-pair outputs written in place; curl).

Backward (:func:`flow_step_bwd`), recomputing the forward like flash-attention (nothing
data-dependent is saved between the passes): hidden recompute, ``_flow_step_bwd_kernel`` (output
stage: gradient w.r.t. the velocity rows and the coefficients), ``_flow_step_hidden_bwd_kernel``
(gradient w.r.t. h and per-row parameter contributions), ``_flow_step_dz_bwd_kernel`` (scatter-add
into dz) and ``_flow_step_param_bwd_kernel``: parameter gradients as a deterministic per-field
reduction (each program owns one output tile of one field and loops over that field's row blocks
in order; no float atomics on parameters).

The only atomics are the scatter-adds into ``velocity``, ``div`` and ``dz`` (several fields add to
the same sample), as in a mixture-of-experts combine; so the launchers refuse to run under
``torch.use_deterministic_algorithms(True)`` (:func:`deterministic_refusal`).

Modules: the kernels are in :mod:`sta.kernels.flow_step_kernels`, their constexprs, tile configs
and spill table in :mod:`sta.kernels.configs`, the routing in :mod:`sta.kernels.routing`. Every
launch goes through :func:`sta.kernels.launch.launch`: ``python -m sta.kernels.aot`` records the
launchers' own arguments and compiles each kernel for sm_80 / sm_90 without a GPU.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import triton

from .configs import HAMILTONIAN, MLP, POTENTIAL, next_pow2, precision_for
from .flow_step_kernels import (_flow_step_bwd_kernel, _flow_step_dz_bwd_kernel, _flow_step_fwd_kernel,
                                _flow_step_hidden_bwd_kernel, _flow_step_hidden_fwd_kernel,
                                _flow_step_param_bwd_kernel)
from ..backends.library import register_torch_op
from .launch import launch
from .routing import Routing, route

__all__ = [
    "POTENTIAL",
    "HAMILTONIAN",
    "MLP",
    "flow_step_fwd",
    "flow_step_bwd",
    "triton_flow_step",
    "precision_for",
    "deterministic_refusal",
]


def deterministic_refusal() -> str:
    """Why the kernels may not run under ``torch.use_deterministic_algorithms(True)`` ('' if they may).

    The velocity, divergence and dz scatter-adds are float atomics (several fields add to one
    sample): their order, so their rounding, varies from run to run on a GPU. In warn-only mode
    (``use_deterministic_algorithms(True, warn_only=True)``) this returns '' and the launchers warn.
    """
    if torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled():
        return ("torch.use_deterministic_algorithms(True) is set, and the Triton flow-step kernels accumulate "
                "velocity, div and dz with float atomics (order-dependent on a GPU); use backend='cpu' or "
                "'torch', or warn_only=True")
    return ""


def _check_deterministic():
    reason = deterministic_refusal()
    if reason:
        raise RuntimeError(reason)
    if torch.are_deterministic_algorithms_enabled():
        warnings.warn("the Triton flow-step kernels accumulate with float atomics: not bit-reproducible on a GPU "
                      "(torch.use_deterministic_algorithms(True, warn_only=True))", stacklevel=3)


# ----------------------------------------------------------------------------------------------
# Launchers.
# ----------------------------------------------------------------------------------------------

def _empty(*shape, like):
    return torch.empty(shape, dtype=torch.float32, device=like.device)


def _out_view(kind: int, W: torch.Tensor, W_out: Optional[torch.Tensor]):
    """Output weights as strides of a (K, H, D) view: v[n, d] = sum_h x[n, h] Wout[k, h, d]."""
    if kind == POTENTIAL:
        return W, W.stride(0), W.stride(1), W.stride(2)  # W: (K, H, D)
    return W_out, W_out.stride(0), W_out.stride(2), W_out.stride(1)  # M, W2: (K, D, H)


def _buckets(D: int, H: int, routing: Routing):
    return next_pow2(D), next_pow2(H), next_pow2(max(routing.max_rows, 1))


def _hidden(z, routing: Routing, kind, W, c, a, de, store_x2, store_h, precision):
    """Stage 1: hidden activations of every padded row.

    Returns ``x1, x2, h: (Npad, H)`` and ``row_scalars: (3, Npad)`` (u, lap u, du/dt per row of a
    potential field). x1 = q = a s1 (potential, hamiltonian) or s (mlp); x2 = d = a s2 (hamiltonian)
    or 1 - s^2 (mlp), stored only when ``store_x2``; h stored only when ``store_h``.
    """
    D, H = z.shape[1], W.shape[1]
    n = routing.num_blocks * routing.block_m
    x1 = _empty(n, H, like=z)
    x2 = _empty(n, H, like=z) if store_x2 else x1
    h = _empty(n, H, like=z) if store_h else x1
    row_scalars = _empty(3, n, like=z) if kind == POTENTIAL else _empty(3, 1, like=z)
    if routing.num_blocks:
        launch(_flow_step_hidden_fwd_kernel, (routing.num_blocks,),
            z, z.stride(0), z.stride(1), routing.rows, routing.block_field, W, c,
            a if a is not None else c, de if de is not None else c,
            x1, x2, h, *row_scalars, D, H, *_buckets(D, H, routing), int(store_x2), int(store_h),
            KIND=kind, INPUT_PRECISION=precision, BLOCK_M=routing.block_m,
        )
    return x1, x2, h, row_scalars


def flow_step_fwd(z, g, kind: int, W, c, a=None, de=None, W_out=None, b2=None, mat=None,
                  want_curl: bool = False, precision: str = "ieee"):
    """Forward of one bank of fields on the active pairs of ``g``.

    z: (B, D); g: (B, K); W: (K, H, D) (W, or W1 for mlp); c: (K, H) (c, or c1); a: (K, H) (not
    mlp); de: (K, H) (potential); W_out: (K, D, H) (M for hamiltonian, W2 for mlp); b2: (K, D)
    (mlp); mat: the curl matrix C (K, H, H) for a hamiltonian curl, the divergence matrix
    Pdiv = W2 o W1^T (K, D, H) for mlp. Parameters must be contiguous. Returns fp32
    ``velocity (B, D), div (B,), o1 (B, K), o2 (B, K)`` with o1, o2 = (hj, u) for potential fields,
    (curl, unused zeros) for hamiltonian, (div_rot, unused zeros) for mlp.
    """
    B, D = z.shape
    K, H = W.shape[0], W.shape[1]
    vel = torch.zeros(B, D, dtype=torch.float32, device=z.device)
    div = torch.zeros(B, dtype=torch.float32, device=z.device)
    o1 = torch.zeros(B, K, dtype=torch.float32, device=z.device)
    o2 = torch.zeros(B, K, dtype=torch.float32, device=z.device)
    _check_deterministic()
    if B == 0 or K == 0 or D == 0:
        return vel, div, o1, o2
    routing = route(g)
    if routing.num_blocks == 0:
        return vel, div, o1, o2
    want_curl = bool(want_curl and kind == HAMILTONIAN)
    x1, x2, _, row_scalars = _hidden(z, routing, kind, W, c, a, de, kind == MLP or want_curl, False, precision)
    # a pointer the launch does not read still needs a tensor: c stands in
    Pdiv = mat if kind == MLP else c
    C = mat if want_curl else c
    launch(_flow_step_fwd_kernel, (routing.num_blocks,),
        routing.rows, routing.block_field, g, g.stride(0), g.stride(1), x1, x2, *_out_view(kind, W, W_out),
        Pdiv, b2 if b2 is not None else c, C, *row_scalars, vel, div, o1, o2, o1.stride(0), o1.stride(1),
        D, H, *_buckets(D, H, routing),
        KIND=kind, WANT_CURL=want_curl, INPUT_PRECISION=precision, BLOCK_M=routing.block_m,
    )
    return vel, div, o1, o2


def _param_reduce(routing: Routing, rows_a, out, b=None, gather=False, accumulate=False, precision="ieee"):
    """out[k] (+)= sum over field k's padded rows n of rows_a[n]^T b[n]; b None: column sums.

    rows_a: (Npad, P); b: (Npad, Q), or (B, Q) indexed by sample when ``gather``; out: (K, P, Q)
    or (K, P) for column sums. bf16/fp16 inputs reduce in fp32 ("ieee"): a parameter gradient sums
    every active row of its field, and these products are a small part of the backward."""
    K, P = out.shape[0], out.shape[1]
    ones = b is None
    precision = "ieee" if ones or precision in ("bf16", "fp16") else precision  # no product: one variant
    Q = 1 if ones else b.shape[1]
    out3 = out.unsqueeze(-1) if ones else out
    # 32x32 output tiles: under the interpreter each program costs the same at 16 or 32 wide, so
    # fewer, larger tiles are faster; on a GPU this reduction is a small part of the backward.
    bp, bq = 32, 32 if not ones else 16
    grid = (K, triton.cdiv(P, bp), triton.cdiv(Q, bq))
    b = rows_a if ones else b  # the kernel reads no b for column sums; any tensor fills the slot
    launch(_flow_step_param_bwd_kernel, grid,
        routing.block_ptr, routing.rows, rows_a, rows_a.stride(0), b, b.stride(0), b.stride(1) if b.dim() > 1 else 1,
        out3, out3.stride(0), out3.stride(1), out3.stride(2), P, Q,
        B_GATHER=gather, B_ONES=ones, ACCUMULATE=accumulate, INPUT_PRECISION=precision,
        BLOCK_M=routing.block_m, BLOCK_P=bp, BLOCK_Q=bq,
    )


def flow_step_bwd(gvel, gdiv, go1, go2, z, g, kind: int, W, c, a=None, de=None, W_out=None,
                  b2=None, mat=None, want_curl: bool = False, precision: str = "ieee"):
    """Backward of :func:`flow_step_fwd`, recomputing the forward.

    gvel: (B, D), gdiv: (B,), go1, go2: (B, K) gradients of the four outputs (any strides); the
    other arguments as :func:`flow_step_fwd`. Returns fp32 gradients
    ``(dz, dg, dW, dc, da, dde, dW_out, db2, dmat)`` shaped like their inputs, None for an input
    that was None. Gradients w.r.t. inactive pairs are exactly zero.
    """
    B, D = z.shape
    K, H = W.shape[0], W.shape[1]
    f32 = dict(dtype=torch.float32, device=z.device)
    dz = torch.zeros(B, D, **f32)
    dg = torch.zeros(B, K, **f32)
    dW = torch.zeros(W.shape, **f32)
    dc = torch.zeros(K, H, **f32)
    da = torch.zeros(K, H, **f32) if a is not None else None
    dde = torch.zeros(K, H, **f32) if de is not None else None
    dW_out = torch.zeros(W_out.shape, **f32) if W_out is not None else None
    db2 = torch.zeros(b2.shape, **f32) if b2 is not None else None
    dmat = torch.zeros(mat.shape, **f32) if mat is not None else None
    grads = (dz, dg, dW, dc, da, dde, dW_out, db2, dmat)
    _check_deterministic()
    if B == 0 or K == 0 or D == 0:
        return grads
    routing = route(g)
    if routing.num_blocks == 0:
        return grads
    want_curl = bool(want_curl and kind == HAMILTONIAN)
    x1, x2, h, row_scalars = _hidden(z, routing, kind, W, c, a, de, kind == MLP or want_curl, True, precision)
    n = routing.num_blocks * routing.block_m
    # per-row buffers; one a kind does not write aliases another (the launch needs a tensor)
    gv = _empty(n, D, like=z)  # grad w.r.t. the velocity rows (mlp: the pre-tanh output)
    gE = _empty(n, D, like=z) if kind == MLP else gv  # grad w.r.t. E = Pdiv (1 - s^2)
    out_view = _out_view(kind, W, W_out)
    Pdiv = mat if kind == MLP else c
    C = mat if want_curl else c
    launch(_flow_step_bwd_kernel, (routing.num_blocks,),
        routing.rows, routing.block_field, g, g.stride(0), g.stride(1), x1, x2, *out_view,
        Pdiv, b2 if b2 is not None else c, row_scalars[1],
        gvel, gvel.stride(0), gvel.stride(1), gdiv, gdiv.stride(0), go1, go1.stride(0), go1.stride(1),
        gv, gE, dg, dg.stride(0), dg.stride(1), D, H, *_buckets(D, H, routing),
        KIND=kind, INPUT_PRECISION=precision, BLOCK_M=routing.block_m,
    )
    gh = _empty(n, H, like=z)  # grad w.r.t. h
    pa = _empty(n, H, like=z) if kind != MLP else gh  # per-row contributions to grad a, de, wn, C
    pde = _empty(n, H, like=z) if kind == POTENTIAL else gh
    pwn = _empty(n, H, like=z) if kind == POTENTIAL else gh
    pC = _empty(n, H, like=z) if want_curl else gh
    launch(_flow_step_hidden_bwd_kernel, (routing.num_blocks,),
        routing.rows, routing.block_field, g, g.stride(0), g.stride(1), W,
        a if a is not None else c, de if de is not None else c, *out_view,
        Pdiv, C, h, x2, gv, gE, gdiv, gdiv.stride(0),
        go1, go1.stride(0), go1.stride(1), go2, go2.stride(0), go2.stride(1),
        gh, pa, pde, pwn, pC, D, H, *_buckets(D, H, routing),
        KIND=kind, WANT_CURL=want_curl, INPUT_PRECISION=precision, BLOCK_M=routing.block_m,
    )
    launch(_flow_step_dz_bwd_kernel, (routing.num_blocks,),
        routing.rows, routing.block_field, gh, W, dz, D, H, *_buckets(D, H, routing),
        INPUT_PRECISION=precision, BLOCK_M=routing.block_m,
    )
    # parameter gradients: per-field reductions over the padded rows
    _param_reduce(routing, gh, dW, z, gather=True, precision=precision)  # h = W z + c
    _param_reduce(routing, gh, dc)
    if kind == POTENTIAL:
        _param_reduce(routing, x1, dW, gv, accumulate=True, precision=precision)  # v = W^T (a s1)
        dwn = torch.zeros(K, H, **f32)
        _param_reduce(routing, pwn, dwn)
        dW += 2.0 * dwn.unsqueeze(-1) * W.float()  # lap uses wn = |W_j|^2
        _param_reduce(routing, pa, da)
        _param_reduce(routing, pde, dde)
    elif kind == HAMILTONIAN:
        _param_reduce(routing, gv, dW_out, x1, precision=precision)  # v = M (a s1): dM = gv^T (a s1)
        _param_reduce(routing, pa, da)
        if want_curl:
            _param_reduce(routing, pC, dmat, x2, precision=precision)  # curl = d^T C d
    else:
        _param_reduce(routing, gv, dW_out, x1, precision=precision)  # o = W2 s + b2
        _param_reduce(routing, gv, db2)
        _param_reduce(routing, gE, dmat, x2, precision=precision)  # E = Pdiv (1 - s^2)
    return grads


# ----------------------------------------------------------------------------------------------
# torch.library registration: opaque custom ops with fake implementations, autograd outside.
# ----------------------------------------------------------------------------------------------
# The ops own the routing (sorting and padding the active pairs), so every output has a static
# shape ((B, D), (B,), (B, K)) and fake tensors need no data-dependent size. The Triton launches
# stay inside the op (the interpreter cannot run under ``wrap_triton``'s functional tracing of
# data-dependent routing); torch.compile(fullgraph=True) sees one opaque node per direction.

_OptT = Optional[torch.Tensor]


def _contig(t):
    return None if t is None else t.contiguous()


def _flow_step_fwd_impl(z: torch.Tensor, g: torch.Tensor, W: torch.Tensor, c: torch.Tensor, a: _OptT,
                        de: _OptT, W_out: _OptT, b2: _OptT, mat: _OptT, kind: int, want_curl: bool,
                        precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    outs = flow_step_fwd(z, g, kind, W.contiguous(), c.contiguous(), _contig(a), _contig(de), _contig(W_out),
                         _contig(b2), _contig(mat), want_curl, precision)
    return tuple(o.to(z.dtype) for o in outs)


def _flow_step_fwd_fake(z, g, W, c, a, de, W_out, b2, mat, kind, want_curl, precision):
    B, D = z.shape
    K = g.shape[1]
    return z.new_empty(B, D), z.new_empty(B), z.new_empty(B, K), z.new_empty(B, K)


def _flow_step_bwd_impl(gvel: torch.Tensor, gdiv: torch.Tensor, go1: torch.Tensor, go2: torch.Tensor,
                        z: torch.Tensor, g: torch.Tensor, W: torch.Tensor, c: torch.Tensor, a: _OptT, de: _OptT,
                        W_out: _OptT, b2: _OptT, mat: _OptT, kind: int, want_curl: bool,
                        precision: str) -> list[torch.Tensor]:
    grads = flow_step_bwd(gvel, gdiv, go1, go2, z, g, kind, W.contiguous(), c.contiguous(), _contig(a),
                          _contig(de), _contig(W_out), _contig(b2), _contig(mat), want_curl, precision)
    inputs = (z, g, W, c, a, de, W_out, b2, mat)
    # an absent optional input gets an empty gradient (custom ops return tensors only)
    return [z.new_empty(0) if x is None else gr.to(x.dtype) for gr, x in zip(grads, inputs)]


def _flow_step_bwd_fake(gvel, gdiv, go1, go2, z, g, W, c, a, de, W_out, b2, mat, kind, want_curl, precision):
    inputs = (z, g, W, c, a, de, W_out, b2, mat)
    return [z.new_empty(0) if x is None else torch.empty_like(x, memory_format=torch.contiguous_format)
            for x in inputs]


def _setup_context(ctx, inputs, output):
    z, g, W, c, a, de, W_out, b2, mat, kind, want_curl, precision = inputs
    ctx.save_for_backward(z, g, W, c, a, de, W_out, b2, mat)
    ctx.kind, ctx.want_curl, ctx.precision = kind, want_curl, precision


def _backward(ctx, gvel, gdiv, go1, go2):
    z, g, W, c, a, de, W_out, b2, mat = ctx.saved_tensors
    grads = torch.ops.sta.triton_flow_step_bwd(gvel, gdiv, go1, go2, z, g, W, c, a, de, W_out, b2, mat,
                                               ctx.kind, ctx.want_curl, ctx.precision)
    inputs = (z, g, W, c, a, de, W_out, b2, mat)
    return tuple(None if x is None else gr for gr, x in zip(grads, inputs)) + (None, None, None)


register_torch_op("sta::triton_flow_step_bwd", _flow_step_bwd_fake, impl=_flow_step_bwd_impl)
register_torch_op("sta::triton_flow_step_fwd", _flow_step_fwd_fake, impl=_flow_step_fwd_impl,
                  backward=_backward, setup_context=_setup_context)


def triton_flow_step(z, g, kind, W, c, a=None, de=None, W_out=None, b2=None, mat=None,
                     want_curl=False, precision="ieee"):
    """The differentiable Triton flow step of one bank: the registered op
    ``torch.ops.sta.triton_flow_step_fwd``, whose autograd formula calls
    ``torch.ops.sta.triton_flow_step_bwd``. Arguments as :func:`flow_step_fwd`; returns
    ``velocity (B, D), div (B,), o1 (B, K), o2 (B, K)`` in z's dtype."""
    return torch.ops.sta.triton_flow_step_fwd(z, g, W, c, a, de, W_out, b2, mat, kind, bool(want_curl), precision)
