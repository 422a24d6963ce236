"""The Triton kernels of the sparse flow step: two forward stages, four backward stages, ``tl.dot`` helpers.

The algorithm, the field kinds and the stages are described in :mod:`sta.kernels.flow_step`, whose
launchers are the only callers; the constexprs (``KIND``, ``INPUT_PRECISION``, ``BLOCK_M``, the
autotuned ``BLOCK_H`` / ``BLOCK_D``) come from :mod:`sta.kernels.configs` and the padded row lists
from :mod:`sta.kernels.routing`. Names follow the table of docs/ops.md section 7; a pointer
argument keeps the short name of its kernel-local role (``C_ptr``: the curl matrix C, ``Pdiv_ptr``:
the mlp divergence matrix Pdiv), as its comment says. ``python -m sta.kernels.aot`` compiles every
kernel here for sm_80 / sm_90 (tests/test_triton_aot.py).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .configs import AUTOTUNE_KEY, autotune_configs, prune_for


@triton.jit
def _round_tf32(x):
    """fp32 -> the nearest value with a 10-bit mantissa (round half to even), as fp32: the
    operand rounding of a TF32 tensor-core product (finite inputs; test emulation only)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation; ``PRECISION`` (see PRECISIONS) sets the operands:
    "ieee" fp32 (FMA), "tf32" (tensor cores, 10-bit mantissa), "bf16" / "fp16" (operands cast to
    the input dtype, tensor cores), "tf32_emulated" (operands rounded to 10 mantissa bits, then an
    exact product: what "tf32" computes, checkable where tl.dot ignores input_precision)."""
    if PRECISION == "bf16":
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif PRECISION == "fp16":
        out = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    elif PRECISION == "tf32_emulated":
        out = tl.dot(_round_tf32(a), _round_tf32(b), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _tanh(x):
    # tanh from exp(-2|x|): no overflow, no dependence on libdevice (also runs in the interpreter).
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _block_rows(rows_ptr, block_field_ptr, BLOCK_M: tl.constexpr):
    """This program's block of the padded row list: its field ``k``, its row indices ``offs_m``
    (BLOCK_M,), the sample ``b`` of each row (0 for padding) and ``valid`` (False for padding).
    Every kernel of the flow step starts here (the routing of :mod:`sta.kernels.routing`)."""
    pid = tl.program_id(0).to(tl.int64)
    k = tl.load(block_field_ptr + pid).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    b = tl.load(rows_ptr + offs_m)
    valid = b >= 0
    return k, offs_m, tl.where(valid, b, 0), valid


@triton.autotune(configs=autotune_configs(), key=AUTOTUNE_KEY, prune_configs_by=prune_for("_flow_step_hidden_fwd_kernel"))
@triton.jit(do_not_specialize=["store_x2", "store_h"])  # 0/1 flags: one compiled variant
def _flow_step_hidden_fwd_kernel(
    z_ptr, stride_zb, stride_zd,  # z: (B, D) latents, any strides
    rows_ptr,  # (Npad,) int64: sample of each padded row, -1 for padding
    block_field_ptr,  # (num_blocks,) int32: field owning each block of BLOCK_M rows
    W_ptr,  # (K, H, D) contiguous: hidden weights W (potential, hamiltonian) or W1 (mlp)
    c_ptr,  # (K, H) contiguous: hidden bias b + e(t)
    a_ptr,  # (K, H) contiguous: output weights a (unused for mlp)
    de_ptr,  # (K, H) contiguous: de/dt (potential only)
    x1_ptr,  # (Npad, H) out: a*s1 (potential, hamiltonian) or s = tanh(h) (mlp)
    x2_ptr,  # (Npad, H) out if store_x2: d = a*s2 (hamiltonian curl) or 1 - s^2 (mlp)
    h_ptr,  # (Npad, H) out if store_h: the pre-activation h (for the backward)
    u_ptr, lap_ptr, dudt_ptr,  # (Npad,) out (potential): u, lap u, du/dt per row
    D, H,  # latent size and hidden width (runtime: never constexpr)
    d_bucket, h_bucket, m_bucket,  # next powers of two of D, H, rows per field: autotune key only
    store_x2,  # write x2 (runtime flag: one compiled variant per KIND, not four)
    store_h,  # write h
    KIND: tl.constexpr,  # POTENTIAL, HAMILTONIAN or MLP
    INPUT_PRECISION: tl.constexpr,  # tl.dot operands: see _dot
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,  # tile sizes
):
    k, offs_m, b, valid = _block_rows(rows_ptr, block_field_ptr, BLOCK_M)
    u_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    lap_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    dudt_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mh = offs_h < H
        acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        wn = tl.zeros((BLOCK_H,), dtype=tl.float32)  # |W_j|^2, for the Laplacian
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            md = offs_d < D
            zt = tl.load(z_ptr + b[:, None] * stride_zb + offs_d[None, :] * stride_zd,
                         mask=valid[:, None] & md[None, :], other=0.0).to(tl.float32)
            wt = tl.load(W_ptr + k * H * D + offs_h[None, :] * D + offs_d[:, None],
                         mask=md[:, None] & mh[None, :], other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_H)
            acc = _dot(zt, wt, acc, INPUT_PRECISION)
            if KIND == 0:
                wn += tl.sum(wt * wt, 0)
        c = tl.load(c_ptr + k * H + offs_h, mask=mh, other=0.0).to(tl.float32)
        h = acc + c[None, :]
        s = _tanh(h)
        s1 = 1.0 - s * s
        keep = valid[:, None] & mh[None, :]
        out_off = offs_m[:, None] * H + offs_h[None, :]
        if KIND == 2:
            x1 = s
            x2 = s1
        else:
            a = tl.load(a_ptr + k * H + offs_h, mask=mh, other=0.0).to(tl.float32)
            s2 = -2.0 * s * s1
            x1 = a[None, :] * s1
            x2 = a[None, :] * s2
            if KIND == 0:
                de = tl.load(de_ptr + k * H + offs_h, mask=mh, other=0.0).to(tl.float32)
                u_acc += tl.sum(tl.where(keep, a[None, :] * s, 0.0), 1)
                lap_acc += tl.sum(tl.where(keep, x2 * wn[None, :], 0.0), 1)
                dudt_acc += tl.sum(tl.where(keep, x1 * de[None, :], 0.0), 1)
        # padding rows are stored as exact zeros: the per-field reductions sum whole blocks
        tl.store(x1_ptr + out_off, tl.where(keep, x1, 0.0), mask=mh[None, :])
        if store_x2:
            tl.store(x2_ptr + out_off, tl.where(keep, x2, 0.0), mask=mh[None, :])
        if store_h:
            tl.store(h_ptr + out_off, tl.where(keep, h, 0.0), mask=mh[None, :])
    if KIND == 0:
        tl.store(u_ptr + offs_m, u_acc)
        tl.store(lap_ptr + offs_m, lap_acc)
        tl.store(dudt_ptr + offs_m, dudt_acc)


@triton.jit
def _output_tile(x1_ptr, x2_ptr, W_out_ptr, stride_wok, stride_woh, stride_wod, Pdiv_ptr, k, offs_m, offs_d, md,
                 D, H, KIND: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """The output stage's product over the hidden units for one (BLOCK_M, BLOCK_D) tile of rows
    ``offs_m`` of field ``k``: ``acc = x1 @ W_out[k]`` (the velocity rows; mlp: the pre-tanh output)
    and, for mlp fields, ``acc2 = x2 @ Pdiv[k]^T`` (the divergence rows; zeros otherwise). Shared by
    the forward and backward output kernels, which compute it from the same hidden activations."""
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mh = offs_h < H
        xt = tl.load(x1_ptr + offs_m[:, None] * H + offs_h[None, :], mask=mh[None, :], other=0.0)
        wt = tl.load(W_out_ptr + k * stride_wok + offs_h[:, None] * stride_woh + offs_d[None, :] * stride_wod,
                     mask=mh[:, None] & md[None, :], other=0.0).to(tl.float32)
        acc = _dot(xt, wt, acc, INPUT_PRECISION)
        if KIND == 2:
            x2t = tl.load(x2_ptr + offs_m[:, None] * H + offs_h[None, :], mask=mh[None, :], other=0.0)
            ct = tl.load(Pdiv_ptr + k * D * H + offs_d[None, :] * H + offs_h[:, None],
                         mask=mh[:, None] & md[None, :], other=0.0).to(tl.float32)
            acc2 = _dot(x2t, ct, acc2, INPUT_PRECISION)
    return acc, acc2


@triton.autotune(configs=autotune_configs(), key=AUTOTUNE_KEY, prune_configs_by=prune_for("_flow_step_fwd_kernel"),
                 reset_to_zero=["vel_ptr", "div_ptr"])
@triton.jit
def _flow_step_fwd_kernel(
    rows_ptr,  # (Npad,) int64: sample of each padded row, -1 for padding
    block_field_ptr,  # (num_blocks,) int32: field owning each block
    g_ptr, stride_gb, stride_gk,  # g: (B, K) coefficients, any strides
    x1_ptr, x2_ptr,  # (Npad, H): hidden activations from _flow_step_hidden_fwd_kernel
    W_out_ptr, stride_wok, stride_woh, stride_wod,  # output weights as a (K, H, D) view: W, M^T or W2^T
    Pdiv_ptr,  # (K, D, H) contiguous (mlp): Pdiv = W2 o W1^T, the divergence matrix
    b2_ptr,  # (K, D) contiguous (mlp): output bias b2
    C_ptr,  # (K, H, H) contiguous (hamiltonian, WANT_CURL): the curl matrix C = G - N o N^T
    u_ptr, lap_ptr, dudt_ptr,  # (Npad,) per-row scalars of the potential hidden stage
    vel_ptr,  # (B, D) fp32, zero-initialised: velocity, accumulated with atomics
    div_ptr,  # (B,) fp32, zero-initialised: divergence, accumulated with atomics
    o1_ptr, o2_ptr, stride_ob, stride_ok,  # (B, K) fp32 zero-initialised per-pair outputs:
    # potential: hj, u; hamiltonian: curl, -; mlp: div_rot, -
    D, H,  # latent size and hidden width
    d_bucket, h_bucket, m_bucket,  # autotune key only
    KIND: tl.constexpr,  # POTENTIAL, HAMILTONIAN or MLP
    WANT_CURL: tl.constexpr,  # hamiltonian: compute the curl energy
    INPUT_PRECISION: tl.constexpr,  # tl.dot operands: see _dot
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,  # tile sizes
):
    k, offs_m, b, valid = _block_rows(rows_ptr, block_field_ptr, BLOCK_M)
    gw = tl.load(g_ptr + b * stride_gb + k * stride_gk, mask=valid, other=0.0).to(tl.float32)
    vsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    divrow = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        md = offs_d < D
        acc, acc2 = _output_tile(x1_ptr, x2_ptr, W_out_ptr, stride_wok, stride_woh, stride_wod, Pdiv_ptr, k, offs_m,
                                 offs_d, md, D, H, KIND, INPUT_PRECISION, BLOCK_M, BLOCK_H, BLOCK_D)
        keep = valid[:, None] & md[None, :]
        if KIND == 2:
            b2 = tl.load(b2_ptr + k * D + offs_d, mask=md, other=0.0).to(tl.float32)
            v = _tanh(acc + b2[None, :])
            divrow += tl.sum(tl.where(keep, (1.0 - v * v) * acc2, 0.0), 1)
        else:
            v = acc
        v = tl.where(keep, v, 0.0)
        vsq += tl.sum(v * v, 1)
        tl.atomic_add(vel_ptr + b[:, None] * D + offs_d[None, :], gw[:, None] * v, mask=keep)
    pair = b * stride_ob + k * stride_ok
    if KIND == 0:
        lap = tl.load(lap_ptr + offs_m)
        tl.atomic_add(div_ptr + b, gw * lap, mask=valid)
        tl.store(o1_ptr + pair, tl.load(dudt_ptr + offs_m) + 0.5 * vsq, mask=valid)
        tl.store(o2_ptr + pair, tl.load(u_ptr + offs_m), mask=valid)
    if KIND == 2:
        tl.atomic_add(div_ptr + b, gw * divrow, mask=valid)
        tl.store(o1_ptr + pair, divrow, mask=valid)
    if KIND == 1:
        if WANT_CURL:  # d^T Q d, d = a*s2: O(H^2) per row
            curl = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for j0 in range(0, H, BLOCK_H):
                offs_j = j0 + tl.arange(0, BLOCK_H)
                mj = offs_j < H
                accq = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
                for i0 in range(0, H, BLOCK_H):
                    offs_i = i0 + tl.arange(0, BLOCK_H)
                    mi = offs_i < H
                    dti = tl.load(x2_ptr + offs_m[:, None] * H + offs_i[None, :], mask=mi[None, :], other=0.0)
                    qt = tl.load(C_ptr + k * H * H + offs_i[:, None] * H + offs_j[None, :],
                                 mask=mi[:, None] & mj[None, :], other=0.0).to(tl.float32)
                    accq = _dot(dti, qt, accq, INPUT_PRECISION)
                dtj = tl.load(x2_ptr + offs_m[:, None] * H + offs_j[None, :], mask=mj[None, :], other=0.0)
                curl += tl.sum(accq * dtj, 1)
            tl.store(o1_ptr + pair, curl, mask=valid)


@triton.autotune(configs=autotune_configs(), key=AUTOTUNE_KEY, prune_configs_by=prune_for("_flow_step_bwd_kernel"))
@triton.jit
def _flow_step_bwd_kernel(
    rows_ptr,  # (Npad,) int64: sample of each padded row, -1 for padding
    block_field_ptr,  # (num_blocks,) int32: field owning each block
    g_ptr, stride_gb, stride_gk,  # g: (B, K) coefficients
    x1_ptr, x2_ptr,  # (Npad, H): recomputed hidden activations
    W_out_ptr, stride_wok, stride_woh, stride_wod,  # output weights as a (K, H, D) view
    Pdiv_ptr,  # (K, D, H) contiguous (mlp): Pdiv = W2 o W1^T
    b2_ptr,  # (K, D) contiguous (mlp): b2
    lap_ptr,  # (Npad,) recomputed lap u (potential)
    gvel_ptr, stride_gvb, stride_gvd,  # (B, D) grad of velocity, any strides
    gdiv_ptr, stride_gdiv,  # (B,) grad of div
    go1_ptr, stride_go1b, stride_go1k,  # (B, K) grad of o1 (hj / - / div_rot)
    gv_ptr,  # (Npad, D) out: grad w.r.t. the velocity rows (mlp: w.r.t. the pre-tanh output o)
    gq_ptr,  # (Npad, D) out (mlp): grad w.r.t. E = Pdiv (1 - s^2)
    gg_ptr, stride_ggb, stride_ggk,  # (B, K) fp32 zero-initialised out: grad of g
    D, H,  # latent size and hidden width
    d_bucket, h_bucket, m_bucket,  # autotune key only
    KIND: tl.constexpr,  # POTENTIAL, HAMILTONIAN or MLP
    INPUT_PRECISION: tl.constexpr,  # tl.dot operands: see _dot
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,  # tile sizes
):
    k, offs_m, b, valid = _block_rows(rows_ptr, block_field_ptr, BLOCK_M)
    gw = tl.load(g_ptr + b * stride_gb + k * stride_gk, mask=valid, other=0.0).to(tl.float32)
    gdivb = tl.load(gdiv_ptr + b * stride_gdiv, mask=valid, other=0.0).to(tl.float32)
    go1 = tl.load(go1_ptr + b * stride_go1b + k * stride_go1k, mask=valid, other=0.0).to(tl.float32)
    gamma = gw * gdivb + go1  # mlp: total weight of this pair's divergence
    gg = tl.zeros((BLOCK_M,), dtype=tl.float32)
    divrow = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        md = offs_d < D
        acc, acc2 = _output_tile(x1_ptr, x2_ptr, W_out_ptr, stride_wok, stride_woh, stride_wod, Pdiv_ptr, k, offs_m,
                                 offs_d, md, D, H, KIND, INPUT_PRECISION, BLOCK_M, BLOCK_H, BLOCK_D)
        keep = valid[:, None] & md[None, :]
        gvt = tl.load(gvel_ptr + b[:, None] * stride_gvb + offs_d[None, :] * stride_gvd,
                      mask=keep, other=0.0).to(tl.float32)
        out_off = offs_m[:, None] * D + offs_d[None, :]
        if KIND == 2:
            b2 = tl.load(b2_ptr + k * D + offs_d, mask=md, other=0.0).to(tl.float32)
            r = _tanh(acc + b2[None, :])
            ds2 = 1.0 - r * r
            divrow += tl.sum(tl.where(keep, ds2 * acc2, 0.0), 1)
            gg += tl.sum(tl.where(keep, gvt * r, 0.0), 1)
            go = gw[:, None] * gvt * ds2 - 2.0 * gamma[:, None] * acc2 * r * ds2
            tl.store(gv_ptr + out_off, tl.where(keep, go, 0.0), mask=md[None, :])
            tl.store(gq_ptr + out_off, tl.where(keep, gamma[:, None] * ds2, 0.0), mask=md[None, :])
        else:
            gg += tl.sum(tl.where(keep, gvt * acc, 0.0), 1)
            gv = gw[:, None] * gvt
            if KIND == 0:  # hj = du/dt + |v|^2/2 adds ghj * v
                gv += go1[:, None] * acc
            tl.store(gv_ptr + out_off, tl.where(keep, gv, 0.0), mask=md[None, :])
    if KIND == 0:
        gg += gdivb * tl.load(lap_ptr + offs_m)
    if KIND == 2:
        gg += gdivb * divrow
    tl.store(gg_ptr + b * stride_ggb + k * stride_ggk, gg, mask=valid)


@triton.autotune(configs=autotune_configs(), key=AUTOTUNE_KEY, prune_configs_by=prune_for("_flow_step_hidden_bwd_kernel"))
@triton.jit
def _flow_step_hidden_bwd_kernel(
    rows_ptr,  # (Npad,) int64: sample of each padded row, -1 for padding
    block_field_ptr,  # (num_blocks,) int32: field owning each block
    g_ptr, stride_gb, stride_gk,  # g: (B, K) coefficients
    W_ptr,  # (K, H, D) contiguous: hidden weights (for |W_j|^2, potential)
    a_ptr, de_ptr,  # (K, H) contiguous: a, de/dt
    W_out_ptr, stride_wok, stride_woh, stride_wod,  # output weights as a (K, H, D) view
    Pdiv_ptr,  # (K, D, H) contiguous (mlp): Pdiv = W2 o W1^T
    C_ptr,  # (K, H, H) contiguous (hamiltonian, WANT_CURL): the curl matrix C
    h_ptr, x2_ptr,  # (Npad, H): recomputed pre-activation h and x2 (d = a*s2 for the curl)
    gv_ptr, gq_ptr,  # (Npad, D): from _flow_step_bwd_kernel
    gdiv_ptr, stride_gdiv,  # (B,) grad of div
    go1_ptr, stride_go1b, stride_go1k,  # (B, K) grad of o1 (hj / curl / div_rot)
    go2_ptr, stride_go2b, stride_go2k,  # (B, K) grad of o2 (u)
    gh_ptr,  # (Npad, H) out: grad w.r.t. h
    pa_ptr, pde_ptr, pwn_ptr, pq_ptr,  # (Npad, H) out: per-row contributions to grad a, de, |W|^2;
    # pq = gcurl * d, for grad C = sum_rows pq d^T
    D, H,  # latent size and hidden width
    d_bucket, h_bucket, m_bucket,  # autotune key only
    KIND: tl.constexpr,  # POTENTIAL, HAMILTONIAN or MLP
    WANT_CURL: tl.constexpr,  # hamiltonian: the curl has a gradient
    INPUT_PRECISION: tl.constexpr,  # tl.dot operands: see _dot
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,  # tile sizes
):
    k, offs_m, b, valid = _block_rows(rows_ptr, block_field_ptr, BLOCK_M)
    gw = tl.load(g_ptr + b * stride_gb + k * stride_gk, mask=valid, other=0.0).to(tl.float32)
    glap = gw * tl.load(gdiv_ptr + b * stride_gdiv, mask=valid, other=0.0).to(tl.float32)
    go1 = tl.load(go1_ptr + b * stride_go1b + k * stride_go1k, mask=valid, other=0.0).to(tl.float32)
    go2 = tl.load(go2_ptr + b * stride_go2b + k * stride_go2k, mask=valid, other=0.0).to(tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mh = offs_h < H
        acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        wn = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            md = offs_d < D
            gvt = tl.load(gv_ptr + offs_m[:, None] * D + offs_d[None, :], mask=md[None, :], other=0.0)
            wt = tl.load(W_out_ptr + k * stride_wok + offs_h[None, :] * stride_woh + offs_d[:, None] * stride_wod,
                         mask=md[:, None] & mh[None, :], other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_H)
            acc = _dot(gvt, wt, acc, INPUT_PRECISION)
            if KIND == 0:
                wn += tl.sum(wt * wt, 0)  # the potential's output weights are W itself
            if KIND == 2:
                gqt = tl.load(gq_ptr + offs_m[:, None] * D + offs_d[None, :], mask=md[None, :], other=0.0)
                ct = tl.load(Pdiv_ptr + k * D * H + offs_d[:, None] * H + offs_h[None, :],
                             mask=md[:, None] & mh[None, :], other=0.0).to(tl.float32)
                acc2 = _dot(gqt, ct, acc2, INPUT_PRECISION)
        keep = valid[:, None] & mh[None, :]
        out_off = offs_m[:, None] * H + offs_h[None, :]
        h = tl.load(h_ptr + out_off, mask=mh[None, :], other=0.0)
        s = _tanh(h)
        s1 = 1.0 - s * s
        if KIND == 2:
            gh = acc * s1 - 2.0 * acc2 * s * s1
        else:
            a = tl.load(a_ptr + k * H + offs_h, mask=mh, other=0.0).to(tl.float32)[None, :]
            s2 = -2.0 * s * s1
            s3 = -2.0 * s1 * (1.0 - 3.0 * s * s)
            gh = acc * a * s2
            pa = acc * s1
            if KIND == 0:
                de = tl.load(de_ptr + k * H + offs_h, mask=mh, other=0.0).to(tl.float32)[None, :]
                wnb = wn[None, :]
                gdudt = go1[:, None]  # hj = du/dt + ...
                gu = go2[:, None]
                gl = glap[:, None]
                gh += gdudt * a * de * s2 + gu * a * s1 + gl * a * wnb * s3
                pa += gu * s + gl * s2 * wnb + gdudt * s1 * de
                tl.store(pde_ptr + out_off, tl.where(keep, gdudt * a * s1, 0.0), mask=mh[None, :])
                tl.store(pwn_ptr + out_off, tl.where(keep, gl * a * s2, 0.0), mask=mh[None, :])
            if KIND == 1:
                if WANT_CURL:  # curl = d^T Q d: grad d = gcurl (Q + Q^T) d
                    accq = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
                    for i0 in range(0, H, BLOCK_H):
                        offs_i = i0 + tl.arange(0, BLOCK_H)
                        mi = offs_i < H
                        dti = tl.load(x2_ptr + offs_m[:, None] * H + offs_i[None, :], mask=mi[None, :], other=0.0)
                        qm = mi[:, None] & mh[None, :]
                        qt = tl.load(C_ptr + k * H * H + offs_i[:, None] * H + offs_h[None, :], mask=qm, other=0.0)
                        qtt = tl.load(C_ptr + k * H * H + offs_h[None, :] * H + offs_i[:, None], mask=qm, other=0.0)
                        accq = _dot(dti, (qt + qtt).to(tl.float32), accq, INPUT_PRECISION)
                    gd = go1[:, None] * accq
                    gh += gd * a * s3
                    pa += gd * s2
                    d = tl.load(x2_ptr + out_off, mask=mh[None, :], other=0.0)
                    tl.store(pq_ptr + out_off, tl.where(keep, go1[:, None] * d, 0.0), mask=mh[None, :])
            tl.store(pa_ptr + out_off, tl.where(keep, pa, 0.0), mask=mh[None, :])
        tl.store(gh_ptr + out_off, tl.where(keep, gh, 0.0), mask=mh[None, :])


@triton.autotune(configs=autotune_configs(), key=AUTOTUNE_KEY, prune_configs_by=prune_for("_flow_step_dz_bwd_kernel"),
                 reset_to_zero=["gz_ptr"])
@triton.jit
def _flow_step_dz_bwd_kernel(
    rows_ptr,  # (Npad,) int64: sample of each padded row, -1 for padding
    block_field_ptr,  # (num_blocks,) int32: field owning each block
    gh_ptr,  # (Npad, H): grad w.r.t. h
    W_ptr,  # (K, H, D) contiguous: hidden weights
    gz_ptr,  # (B, D) fp32 zero-initialised out: grad of z, accumulated with atomics
    D, H,  # latent size and hidden width
    d_bucket, h_bucket, m_bucket,  # autotune key only
    INPUT_PRECISION: tl.constexpr,  # tl.dot operands: see _dot
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,  # tile sizes
):
    k, offs_m, b, valid = _block_rows(rows_ptr, block_field_ptr, BLOCK_M)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        md = offs_d < D
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mh = offs_h < H
            ght = tl.load(gh_ptr + offs_m[:, None] * H + offs_h[None, :], mask=mh[None, :], other=0.0)
            wt = tl.load(W_ptr + k * H * D + offs_h[:, None] * D + offs_d[None, :],
                         mask=mh[:, None] & md[None, :], other=0.0).to(tl.float32)
            acc = _dot(ght, wt, acc, INPUT_PRECISION)
        tl.atomic_add(gz_ptr + b[:, None] * D + offs_d[None, :], acc, mask=valid[:, None] & md[None, :])


@triton.jit
def _flow_step_param_bwd_kernel(
    block_ptr_ptr,  # (K + 1,) int32: field k owns row blocks block_ptr[k] .. block_ptr[k+1]-1
    rows_ptr,  # (Npad,) int64: sample of each padded row (used when B_GATHER)
    a_ptr, stride_an,  # (Npad, P): left factor, padded rows (padding rows are zeros)
    b_ptr, stride_bn, stride_bq,  # (Npad, Q) padded rows, or (B, Q) gathered by rows when B_GATHER
    out_ptr, stride_ok, stride_op, stride_oq,  # (K, P, Q) out: sum over field k's rows of a^T b
    P, Q,  # sizes of the output tile space
    B_GATHER: tl.constexpr,  # b is indexed by sample (z), not by padded row
    B_ONES: tl.constexpr,  # b is a column of ones: column sums of a (Q = 1)
    ACCUMULATE: tl.constexpr,  # add to out instead of overwriting
    INPUT_PRECISION: tl.constexpr,  # tl.dot operands: see _dot
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,  # tile sizes
):
    # One program owns one (P, Q) tile of one field and walks that field's row blocks in order:
    # a deterministic reduction without atomics.
    k = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tl.program_id(2).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mp = offs_p < P
    mq = offs_q < Q
    start = tl.load(block_ptr_ptr + k).to(tl.int64)
    end = tl.load(block_ptr_ptr + k + 1).to(tl.int64)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    # rows in chunks of 16 whatever BLOCK_M: the FMA product holds its K = rows operand tiles in
    # registers (K = 64 spilled 250 B with bf16 z, sm_80/sm_90)
    for row in range(start * BLOCK_M, end * BLOCK_M, 16):
        offs_m = row + tl.arange(0, 16)
        at = tl.load(a_ptr + offs_m[None, :] * stride_an + offs_p[:, None], mask=mp[:, None], other=0.0)
        if B_ONES:
            colsum += tl.sum(at, 1)
        else:
            if B_GATHER:
                bi = tl.load(rows_ptr + offs_m)
                ok = bi >= 0
                bi = tl.where(ok, bi, 0)
                bt = tl.load(b_ptr + bi[:, None] * stride_bn + offs_q[None, :] * stride_bq,
                             mask=ok[:, None] & mq[None, :], other=0.0).to(tl.float32)
            else:
                bt = tl.load(b_ptr + offs_m[:, None] * stride_bn + offs_q[None, :] * stride_bq,
                             mask=mq[None, :], other=0.0).to(tl.float32)
            acc = _dot(at, bt, acc, INPUT_PRECISION)
    if B_ONES:
        acc = colsum[:, None] + acc
    ptrs = out_ptr + k * stride_ok + offs_p[:, None] * stride_op + offs_q[None, :] * stride_oq
    m = mp[:, None] & mq[None, :]
    if ACCUMULATE:
        acc += tl.load(ptrs, mask=m, other=0.0)
    tl.store(ptrs, acc, mask=m)
