"""The op ``grid_transport``: one conservative finite-volume step of the continuity equation on the
grid of :mod:`sta.grid` -- its definition, checks, CFL number and torch reference -- and
:func:`transport_for`, which sub-steps a whole time interval.

The finite-volume step (:func:`grid_transport`), per axis a with Courant factor ``c_a = dt / dx_a``:

    slope   s_i = limiter(rho_i - rho_{i-1}, rho_{i+1} - rho_i)      (0 for "upwind")
    states  L_f = rho_{f-1} + s_{f-1} / 2,   R_f = rho_f - s_f / 2     (MUSCL reconstruction at face f)
    flux    F_f = max(u_f, 0) L_f + min(u_f, 0) R_f                    (upwind)
    update  rho_i <- rho_i - sum_a c_a (F_{i+1} - F_i)

Limiters: ``minmod(a, b) = a if |a| < |b| else b`` when ``ab > 0``, else 0; van Leer
``2ab / (a + b)`` when ``ab > 0``, else 0. Boundaries: ``"zero_flux"`` sets ``F_0 = F_N = 0`` (the
boundary faces' velocities are ignored; ghost cells copy the edge cell, so the edge slope is 0);
``"periodic"`` wraps the cells and makes face ``N_a`` the same face as face 0 (their velocities must
agree). Every flux leaves one cell and enters its neighbour, so the total mass ``sum(rho)`` is
conserved exactly up to rounding.

Positivity (the CFL condition): with non-negative ``rho`` the limited face states satisfy
``0 <= L, R <= kappa rho_cell`` with ``kappa = 1`` (upwind), ``3/2`` (minmod) or ``2`` (van Leer), and
inflows are non-negative, so ``rho_i`` stays non-negative whenever its outflow is at most rho_i.
This module's CFL number is therefore

    cfl = kappa * dt * max over cells of sum over the cell's faces of (outgoing normal speed / dx_a)

(the sum of the outgoing Courant numbers of a cell, in all axes at once: the scheme is unsplit,
weighted by the limiter's bound). ``cfl <= 1`` guarantees ``rho_new >= 0``; :func:`grid_transport`
raises when ``cfl > 1`` and names the largest stable ``dt``. One step is forward Euler in time
(first order) and second order in space where the density is smooth (the limiter drops it to
first order at extrema); :func:`transport_for` sub-steps a whole time interval with ``cfl <= 0.9``
and by default combines two steps into the SSP Heun scheme, second order in time.

Backends (registered in :mod:`sta.backends`): ``torch`` (:func:`transport_reference`, this module,
differentiable), ``cpu`` (C++ op ``sta::grid_transport`` from csrc/cpu/grid_transport.cpp), ``cuda``
(csrc/cuda/grid_transport.cu) and ``triton`` (kernels/grid_transport.py). The compiled kernels share
one per-cell body in csrc/flow_math.h. ``auto`` takes the fastest available for the tensor's device:
cuda, triton, torch on a GPU; cpu, torch on the CPU (the Triton interpreter is a test vehicle, never
chosen automatically).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from ..backends import Backend, Request, define_op, register, select
from .checks import _cells_of_faces, _check_courant, _check_dt, _check_dx, _check_faces, _check_rho, _face_tuple

__all__ = ["grid_transport", "transport_for", "cfl_number", "transport_reference", "LIMITERS", "BOUNDARIES",
           "FACE_BOUND", "MAX_SUBSTEPS"]

#: Limiter name -> the integer code the compiled kernels take.
LIMITERS = {"upwind": 0, "minmod": 1, "van_leer": 2}
#: Largest face state / cell value a limited reconstruction of non-negative data can produce (kappa).
FACE_BOUND = {"upwind": 1.0, "minmod": 1.5, "van_leer": 2.0}
BOUNDARIES = ("zero_flux", "periodic")
#: transport_for's target CFL number: a margin below the positivity bound of 1.
SUBSTEP_CFL = 0.9
#: transport_for refuses a run that needs more sub-steps than this (a 64 x 64 step takes ~0.1 ms
#: on the cpu backend, so this is minutes of work, and far more means a velocity is wrong).
MAX_SUBSTEPS = 1_000_000

#: An implementation defines ``transport(rho, faces, coef, periodic, limiter) -> rho_new``: one step
#: with ``coef[a] = dt / dx_a`` on checked inputs (contiguous faces; ``limiter`` a name of LIMITERS).
define_op("grid_transport", ("transport",))


# ----------------------------------------------------------------------------------------------
# The non-finite policy and the CFL number
# ----------------------------------------------------------------------------------------------

def _raise_non_finite(named) -> None:
    """The error path of :func:`_screen`: ValueError naming the first of ``(label, tensor, what)``
    that holds a NaN/Inf (none does when only a sum or a rate overflowed: then it returns)."""
    for label, values, what in named:
        bad = ~torch.isfinite(values.detach())
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{label}: expected finite {what}, got {int(bad.sum())} NaN/Inf "
                             f"(first at index {first}: {values[first].item()})")



def _screen(rho: Optional[Tensor], faces: tuple, dx: tuple, boundary: str) -> tuple:
    """The non-finite policy of the transport ops and the CFL rate, in one host sync.

    rho (or None) and the faces that carry flux -- every face when periodic, the interior ones
    with zero flux -- must be finite (ValueError naming ``rho`` or ``velocity_faces[a]``). The
    zero-flux boundary faces are ignored whatever they hold: a face whose boundary values are not
    finite is replaced by a copy with zeros there, so that no backend sees them (finite ones are
    already ignored by every backend). A NaN/Inf anywhere in a flux-carrying face makes the
    largest outgoing rate NaN/Inf, and one in rho makes its sum NaN/Inf, so the finite case costs
    one reduction on top of the CFL rate.

    Returns ``(faces, max outgoing rate)`` (the rate as in :func:`_outgoing_rate`; it may be Inf
    or NaN only if it overflowed, which the CFL checks then reject).
    """
    rate = _outgoing_rate(faces, dx, boundary)
    with torch.no_grad():
        probes = [rate.max() if rate.numel() else rate.new_zeros(())]
        probes += [rho.sum()] if rho is not None else []
        ends = []
        if boundary == "zero_flux":
            ends = [u.narrow(a, 0, 1).sum() + u.narrow(a, u.shape[a] - 1, 1).sum() for a, u in enumerate(faces)]
        values = torch.stack(probes + ends).tolist()  # rho and the faces share one dtype
    if not all(math.isfinite(v) for v in values[:len(probes)]):
        _raise_non_finite(([("rho", rho, "densities")] if rho is not None else [])
                          + [(f"velocity_faces[{a}]", u if boundary == "periodic" else _zero_ends(u, a),
                              "velocities on the faces that carry flux") for a, u in enumerate(faces)])
    faces = list(faces)
    for a, end in enumerate(values[len(probes):]):
        if not math.isfinite(end):
            faces[a] = _zero_ends(faces[a], a)
    if boundary == "periodic":
        for a, u in enumerate(faces):
            n = u.shape[a] - 1
            first, last = u.narrow(a, 0, 1), u.narrow(a, n, 1)
            scale = u.abs().max() if u.numel() else 0.0
            if not bool(((first - last).abs() <= 1e-6 * scale + torch.finfo(u.dtype).tiny).all()):
                raise ValueError(f"velocity_faces[{a}]: with boundary='periodic' faces 0 and {n} along axis {a} "
                                 f"are the same face and must carry the same velocity")
    return tuple(faces), values[0]


def _zero_ends(u: Tensor, axis: int) -> Tensor:
    """A copy of face velocities ``u`` with its two boundary faces along ``axis`` set to 0."""
    u = u.clone()
    u.narrow(axis, 0, 1).zero_()
    u.narrow(axis, u.shape[axis] - 1, 1).zero_()
    return u


def _check_options(boundary: str, limiter: str) -> None:
    # isinstance first: a list is unhashable, and `in` on the LIMITERS dict would raise TypeError
    if not isinstance(boundary, str) or boundary not in BOUNDARIES:
        raise ValueError(f"boundary: expected one of {BOUNDARIES}, got {boundary!r:.60}")
    if not isinstance(limiter, str) or limiter not in LIMITERS:
        raise ValueError(f"limiter: expected one of {tuple(LIMITERS)}, got {limiter!r:.60}")


def _outgoing_rate(faces: tuple, dx: tuple, boundary: str) -> Tensor:
    """Per cell, sum over its faces of outgoing normal speed / dx: shape of rho (no autograd)."""
    shape = (faces[1].shape[0],) + tuple(faces[0].shape[1:])
    total = faces[0].new_zeros(shape)
    with torch.no_grad():
        for a, (u, h) in enumerate(zip(faces, dx)):
            n = u.shape[a] - 1
            if boundary == "periodic":  # face n is face 0
                total.add_(u.narrow(a, 1, n).clamp(min=0), alpha=1.0 / h)    # out of cell i through face i + 1
                total.sub_(u.narrow(a, 0, n).clamp(max=0), alpha=1.0 / h)    # out of cell i through face i
            elif n > 1:  # zero flux: only the interior faces 1 .. n-1 carry flux
                inner = u.narrow(a, 1, n - 1)
                total.narrow(a, 0, n - 1).add_(inner.clamp(min=0), alpha=1.0 / h)
                total.narrow(a, 1, n - 1).sub_(inner.clamp(max=0), alpha=1.0 / h)
    return total


def cfl_number(velocity_faces, dx, dt: float, *, boundary: str = "zero_flux", limiter: str = "van_leer") -> float:
    """The CFL number of one :func:`grid_transport` step (module docstring): positivity needs <= 1.

    ``kappa(limiter) * dt * max_cells sum_faces outgoing_speed / dx_a``. The faces that carry flux
    must be finite (ValueError naming the face tensor), as in :func:`grid_transport`.
    """
    _check_options(boundary, limiter)
    faces = _face_tuple(velocity_faces, "velocity_faces")
    cells = faces[0].new_empty(_cells_of_faces(faces, "velocity_faces"))  # shape, dtype, device only
    faces = _check_faces(faces, cells)
    dx, dt = _check_dx(dx, len(faces)), _check_dt(dt)
    _, rate = _screen(None, faces, dx, boundary)
    return _cfl(rate, dt, limiter)


def _cfl(rate: float, dt: float, limiter: str) -> float:
    """``kappa * dt * rate``; dt = 0 moves nothing (and 0 * Inf would be NaN)."""
    return 0.0 if dt == 0 and math.isfinite(rate) else FACE_BOUND[limiter] * dt * rate



# ----------------------------------------------------------------------------------------------
# The torch reference of one finite-volume step
# ----------------------------------------------------------------------------------------------

def _limited_slope(a: Tensor, b: Tensor, limiter: str) -> Tensor:
    """Limited cell slope from the backward and forward differences a, b (module docstring)."""
    ab = a * b
    if limiter == "minmod":
        return torch.where(ab > 0, torch.where(a.abs() < b.abs(), a, b), torch.zeros_like(a))
    # van Leer: harmonic mean; the safe denominator keeps the unselected branch finite.
    return torch.where(ab > 0, 2 * ab / torch.where(ab > 0, a + b, torch.ones_like(a)), torch.zeros_like(a))


def _flux_difference(rho: Tensor, u: Tensor, axis: int, periodic: bool, limiter: str) -> Tensor:
    """``F_{i+1} - F_i`` along ``axis`` for every cell (shape of rho)."""
    n = rho.shape[axis]
    idx = torch.arange(-2, n + 2, device=rho.device)
    idx = idx.remainder(n) if periodic else idx.clamp(0, n - 1)
    ext = rho.index_select(axis, idx)                      # cells -2 .. n+1
    cells = ext.narrow(axis, 1, n + 2)                     # cells -1 .. n
    if limiter == "upwind":
        hi = lo = cells
    else:
        diff = ext.narrow(axis, 1, n + 3) - ext.narrow(axis, 0, n + 3)
        slope = _limited_slope(diff.narrow(axis, 0, n + 2), diff.narrow(axis, 1, n + 2), limiter)
        hi, lo = cells + 0.5 * slope, cells - 0.5 * slope
    left = hi.narrow(axis, 0, n + 1)                       # face f: state of cell f - 1
    right = lo.narrow(axis, 1, n + 1)                      # face f: state of cell f
    if periodic:  # face n is face 0
        u = torch.cat([u.narrow(axis, 0, n), u.narrow(axis, 0, 1)], axis)
    flux = u.clamp(min=0) * left + u.clamp(max=0) * right
    if not periodic:
        keep = torch.ones(n + 1, dtype=rho.dtype, device=rho.device)
        keep[0] = keep[n] = 0
        flux = flux * keep.reshape([-1 if i == axis else 1 for i in range(rho.dim())])
    return flux.narrow(axis, 1, n) - flux.narrow(axis, 0, n)


def transport_reference(rho: Tensor, faces: tuple, coef: tuple, periodic: bool, limiter: str) -> Tensor:
    """One step with ``coef[a] = dt / dx_a``, no checks (the torch backend; differentiable)."""
    out = rho
    for a, (u, c) in enumerate(zip(faces, coef)):
        out = out - c * _flux_difference(rho, u, a, periodic, limiter)
    return out



class TorchGridTransport(Backend):
    """The reference on any device, differentiable (autograd through :func:`transport_reference`)."""

    op = "grid_transport"
    name = "torch"

    def transport(self, rho, faces, coef, periodic, limiter):
        return transport_reference(rho, faces, coef, periodic, limiter)


register(TorchGridTransport())


# ----------------------------------------------------------------------------------------------
# The public ops
# ----------------------------------------------------------------------------------------------

def grid_transport(rho: Tensor, velocity_faces, dx, dt: float, *, boundary: str = "zero_flux",
                   limiter: str = "van_leer", backend: str = "auto") -> Tensor:
    """One conservative finite-volume step of ``d rho/dt + div(rho u) = 0`` (module docstring).

    Args:
        rho: (N1, N2) or (N1, N2, N3) cell densities, float32 or float64.
        velocity_faces: ``(u1, u2[, u3])``, u_a the normal velocity on the faces of axis a, shape of
            rho with ``N_a + 1`` along axis a (e.g. u1: (N1 + 1, N2), u2: (N1, N2 + 1)).
        dx: the cell width, one positive float or one per axis.
        dt: the step, >= 0; the CFL number (:func:`cfl_number`) must be <= 1.
        boundary: "zero_flux" (no flux through the domain boundary; the boundary faces' velocities
            are ignored) or "periodic" (face N_a is face 0; their velocities must agree).
        limiter: "van_leer" (default), "minmod" or "upwind" (first order).
        backend: "auto", "torch", "cpu", "triton" or "cuda".

    Returns:
        rho after the step, the shape of rho. ``rho_new.sum() == rho.sum()`` up to rounding, and
        ``rho >= 0`` implies ``rho_new >= 0``. Differentiable with the torch backend (``auto``
        picks it when rho or a face velocity requires grad); the compiled backends are forward only.

    Raises:
        TypeError / ValueError naming the argument (shapes, dtypes, devices, dx <= 0, ...), and
        ValueError when the CFL number exceeds 1 (the message gives the largest stable dt).

    Non-finite values (the same on every backend, checked before dispatch): a NaN/Inf in rho or
    in a face velocity that carries flux is a ValueError naming ``rho`` or
    ``velocity_faces[a]``; with "zero_flux" the boundary faces are ignored whatever they hold
    (also NaN/Inf); dx, dt and dt / dx (in rho's dtype) must be finite.
    """
    rho = _check_rho(rho)
    _check_options(boundary, limiter)
    dx = _check_dx(dx, rho.dim())
    dt = _check_dt(dt)
    _check_courant(dt, dx, rho.dtype, "dt")
    faces, rate = _screen(rho, _check_faces(velocity_faces, rho), dx, boundary)
    cfl = _cfl(rate, dt, limiter)
    if not cfl <= 1:  # also NaN: a rate that overflowed
        raise ValueError(f"dt: the CFL number is {cfl:.4g} > 1 (limiter {limiter!r} needs "
                         f"{FACE_BOUND[limiter]:g} * dt * max outgoing |u|/dx per cell <= 1 for positivity); "
                         f"the largest stable dt is {dt / cfl:.6g}, or use sta.transport_for to sub-step")
    return _step(rho, faces, dx, dt, boundary, limiter, _select(rho, faces, backend))


def _select(rho: Tensor, faces: tuple, backend: str) -> Backend:
    """The implementation that steps ``rho`` (:func:`sta.backends.select`); a backward follows when
    rho or a face velocity requires grad, and only the torch reference is differentiable."""
    needs_grad = torch.is_grad_enabled() and (rho.requires_grad or any(u.requires_grad for u in faces))
    return select(Request("grid_transport", rho.device, rho.dtype, needs_grad), backend)


def _step(rho, faces, dx, dt, boundary, limiter, impl) -> Tensor:
    coef = tuple(dt / h for h in dx)
    return impl.transport(rho, faces, coef, boundary == "periodic", limiter)


def transport_for(rho: Tensor, velocity_faces, dx, time: float = 1.0, *, boundary: str = "zero_flux",
                  limiter: str = "van_leer", cfl: float = SUBSTEP_CFL, time_order: int = 2,
                  backend: str = "auto") -> Tensor:
    """Transport ``rho`` for ``time`` in equal sub-steps of :func:`grid_transport`.

    The number of sub-steps is the smallest n with CFL number ``<= cfl`` (default 0.9) for
    ``dt = time / n``, at least 1. ``time_order=1``: each sub-step is one forward-Euler step
    (first order in time, so first order overall at a fixed CFL); ``time_order=2`` (default): the
    strong-stability-preserving Heun scheme ``rho1 = S(rho), rho <- (rho + S(rho1)) / 2`` with S one
    step: second order in time, and a convex combination of positive conservative steps, so mass
    and positivity hold under the same CFL condition (twice the work). Other arguments as in
    :func:`grid_transport`; ``time`` is a finite float >= 0. Returns rho after ``time``.

    Non-finite values as in :func:`grid_transport`; a run that would need more than
    :data:`MAX_SUBSTEPS` sub-steps is a ValueError naming ``time`` (instead of running for hours).
    """
    rho = _check_rho(rho)
    _check_options(boundary, limiter)
    dx = _check_dx(dx, rho.dim())
    time = _check_dt(time, "time")
    if not isinstance(cfl, numbers.Real) or isinstance(cfl, bool) or not 0 < cfl <= 1:
        raise ValueError(f"cfl: expected a target CFL number in (0, 1], got {cfl!r:.60}")
    if time_order not in (1, 2) or isinstance(time_order, bool):
        raise ValueError(f"time_order: expected 1 (forward Euler) or 2 (SSP Heun), got {time_order!r:.60}")
    faces, rate = _screen(rho, _check_faces(velocity_faces, rho), dx, boundary)
    total = _cfl(rate, time, limiter) / cfl
    if not total <= MAX_SUBSTEPS:
        raise ValueError(f"time: transporting for {time:g} at CFL {cfl:g} needs {total:.4g} sub-steps "
                         f"(more than {MAX_SUBSTEPS}); shorten time or check velocity_faces (largest |u| "
                         f"{max(float(u.abs().max()) for u in faces):.4g})")
    steps = max(1, math.ceil(total))
    _check_courant(time / steps, dx, rho.dtype, "time")
    impl = _select(rho, faces, backend)
    for _ in range(steps):
        nxt = _step(rho, faces, dx, time / steps, boundary, limiter, impl)
        if time_order == 2:
            nxt = 0.5 * (rho + _step(nxt, faces, dx, time / steps, boundary, limiter, impl))
        rho = nxt
    return rho

