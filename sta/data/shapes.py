"""``shapes``: procedural scenes in the spirit of 3D Shapes (Burgess & Kim, 2018), rendered in 2-D.

A wall (top) and a floor (bottom, brighter towards the viewer) meet at a horizon; an object
stands on the floor, centred. Sources are the 3D Shapes factor grid (480,000 combinations, index
in the order of ``3dshapes.h5``): floor hue (10), wall hue (10), object hue (10), scale (8, 0.75 to
1.25), shape (4: cube, cylinder, sphere, capsule), orientation (15, -30 to 30 degrees).
The state moves continuously from there:

    ===========  ==============================  ================
    name         state                           unit
    ===========  ==============================  ================
    floor_hue    floor hue, degrees              30
    wall_hue     wall hue, degrees               30
    object_hue   object hue, degrees             30
    scale        log object scale                log(1.1)  (x1.1)
    orientation  object angle, degrees, CCW      20
    ===========  ==============================  ================

Orientation is an in-plane turn of the object about its centre (the room does not turn, unlike
3D Shapes' camera); the object is shaded along its own horizontal axis, so even the sphere shows
its orientation. Colours are HSV with saturation 0.9: a hue step changes the hue of its surface
and never the intensity (max over channels) of a pixel that belongs to that surface alone.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import DatasetSpec, coverage, mixed_radix_digits, hue_to_rgb, pixel_grid, sdf_box, sdf_capsule, sdf_ellipse, to_local

TRANSFORMATIONS = ("floor_hue", "wall_hue", "object_hue", "scale", "orientation")
UNITS = (30.0, 30.0, 30.0, math.log(1.1), 20.0)
SHAPES = ("cube", "cylinder", "sphere", "capsule")
#: factor grid sizes, in the order of the source index (most significant first)
FACTOR_SIZES = (10, 10, 10, 8, 4, 15)
NUM_SOURCES = math.prod(FACTOR_SIZES)

SATURATION = 0.9
#: v coordinate of the horizon (v grows downwards, frame in [-1, 1])
HORIZON = 0.1
#: v coordinate where the object touches the floor
GROUND = 0.6
#: object half-size at scale 1, in screen units (the frame is 2 wide)
BASE_SIZE = 0.3


def factors(index: Tensor) -> Tensor:
    """Source index (N,) -> factor indices (N, 6) in the order of :data:`FACTOR_SIZES`."""
    return mixed_radix_digits(index, FACTOR_SIZES)


def load_content(index: Tensor, image_size: int) -> Tensor:
    """The object's shape id (N,) in 0..3 (see :data:`SHAPES`)."""
    return factors(index)[:, 4]


def initial_state(index: Tensor, generator: torch.Generator) -> Tensor:
    """(N, 5) = (floor hue, wall hue, object hue, log scale, orientation) of the source's grid point."""
    f = factors(index).float()
    hues = f[:, :3] * 36.0
    log_scale = torch.log(0.75 + f[:, 3] * (0.5 / 7))
    orientation = -30.0 + f[:, 5] * (60.0 / 14)
    return torch.cat([hues, log_scale[:, None], orientation[:, None]], dim=1)


def object_sdf(shape: Tensor, qu: Tensor, qv: Tensor) -> Tensor:
    """Signed distance (M, S, S) to the object of each frame, in object units (half-size ~1)."""
    cube = sdf_box(qu, qv, 0.85, 0.85)
    cylinder = torch.minimum(
        sdf_box(qu, qv, 0.7, 0.8), torch.minimum(sdf_ellipse(qu, qv - 0.8, 0.7, 0.2), sdf_ellipse(qu, qv + 0.8, 0.7, 0.2))
    )
    sphere = torch.sqrt(qu**2 + qv**2) - 1.0
    capsule = sdf_capsule(qu, qv, 0.5, 0.5)
    s = shape[:, None, None]
    return torch.where(s == 0, cube, torch.where(s == 1, cylinder, torch.where(s == 2, sphere, capsule)))


def render(shape: Tensor, state: Tensor, image_size: int) -> Tensor:
    """shape (M,), state (M, 5) -> frames (M, 3, S, S) in [0, 1]."""
    u, v = pixel_grid(image_size)
    floor_value = 0.55 + 0.45 * torch.clamp((v - HORIZON) / (1.0 - HORIZON), 0.0, 1.0)
    wall_value = 0.75 + 0.15 * (v + 1.0) / (1.0 + HORIZON)
    floor = hue_to_rgb(state[:, 0], SATURATION)[:, :, None, None] * floor_value
    wall = hue_to_rgb(state[:, 1], SATURATION)[:, :, None, None] * wall_value
    background = torch.where(v > HORIZON, floor, wall)

    size = BASE_SIZE * torch.exp(state[:, 3])
    cx = torch.zeros_like(size)
    cy = GROUND - size  # the object stands on the floor and grows upwards
    qu, qv = to_local(u, v, cx, cy, state[:, 4], size)
    cover = coverage(object_sdf(shape, qu, qv), size, image_size)[:, None]
    # lit from the object's left; a strong gradient so that turning a sphere (whose silhouette
    # does not change) still visibly changes the frame
    shade = (0.65 - 0.35 * torch.clamp(qu, -1.0, 1.0))[:, None]
    obj = hue_to_rgb(state[:, 2], SATURATION)[:, :, None, None] * shade
    return cover * obj + (1.0 - cover) * background


SPEC = DatasetSpec(
    name="shapes",
    transformations=TRANSFORMATIONS,
    units=UNITS,
    channels=3,
    default_size=64,
    min_size=8,
    num_sources=NUM_SOURCES,
    load_content=load_content,
    initial_state=initial_state,
    render=render,
)
