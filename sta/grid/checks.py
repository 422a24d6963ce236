"""Argument checks shared by the grid ops: cells, face velocities, cell widths, steps.

Each raises a TypeError / ValueError naming the argument. The values of the face velocities (the
non-finite policy, the CFL rate) are screened by :func:`sta.grid.transport._screen`.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from ..backends import dtype_name
from ..ops import real_number


def _check_rho(rho) -> Tensor:
    if not isinstance(rho, Tensor):
        raise TypeError(f"rho: expected a Tensor of shape (N1, N2) or (N1, N2, N3), got {type(rho).__name__}")
    if rho.dim() not in (2, 3):
        raise ValueError(f"rho: expected a 2-D (N1, N2) or 3-D (N1, N2, N3) density, got shape {tuple(rho.shape)}")
    if rho.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"rho: expected float32 or float64, got {dtype_name(rho.dtype)}")
    if rho.numel() == 0:
        raise ValueError(f"rho: expected at least one cell per axis, got shape {tuple(rho.shape)}")
    return rho



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
            raise TypeError(f"{name}[{a}]: expected a floating-point tensor, got {dtype_name(u.dtype)}")
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
            raise TypeError(f"{face}: expected dtype {dtype_name(rho.dtype)} (that of rho), got {dtype_name(u.dtype)}")
        if u.device != rho.device:
            raise ValueError(f"{face}: expected device {rho.device} (that of rho), got {u.device}")
        faces.append(u.contiguous())
    return tuple(faces)



def _check_dt(dt, name: str = "dt") -> float:
    """A step or a duration: a finite float >= 0 (TypeError / ValueError naming ``name``)."""
    value = real_number(name, dt)
    if value < 0:
        raise ValueError(f"{name}: expected a finite float >= 0, got {dt!r}")
    return value


def _check_courant(dt: float, dx: tuple, dtype: torch.dtype, name: str) -> None:
    """dt / dx_a must be finite in rho's dtype: an Inf Courant factor times a zero flux is NaN."""
    largest = torch.finfo(dtype).max
    if any(dt / h > largest for h in dx):
        raise ValueError(f"{name}: {name} / dx = {max(dt / h for h in dx):.4g} is not finite in "
                         f"{dtype_name(dtype)} (largest {largest:.4g})")

