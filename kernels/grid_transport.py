"""Triton kernel of one finite-volume grid transport step (sta.grid, docs/maths.md section 3).

The truth is :func:`sta.grid.transport_reference`; the formulas (MUSCL states with a minmod /
van Leer limiter, upwind flux, zero-flux or periodic boundaries) are in :mod:`sta.grid.transport`'s
module docstring, and this kernel mirrors the per-cell body ``sta::grid::transport_cell`` of
csrc/flow_math.h line for line. One program updates BLOCK consecutive cells of the flattened grid;
each cell reads its 5-point line along every axis and the two face velocities per axis, and writes
its new density (no atomics: a face flux is recomputed by both of its cells, identically).

Layout (contiguous; a 2-D grid is ``n2 == 1`` with NDIM == 2):
    rho (n0, n1, n2);  u0 (n0 + 1, n1, n2);  u1 (n0, n1 + 1, n2);  u2 (n0, n1, n2 + 1)
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..backends.library import register_torch_op
from .launch import launch

__all__ = ["grid_transport_fwd", "grid_transport_op"]

#: Cells per program. 1024 keeps every load of a block in a few contiguous runs; fp32 512^2 on
#: the interpreter is not timed (too slow), on a GPU any of 256..2048 is bandwidth bound.
BLOCK = 1024
#: ... except 3-D or float64 grids: at 1024 cells (8 per thread, 4 warps) ptxas spilled 14 KB per
#: thread (3-D fp64, van Leer, sm_80), at 512 still 120 B; at 256 it needs 140 registers and no
#: spill (python -m sta.kernels.aot).
BLOCK_WIDE = 256


def block_for(ndim: int, dtype: torch.dtype) -> int:
    """Cells per program for a grid of ``ndim`` axes in ``dtype`` (spill-free on sm_80 / sm_90)."""
    return BLOCK if ndim == 2 and dtype == torch.float32 else BLOCK_WIDE


@triton.jit
def _neighbour(i, k, n, PERIODIC: tl.constexpr):
    """Cell i + k (k in -2..2) of n along an axis: wrapped, or clamped (zero-flux ghost = edge cell)."""
    j = i + k
    if PERIODIC:
        j = (j + 2 * n) % n
    else:
        j = tl.minimum(tl.maximum(j, 0), n - 1)
    return j


@triton.jit
def _limited_slope(a, b, LIMITER: tl.constexpr):
    """minmod (1) or van Leer (2) slope from the backward / forward differences a, b."""
    ab = a * b
    if LIMITER == 1:
        s = tl.where(tl.abs(a) < tl.abs(b), a, b)
    else:
        s = 2 * ab / tl.where(ab > 0, a + b, 1.0)
    return tl.where(ab > 0, s, 0.0)


@triton.jit
def _face_flux(u, m2, m1, p0, p1, LIMITER: tl.constexpr):
    """Upwind flux through the face between cells m1 (f - 1) and p0 (f)."""
    if LIMITER == 0:
        left = m1
        right = p0
    else:
        left = m1 + 0.5 * _limited_slope(m1 - m2, p0 - m1, LIMITER)
        right = p0 - 0.5 * _limited_slope(p0 - m1, p1 - p0, LIMITER)
    return tl.maximum(u, 0.0) * left + tl.minimum(u, 0.0) * right


@triton.jit
def _flux_difference(rho_ptr, base, stride, i, n, u_lo, u_hi, mask, PERIODIC: tl.constexpr,
                     LIMITER: tl.constexpr):
    """F_{i+1} - F_i along one axis; rho_ptr + base + j * stride is cell j of each cell's line."""
    c0 = tl.load(rho_ptr + base + _neighbour(i, -2, n, PERIODIC) * stride, mask=mask, other=0.0)
    c1 = tl.load(rho_ptr + base + _neighbour(i, -1, n, PERIODIC) * stride, mask=mask, other=0.0)
    c2 = tl.load(rho_ptr + base + i * stride, mask=mask, other=0.0)
    c3 = tl.load(rho_ptr + base + _neighbour(i, 1, n, PERIODIC) * stride, mask=mask, other=0.0)
    c4 = tl.load(rho_ptr + base + _neighbour(i, 2, n, PERIODIC) * stride, mask=mask, other=0.0)
    f_lo = _face_flux(u_lo, c0, c1, c2, c3, LIMITER)
    f_hi = _face_flux(u_hi, c1, c2, c3, c4, LIMITER)
    if not PERIODIC:  # no flux through the domain boundary
        f_lo = tl.where(i == 0, 0.0, f_lo)
        f_hi = tl.where(i == n - 1, 0.0, f_hi)
    return f_hi - f_lo


@triton.jit
def _grid_transport_fwd_kernel(
    rho_ptr,    # (n0, n1, n2) densities, contiguous
    u0_ptr,     # (n0 + 1, n1, n2) normal velocity on the faces of axis 0
    u1_ptr,     # (n0, n1 + 1, n2) ... of axis 1
    u2_ptr,     # (n0, n1, n2 + 1) ... of axis 2 (unused when NDIM == 2)
    coef_ptr,   # (3,) dt / dx_a in rho's dtype (a tensor, so float64 keeps its precision)
    out_ptr,    # (n0, n1, n2) new densities
    n0, n1, n2,               # grid size (n2 == 1 for 2-D)
    plane,                    # n1 * n2 (passed so int64 sizes stay int64)
    numel,                    # n0 * n1 * n2
    NDIM: tl.constexpr,       # 2 or 3
    PERIODIC: tl.constexpr,   # periodic (True) or zero-flux (False) boundaries
    LIMITER: tl.constexpr,    # 0 upwind, 1 minmod, 2 van Leer (sta.grid.LIMITERS)
    BLOCK: tl.constexpr,      # cells per program
):
    pid = tl.program_id(0).to(tl.int64)
    cell = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = cell < numel
    i2 = cell % n2
    line = cell // n2
    i1 = line % n1
    i0 = line // n1
    out = tl.load(rho_ptr + cell, mask=mask, other=0.0)

    # axis 0: faces i0 and i0 + 1 of u0 (face n0 is face 0 when periodic)
    lo = cell
    hi = lo + plane
    if PERIODIC:
        hi = tl.where(i0 == n0 - 1, i1 * n2 + i2, hi)
    u_lo = tl.load(u0_ptr + lo, mask=mask, other=0.0)
    u_hi = tl.load(u0_ptr + hi, mask=mask, other=0.0)
    c = tl.load(coef_ptr + 0)
    out = out - c * _flux_difference(rho_ptr, i1 * n2 + i2, plane, i0, n0, u_lo, u_hi, mask, PERIODIC, LIMITER)

    # axis 1: u1 is (n0, n1 + 1, n2)
    lo = (i0 * (n1 + 1) + i1) * n2 + i2
    hi = lo + n2
    if PERIODIC:
        hi = tl.where(i1 == n1 - 1, i0 * (n1 + 1) * n2 + i2, hi)
    u_lo = tl.load(u1_ptr + lo, mask=mask, other=0.0)
    u_hi = tl.load(u1_ptr + hi, mask=mask, other=0.0)
    c = tl.load(coef_ptr + 1)
    out = out - c * _flux_difference(rho_ptr, i0 * plane + i2, n2, i1, n1, u_lo, u_hi, mask, PERIODIC, LIMITER)

    if NDIM == 3:  # axis 2: u2 is (n0, n1, n2 + 1)
        lo = line * (n2 + 1) + i2
        hi = lo + 1
        if PERIODIC:
            hi = tl.where(i2 == n2 - 1, line * (n2 + 1), hi)
        u_lo = tl.load(u2_ptr + lo, mask=mask, other=0.0)
        u_hi = tl.load(u2_ptr + hi, mask=mask, other=0.0)
        c = tl.load(coef_ptr + 2)
        out = out - c * _flux_difference(rho_ptr, line * n2, 1, i2, n2, u_lo, u_hi, mask, PERIODIC, LIMITER)

    tl.store(out_ptr + cell, out, mask=mask)


def grid_transport_fwd(rho: torch.Tensor, faces: tuple, coef: tuple, periodic: bool, limiter: int) -> torch.Tensor:
    """Launch one step. rho: (N1, N2) or (N1, N2, N3) contiguous; faces: (u1, u2[, u3]) contiguous,
    layout of :mod:`sta.grid`; coef: dt / dx per axis; limiter: code of ``sta.grid.LIMITERS``.

    Inputs are validated by :func:`sta.grid.grid_transport`. Returns the new rho (same shape).
    """
    ndim = rho.dim()
    n0, n1 = rho.shape[0], rho.shape[1]
    n2 = rho.shape[2] if ndim == 3 else 1
    coef_t = torch.zeros(3, dtype=rho.dtype, device=rho.device)
    coef_t[:len(coef)] = torch.tensor(coef, dtype=rho.dtype)
    out = torch.empty_like(rho)
    u2 = faces[2] if ndim == 3 else faces[1]  # never read for 2-D
    block = block_for(ndim, rho.dtype)
    grid = (triton.cdiv(rho.numel(), block),)
    launch(_grid_transport_fwd_kernel, grid, rho, faces[0], faces[1], u2, coef_t, out, n0, n1, n2, n1 * n2,
           rho.numel(), NDIM=ndim, PERIODIC=bool(periodic), LIMITER=int(limiter), BLOCK=block)
    return out


# A registered torch op (schema + fake kernel), like the compiled ``sta::grid_transport``, so that
# torch.compile traces through it and torch.library.opcheck can check it. Forward only: the torch
# backend is the differentiable one.
def _grid_transport_impl(rho: torch.Tensor, u0: torch.Tensor, u1: torch.Tensor, u2: Optional[torch.Tensor],
                         coef: list[float], periodic: bool, limiter: int) -> torch.Tensor:
    """:func:`grid_transport_fwd` as the op ``sta::triton_grid_transport``: rho (N1, N2[, N3]); u0, u1
    (and u2 for a 3-D grid, else None) the face velocities; coef: dt / dx per axis."""
    faces = tuple(u.contiguous() for u in ((u0, u1) if u2 is None else (u0, u1, u2)))
    return grid_transport_fwd(rho.contiguous(), faces, tuple(coef), periodic, limiter)


def _grid_transport_fake(rho, u0, u1, u2, coef, periodic, limiter):
    return torch.empty_like(rho, memory_format=torch.contiguous_format)


grid_transport_op = register_torch_op("sta::triton_grid_transport", _grid_transport_fake, impl=_grid_transport_impl)
