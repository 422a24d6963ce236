"""Latent grid transport: the Eulerian view of the flow (docs/maths.md section 3).

A density ``rho`` on a regular 2-D (or 3-D) grid over chosen latent coordinates (the others fixed),
a velocity sampled at the cell faces from the sparse field mix, and a conservative finite-volume
step of the continuity equation ``d rho / dt + div(rho v) = 0``.

Grid layout (d = 2 or 3 grid axes; cell ``i`` along axis a spans ``[lo_a + i dx_a, lo_a + (i+1) dx_a]``):

    rho:  (N1, N2)            or (N1, N2, N3)            cell averages
    u1:   (N1 + 1, N2)        or (N1 + 1, N2, N3)        velocity component 1 on the faces normal to axis 1
    u2:   (N1, N2 + 1)        or (N1, N2 + 1, N3)        component 2 on the faces normal to axis 2
    u3:                          (N1, N2, N3 + 1)        component 3 (3-D only)

Face ``f`` along axis a lies between cells ``f - 1`` and ``f``; faces ``0`` and ``N_a`` are the
domain boundary. ``velocity_faces`` is always the tuple ``(u1, u2[, u3])``.

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

Backends: ``torch`` (this module, the reference), ``cpu`` (C++ op ``sta::grid_transport`` from
csrc/cpu/grid_transport.cpp), ``cuda`` (csrc/cuda/grid_transport.cu) and ``triton``
(kernels/grid_transport.py). The compiled kernels share one per-cell body in csrc/flow_math.h.
``auto`` takes the fastest available for the tensor's device: cuda, triton, torch on a GPU; cpu,
torch on the CPU (the Triton interpreter is a test vehicle, never chosen automatically).
"""
from __future__ import annotations

import math
import numbers
import os
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "LatentGrid",
    "latent_grid",
    "grid_transport",
    "transport_for",
    "cfl_number",
    "grid_divergence",
    "grid_curl",
    "advect_particles",
    "GridBackend",
    "grid_backends",
    "select_grid_backend",
    "LIMITERS",
    "BOUNDARIES",
    "FACE_BOUND",
    "MAX_SUBSTEPS",
]

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


# ----------------------------------------------------------------------------------------------
# Sampling the field mix on a grid
# ----------------------------------------------------------------------------------------------

class LatentGrid(NamedTuple):
    """The sparse field mix sampled on a regular grid over latent coordinates ``dims``.

    d = len(dims) grid axes, ``shape = (N1, ..., Nd)``, D the latent size.

    dims:       the latent coordinates spanned by the grid axes, length d.
    coords:     per axis, (N_a,) cell-centre coordinates.
    edges:      per axis, (N_a + 1,) face coordinates.
    dx:         per axis, the cell width (floats).
    points:     (*shape, D) latent points of the cell centres (other coordinates = center).
    velocity:   (*shape, D) the full velocity of the mix at the cell centres.
    plane:      (*shape, d) its in-plane components ``velocity[..., dims]``.
    faces:      (u1, ..., ud): the normal in-plane component on the faces (layout of this module's
                docstring: u_a has N_a + 1 entries along axis a), ready for :func:`grid_transport`.
    div:        (*shape,) the analytic divergence of the mix at the centres (flow_step's ``div``).
                This is the full D-dimensional divergence; the in-plane divergence that
                :func:`grid_divergence` approximates equals it only when D == d or the
                out-of-plane components do not vary out of the plane.
    """

    dims: tuple
    coords: tuple
    edges: tuple
    dx: tuple
    points: Tensor
    velocity: Tensor
    plane: Tensor
    faces: tuple
    div: Tensor


def _as_real_tensor(name: str, value, like: Tensor, expected: str) -> Tensor:
    """``value`` (a tensor, a sequence or array of numbers) as a real tensor on ``like``'s dtype and
    device (keeps autograd history); a TypeError naming ``name`` for anything else (None, a
    string, ragged lists, bool or complex values)."""
    tensor = value
    if not isinstance(value, Tensor):
        try:
            tensor = None if isinstance(value, (str, bytes)) else torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            tensor = None
    if tensor is None or tensor.dtype == torch.bool or tensor.is_complex():
        got = f"{_dtype_name(tensor.dtype)} tensor" if tensor is not None else f"{type(value).__name__} {value!r:.60}"
        raise TypeError(f"{name}: expected {expected} (a real tensor or a sequence of numbers), got {got}")
    return tensor.to(dtype=like.dtype, device=like.device)


def _coefficients(name: str, g, K: int, B: int, like: Tensor) -> Optional[Tensor]:
    """Coefficients for every point: None, a number (every field), or (K,) (tensor or sequence)
    -> (B, K), or None when there is nothing to apply. Non-finite values propagate (flow_step)."""
    if g is None:
        return None
    if isinstance(g, numbers.Real) and not isinstance(g, bool):
        try:
            value = float(g)
        except OverflowError:  # an int beyond the float range
            raise ValueError(f"{name}: expected a float, got an int beyond the float range") from None
        return like.new_full((B, K), value) if K else None
    vec = _as_real_tensor(name, g, like, f"a float or (K,) = ({K},) coefficients, one per field")
    if tuple(vec.shape) not in ((K,), (1, K)):
        raise ValueError(f"{name}: expected a float or shape (K,) = ({K},) (one coefficient per field), "
                         f"got shape {tuple(vec.shape)}")
    return vec.reshape(1, K).expand(B, K) if K else None


def _int_tuple(name: str, value, expected: str) -> tuple:
    """``value`` as a tuple of Python ints, or an error naming ``name``."""
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__} {value!r:.60}") from None
    if any(not isinstance(v, numbers.Integral) or isinstance(v, bool) for v in items):
        raise ValueError(f"{name}: expected {expected}, got {value!r:.60}")
    return tuple(int(v) for v in items)


def _axis_ranges(extent, center: Tensor, dims: tuple) -> list:
    from .ops import real_number

    if isinstance(extent, numbers.Real) and not isinstance(extent, bool):
        half = real_number("extent", extent)
        if not half > 0:
            raise ValueError(f"extent: expected a positive half-width, got {extent!r}")
        ranges = [(float(center[d]) - half, float(center[d]) + half) for d in dims]
    else:
        try:
            ranges = [(float(lo), float(hi)) for lo, hi in extent]
        except (TypeError, ValueError, OverflowError):
            raise TypeError(f"extent: expected a positive float (half-width) or one (lo, hi) pair per grid "
                            f"axis, got {extent!r:.60}") from None
        if len(ranges) != len(dims) or any(not (math.isfinite(lo) and math.isfinite(hi) and hi > lo)
                                           for lo, hi in ranges):
            raise ValueError(f"extent: expected {len(dims)} finite (lo, hi) pairs with hi > lo, got {extent!r:.60}")
    largest = torch.finfo(center.dtype).max
    if any(abs(v) > largest for pair in ranges for v in pair):  # Inf grid coordinates in float32
        raise ValueError(f"extent: the grid spans {ranges}, beyond the range of {_dtype_name(center.dtype)}")
    return ranges


def latent_grid(fields, center, dims: Sequence[int] = (0, 1), extent=3.0, shape: Sequence[int] = (64, 64), *,
                g_pot=None, g_rot=None, t: float = 0.0, backend: str = "auto",
                differentiable: bool = False) -> LatentGrid:
    """Sample the sparse field mix on a regular grid over latent coordinates ``dims``.

    Every cell centre and every face centre becomes one latent point (coordinates outside ``dims``
    fixed at ``center``); all of them go through ONE :func:`sta.flow_step` call with ``dt = 1``,
    so every backend serves the grid. The velocity is ``z_next - z`` (rounding error
    ``eps * |z|``, i.e. ~1e-6 relative in float32 for |z| ~ 3 |v|).

    Args:
        fields: a :class:`sta.FieldBank` (its parameters' dtype and device are the grid's).
        center: (D,) the point the slice goes through (tensor or sequence of floats), finite.
        dims: the d = 2 or 3 distinct latent coordinates the grid spans.
        extent: a half-width (every axis spans ``center[dim] -+ extent``) or d ``(lo, hi)`` pairs.
        shape: d cell counts ``(N1, ..., Nd)``.
        g_pot: (Kp,) coefficients of the potential fields for the whole grid (a tensor or a
            sequence such as ``[1, 0, 0]``), one float for every field, or None (0).
        g_rot: (Kr,) coefficients of the rotational fields, likewise.
        t: the time at which the fields are evaluated.
        backend: the flow_step backend.
        differentiable: keep the autograd graph to the field parameters and coefficients (default
            False: the grid is evaluated under ``torch.no_grad()``, so the fast forward-only
            transport backends can take it).

    Returns:
        :class:`LatentGrid` (centre and face velocities, the analytic div, the in-plane components).

    Non-finite values: center, extent and the grid coordinates must be finite (ValueError naming
    the argument); coefficients, t and field parameters follow :func:`sta.flow_step` (a NaN
    coefficient gives NaN velocities, which :func:`grid_transport` then rejects).
    """
    from .fields import FieldBank
    from .ops import flow_step

    if not isinstance(fields, FieldBank):
        raise TypeError(f"fields: expected a sta.FieldBank, got {type(fields).__name__}")
    D = fields.dim
    like = next(fields.parameters())
    dims = _int_tuple("dims", dims, f"2 or 3 distinct latent coordinates in [0, {D})")
    if len(dims) not in (2, 3) or len(set(dims)) != len(dims) or any(not 0 <= d < D for d in dims):
        raise ValueError(f"dims: expected 2 or 3 distinct latent coordinates in [0, {D}), got {dims}")
    center = _as_real_tensor("center", center, like, f"a (D,) = ({D},) point")
    if center.shape != (D,):
        raise ValueError(f"center: expected shape (D,) = ({D},), got {tuple(center.shape)}")
    if not bool(torch.isfinite(center).all()):  # the grid's geometry: NaN would make every point NaN
        raise ValueError(f"center: expected finite coordinates, got {center.tolist()}")
    shape = _int_tuple("shape", shape, f"{len(dims)} positive ints (one cell count per grid axis)")
    if len(shape) != len(dims) or any(n < 1 for n in shape):
        raise ValueError(f"shape: expected {len(dims)} positive ints (one per grid axis), got {shape}")
    ranges = _axis_ranges(extent, center, dims)

    d = len(dims)
    edges = tuple(torch.linspace(lo, hi, n + 1, dtype=like.dtype, device=like.device)
                  for (lo, hi), n in zip(ranges, shape))
    coords = tuple(0.5 * (e[1:] + e[:-1]) for e in edges)
    dx = tuple((hi - lo) / n for (lo, hi), n in zip(ranges, shape))

    def points_on(axis_coords):
        mesh = torch.meshgrid(*axis_coords, indexing="ij")
        pts = center.expand(*mesh[0].shape, D).clone()
        for a in range(d):
            pts[..., dims[a]] = mesh[a]
        return pts

    # Cell centres, then the faces normal to each axis (coordinate a on the edges): one batch.
    blocks = [points_on(coords)] + [points_on(coords[:a] + (edges[a],) + coords[a + 1:]) for a in range(d)]
    flat = torch.cat([b.reshape(-1, D) for b in blocks])
    B = flat.shape[0]
    with torch.set_grad_enabled(torch.is_grad_enabled() and differentiable):
        out = flow_step(flat, t, _coefficients("g_pot", g_pot, fields.num_potential, B, like),
                        _coefficients("g_rot", g_rot, fields.num_rotational, B, like), fields, dt=1.0,
                        outputs=("z", "div"), backend=backend)
    velocity = out.z - flat
    sizes = [b.shape[:-1].numel() for b in blocks]
    parts = velocity.split(sizes)
    centre_v = parts[0].reshape(*shape, D)
    faces = tuple(parts[a + 1].reshape(*blocks[a + 1].shape[:-1], D)[..., dims[a]].contiguous() for a in range(d))
    return LatentGrid(dims=dims, coords=coords, edges=edges, dx=dx, points=blocks[0], velocity=centre_v,
                      plane=centre_v[..., list(dims)].contiguous(), faces=faces,
                      div=out.div[: sizes[0]].reshape(shape))


def advect_particles(fields, z: Tensor, logq: Tensor, time: float, steps: int, *, g_pot=None, g_rot=None,
                     t: float = 0.0, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """The Lagrangian picture: move particles ``z: (B, D)`` for ``time`` in ``steps`` Euler steps of
    :func:`sta.flow_step` (the field frozen at time ``t``, as on a :class:`LatentGrid`), carrying
    ``logq: (B,)`` by the continuity equation ``logq <- logq - dt * div``.

    ``g_pot: (Kp,)`` / ``g_rot: (Kr,)`` (or floats, or None) apply to every particle.
    Returns ``(z, logq)`` after ``time``.
    """
    from .ops import flow_step, real_number

    if not isinstance(z, Tensor):
        raise TypeError(f"z: expected a Tensor of shape (B, D), got {type(z).__name__}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    if not isinstance(logq, Tensor) or logq.shape != z.shape[:1]:
        raise ValueError(f"logq: expected shape (B,) = {tuple(z.shape[:1])}, got "
                         f"{tuple(logq.shape) if isinstance(logq, Tensor) else type(logq).__name__}")
    dt = real_number("time", time) / steps
    B = z.shape[0]
    gp = _coefficients("g_pot", g_pot, fields.num_potential, B, z)
    gr = _coefficients("g_rot", g_rot, fields.num_rotational, B, z)
    for _ in range(steps):
        out = flow_step(z, t, gp, gr, fields, dt=dt, outputs=("z", "div"), backend=backend)
        z, logq = out.z, logq - dt * out.div
    return z, logq


# ----------------------------------------------------------------------------------------------
# Validation shared by every backend
# ----------------------------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_rho(rho) -> Tensor:
    if not isinstance(rho, Tensor):
        raise TypeError(f"rho: expected a Tensor of shape (N1, N2) or (N1, N2, N3), got {type(rho).__name__}")
    if rho.dim() not in (2, 3):
        raise ValueError(f"rho: expected a 2-D (N1, N2) or 3-D (N1, N2, N3) density, got shape {tuple(rho.shape)}")
    if rho.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"rho: expected float32 or float64, got {_dtype_name(rho.dtype)}")
    if rho.numel() == 0:
        raise ValueError(f"rho: expected at least one cell per axis, got shape {tuple(rho.shape)}")
    return rho


def _raise_non_finite(named) -> None:
    """The error path of :func:`_screen`: ValueError naming the first of ``(label, tensor, what)``
    that holds a NaN/Inf (none does when only a sum or a rate overflowed: then it returns)."""
    for label, values, what in named:
        bad = ~torch.isfinite(values.detach())
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{label}: expected finite {what}, got {int(bad.sum())} NaN/Inf "
                             f"(first at index {first}: {values[first].item()})")


def _check_dx(dx, ndim: int) -> tuple:
    values = [dx] * ndim if isinstance(dx, numbers.Real) and not isinstance(dx, bool) else dx
    try:
        values = tuple(float(v) for v in values)
    except OverflowError:
        raise ValueError(f"dx: expected a positive finite float or {ndim} of them, got an int beyond "
                         f"the float range") from None
    except (TypeError, ValueError):
        raise TypeError(f"dx: expected a positive float or {ndim} positive floats, got {dx!r:.60}") from None
    if len(values) != ndim or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"dx: expected a positive finite float or {ndim} of them (one per axis), got {dx!r:.60}")
    return values


def _face_shape(shape: tuple, axis: int) -> tuple:
    return shape[:axis] + (shape[axis] + 1,) + shape[axis + 1:]


def _face_tuple(velocity_faces, name: str, d: Optional[int] = None) -> tuple:
    """``velocity_faces`` as a tuple of 2 or 3 (or ``d``) floating-point tensors of rank d."""
    want = "2 or 3" if d is None else str(d)
    if isinstance(velocity_faces, Tensor) or not isinstance(velocity_faces, (tuple, list)):
        raise TypeError(f"{name}: expected a tuple of {want} face tensors (u1, u2[, u3]), "
                        f"got {type(velocity_faces).__name__}")
    faces = tuple(velocity_faces)
    n = len(faces)
    if (n not in (2, 3)) if d is None else n != d:
        raise ValueError(f"{name}: expected a tuple of {want} face tensors (u1, u2[, u3]), got {n}")
    for a, u in enumerate(faces):
        if not isinstance(u, Tensor):
            raise TypeError(f"{name}[{a}]: expected a Tensor, got {type(u).__name__}")
        if not u.is_floating_point():  # as the centre form: no bool, integer or complex velocities
            raise TypeError(f"{name}[{a}]: expected a floating-point tensor, got {_dtype_name(u.dtype)}")
        if u.dim() != n:
            raise ValueError(f"{name}[{a}]: expected a rank-{n} tensor (one per grid axis), got shape "
                             f"{tuple(u.shape)}")
    return faces


def _cells_of_faces(faces: tuple, name: str) -> tuple:
    """The cell shape ``(N1, ..., Nd)`` read from ``u1: (N1 + 1, N2, ...)``; the other faces are
    then checked against it (so a mismatch is blamed on them, not on u1)."""
    u1 = faces[0]
    if u1.shape[0] < 2 or 0 in u1.shape:
        raise ValueError(f"{name}[0]: expected shape (N1 + 1, N2[, N3]) with at least one cell per axis, "
                         f"got {tuple(u1.shape)}")
    return (u1.shape[0] - 1,) + tuple(u1.shape[1:])


def _check_faces(velocity_faces, rho: Tensor, name: str = "velocity_faces") -> tuple:
    """Face velocities checked against the cells ``rho`` (shape, dtype, device): a tuple of
    contiguous tensors. ``rho`` may be a placeholder of the cells' shape (cfl_number, grid_divergence).
    Their values are screened by :func:`_screen`."""
    d = rho.dim()
    shape = tuple(rho.shape)
    expected = [_face_shape(shape, a) for a in range(d)]
    faces = []
    for a, (u, exp) in enumerate(zip(_face_tuple(velocity_faces, name, d), expected)):
        face = f"{name}[{a}]"
        if tuple(u.shape) != exp:
            raise ValueError(f"{face}: expected shape {exp} (N_{a + 1} + 1 faces along axis {a} for cells of "
                             f"shape {shape}), got {tuple(u.shape)}")
        if u.dtype != rho.dtype:
            raise TypeError(f"{face}: expected dtype {_dtype_name(rho.dtype)} (that of rho), got {_dtype_name(u.dtype)}")
        if u.device != rho.device:
            raise ValueError(f"{face}: expected device {rho.device} (that of rho), got {u.device}")
        faces.append(u.contiguous())
    return tuple(faces)


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


# ----------------------------------------------------------------------------------------------
# Backends of grid_transport
# ----------------------------------------------------------------------------------------------

class GridBackend:
    """One implementation of the finite-volume step: ``why_not(rho)`` and ``transport``."""

    name = "base"

    def why_not(self, rho: Tensor, needs_grad: bool = False) -> list:
        """Reasons this backend cannot step ``rho`` (with autograd if ``needs_grad``); empty if it can."""
        return []

    def transport(self, rho: Tensor, faces: tuple, coef: tuple, periodic: bool, limiter: str) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<sta grid backend {self.name!r}>"


class _TorchGrid(GridBackend):
    name = "torch"

    def transport(self, rho, faces, coef, periodic, limiter):
        return transport_reference(rho, faces, coef, periodic, limiter)


_fake_registered = False


def _compiled_op():
    """``(torch.ops.sta.grid_transport, None)`` once the extension is loaded, else ``(None, reason)``."""
    global _fake_registered
    try:
        from . import _extension  # owned by the cpu backend: loads sta._C or builds it just in time
    except Exception as err:
        return None, f"the C++ extension loader failed: {type(err).__name__}: {err}"
    if _extension.load() is None:
        return None, f"the C++ extension is not available: {_extension.error()}"
    try:
        op = torch.ops.sta.grid_transport
    except (AttributeError, RuntimeError):
        return None, "the loaded extension has no sta::grid_transport op (rebuild: pip install --no-build-isolation -e .)"
    if not _fake_registered:  # static output shape: lets torch.compile / opcheck trace the op
        try:
            torch.library.register_fake("sta::grid_transport")(_grid_transport_fake)
        except RuntimeError:  # already registered (module reloaded)
            pass
        _fake_registered = True
    return op, None


def _grid_transport_fake(rho, u0, u1, u2, c0, c1, c2, periodic, limiter):
    return torch.empty_like(rho, memory_format=torch.contiguous_format)


class _CompiledGrid(GridBackend):
    """The C++ op ``sta::grid_transport`` (CPU kernel, and the CUDA kernel where built)."""

    def __init__(self, name: str, device_type: str):
        self.name, self.device_type = name, device_type

    def why_not(self, rho, needs_grad=False):
        reasons = ["not differentiable (the torch backend is)"] if needs_grad else []
        if rho.device.type != self.device_type:
            reasons.append(f"needs a {self.device_type} tensor, got {rho.device.type}")
        op, reason = _compiled_op()
        if op is None:
            reasons.append(reason)
        elif self.device_type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
                "sta::grid_transport", "CUDA"):
            reasons.append("the extension was built without CUDA")
        return reasons

    def transport(self, rho, faces, coef, periodic, limiter):
        u3 = faces[2] if len(faces) == 3 else rho.new_empty(0)
        c3 = coef[2] if len(coef) == 3 else 0.0
        return torch.ops.sta.grid_transport(rho.contiguous(), faces[0], faces[1], u3, coef[0], coef[1], c3,
                                            periodic, LIMITERS[limiter])


class _TritonGrid(GridBackend):
    name = "triton"

    def why_not(self, rho, needs_grad=False):
        reasons = ["not differentiable (the torch backend is)"] if needs_grad else []
        try:
            from .kernels import grid_transport as _  # noqa: F401
        except Exception as err:
            reasons.append(f"triton is not usable: {type(err).__name__}: {err}")
        if rho.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            reasons.append(f"needs a CUDA tensor (or TRITON_INTERPRET=1 on the CPU), got {rho.device.type}")
        return reasons

    def transport(self, rho, faces, coef, periodic, limiter):
        from .kernels.grid_transport import grid_transport_fwd

        return grid_transport_fwd(rho.contiguous(), faces, coef, periodic, LIMITERS[limiter])


_GRID_BACKENDS = {
    "torch": _TorchGrid(),
    "cpu": _CompiledGrid("cpu", "cpu"),
    "triton": _TritonGrid(),
    "cuda": _CompiledGrid("cuda", "cuda"),
}
#: auto, fastest first, per device type (the Triton interpreter is never picked automatically).
_GRID_AUTO = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


def grid_backends() -> list:
    """Every grid transport backend, reference first."""
    return list(_GRID_BACKENDS.values())


def select_grid_backend(rho: Tensor, backend: str = "auto", needs_grad: bool = False) -> GridBackend:
    """The backend that runs grid_transport on ``rho``; a named one runs or raises with its reasons.

    ``needs_grad``: a backward will follow (only the torch reference is differentiable)."""
    from .backends import BACKEND_NAMES, BackendUnavailableError, requested_backend

    name = requested_backend(backend)
    if name != "auto":
        chosen = _GRID_BACKENDS[name]
        reasons = chosen.why_not(rho, needs_grad)
        if reasons:
            raise BackendUnavailableError(f"backend {name!r} cannot run grid_transport: " + "; ".join(reasons)
                                          + ". Use backend='auto' to fall back.")
        return chosen
    for candidate in _GRID_AUTO.get(rho.device.type, ("torch",)):
        if candidate in BACKEND_NAMES and not _GRID_BACKENDS[candidate].why_not(rho, needs_grad):
            return _GRID_BACKENDS[candidate]
    return _GRID_BACKENDS["torch"]


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------

def _check_dt(dt, name: str = "dt") -> float:
    """A step or a duration: a finite float >= 0 (TypeError / ValueError naming ``name``)."""
    from .ops import real_number

    value = real_number(name, dt)
    if value < 0:
        raise ValueError(f"{name}: expected a finite float >= 0, got {dt!r}")
    return value


def _check_courant(dt: float, dx: tuple, dtype: torch.dtype, name: str) -> None:
    """dt / dx_a must be finite in rho's dtype: an Inf Courant factor times a zero flux is NaN."""
    largest = torch.finfo(dtype).max
    if any(dt / h > largest for h in dx):
        raise ValueError(f"{name}: {name} / dx = {max(dt / h for h in dx):.4g} is not finite in "
                         f"{_dtype_name(dtype)} (largest {largest:.4g})")


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
    return _step(rho, faces, dx, dt, boundary, limiter, select_grid_backend(rho, backend, _needs_grad(rho, faces)))


def _needs_grad(rho: Tensor, faces: tuple) -> bool:
    return torch.is_grad_enabled() and (rho.requires_grad or any(u.requires_grad for u in faces))


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
    impl = select_grid_backend(rho, backend, _needs_grad(rho, faces))
    for _ in range(steps):
        nxt = _step(rho, faces, dx, time / steps, boundary, limiter, impl)
        if time_order == 2:
            nxt = 0.5 * (rho + _step(nxt, faces, dx, time / steps, boundary, limiter, impl))
        rho = nxt
    return rho


def grid_divergence(velocity, dx) -> Tensor:
    """Divergence on the grid by central differences.

    Args:
        velocity: either the face velocities ``(u1, u2[, u3])`` (layout of :func:`grid_transport`),
            giving the compact difference ``sum_a (u_a[i + 1] - u_a[i]) / dx_a`` at the cell centres
            (exactly the divergence the finite-volume step sees), or centre velocities
            ``(N1, N2, 2)`` / ``(N1, N2, N3, 3)``, giving ``sum_a d v_a / d x_a`` by second-order
            central differences (one-sided second order at the edges).
        dx: the cell width, a positive float or one per axis.

    Returns:
        (N1, N2) or (N1, N2, N3): the in-plane divergence at the cell centres.

    Plain torch differences on every backend: a NaN/Inf velocity propagates to the cells whose
    differences use it (so does :func:`grid_curl`). Non-floating (bool, integer, complex)
    velocities are a TypeError in both forms.
    """
    if isinstance(velocity, (tuple, list)):
        faces = _face_tuple(velocity, "velocity")
        cells = faces[0].new_empty(_cells_of_faces(faces, "velocity"))  # shape, dtype, device only
        faces = _check_faces(faces, cells, name="velocity")
        h = _check_dx(dx, len(faces))
        return sum(torch.diff(u, dim=a) / h[a] for a, u in enumerate(faces))
    v = _check_centre_velocity(velocity)
    d = v.shape[-1]
    h = _check_dx(dx, d)
    return sum(_central(v[..., a], a, h[a]) for a in range(d))


def grid_curl(velocity: Tensor, dx) -> Tensor:
    """Curl of centre velocities by second-order central differences (one-sided at the edges).

    Args:
        velocity: (N1, N2, 2) or (N1, N2, N3, 3) in-plane components at the cell centres
            (e.g. :attr:`LatentGrid.plane`).
        dx: the cell width, a positive float or one per axis.

    Returns:
        2-D: (N1, N2) scalar vorticity ``d v2/d x1 - d v1/d x2``;
        3-D: (N1, N2, N3, 3) the curl vector.
    """
    v = _check_centre_velocity(velocity)
    d = v.shape[-1]
    h = _check_dx(dx, d)

    def partial(comp, axis):
        return _central(v[..., comp], axis, h[axis])

    if d == 2:
        return partial(1, 0) - partial(0, 1)
    return torch.stack([partial(2, 1) - partial(1, 2), partial(0, 2) - partial(2, 0), partial(1, 0) - partial(0, 1)], -1)


def _check_centre_velocity(velocity) -> Tensor:
    if not isinstance(velocity, Tensor):
        raise TypeError(f"velocity: expected a Tensor (N1, N2, 2) / (N1, N2, N3, 3) or a tuple of face tensors, "
                        f"got {type(velocity).__name__}")
    if velocity.dim() not in (3, 4) or velocity.shape[-1] != velocity.dim() - 1:
        raise ValueError(f"velocity: expected shape (N1, N2, 2) or (N1, N2, N3, 3), got {tuple(velocity.shape)}")
    if any(n < 3 for n in velocity.shape[:-1]):
        raise ValueError(f"velocity: central differences need at least 3 cells per axis, got {tuple(velocity.shape)}")
    if not velocity.is_floating_point():
        raise TypeError(f"velocity: expected a floating-point tensor, got {_dtype_name(velocity.dtype)}")
    return velocity


def _central(f: Tensor, axis: int, h: float) -> Tensor:
    return torch.gradient(f, spacing=h, dim=axis, edge_order=2)[0]
