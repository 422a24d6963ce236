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

Modules: :mod:`~sta.grid.sampling` (the field mix on a grid: :func:`latent_grid`, and particles:
:func:`advect_particles`), :mod:`~sta.grid.transport` (the op :func:`grid_transport`, its scheme,
reference and CFL number, and :func:`transport_for`), :mod:`~sta.grid.differences`
(:func:`grid_divergence`, :func:`grid_curl`), :mod:`~sta.grid.checks` (argument checks they share).
"""
from .differences import grid_curl, grid_divergence
from .sampling import LatentGrid, advect_particles, latent_grid
from .transport import (BOUNDARIES, FACE_BOUND, LIMITERS, MAX_SUBSTEPS, cfl_number, grid_transport,
                        transport_for, transport_reference)

__all__ = [
    "LatentGrid",
    "latent_grid",
    "grid_transport",
    "transport_for",
    "transport_reference",
    "cfl_number",
    "grid_divergence",
    "grid_curl",
    "advect_particles",
    "LIMITERS",
    "BOUNDARIES",
    "FACE_BOUND",
    "MAX_SUBSTEPS",
]
