"""Divergence and curl on the grid by central differences (layout of :mod:`sta.grid`).

Plain torch differences, the same on every device: no backend dispatch.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..backends import dtype_name
from .checks import _cells_of_faces, _check_dx, _check_faces, _face_tuple

__all__ = ["grid_divergence", "grid_curl"]


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
        raise TypeError(f"velocity: expected a floating-point tensor, got {dtype_name(velocity.dtype)}")
    return velocity


def _central(f: Tensor, axis: int, h: float) -> Tensor:
    return torch.gradient(f, spacing=h, dim=axis, edge_order=2)[0]
