"""Sampling the sparse field mix on a latent grid (:func:`latent_grid`), and moving particles
through it (:func:`advect_particles`): both through :func:`sta.flow_step`, so every backend serves them.

The grid layout (cells, faces) is that of :mod:`sta.grid`.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..backends import dtype_name
from ..fields import FieldBank
from ..ops import flow_step, real_number

__all__ = ["LatentGrid", "latent_grid", "advect_particles"]


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
        got = f"{dtype_name(tensor.dtype)} tensor" if tensor is not None else f"{type(value).__name__} {value!r:.60}"
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
        raise ValueError(f"extent: the grid spans {ranges}, beyond the range of {dtype_name(center.dtype)}")
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

