"""``sprites``: procedural dSprites-like shapes (Matthey et al., 2017): white on black, one channel.

Sources are a dSprites-style factor grid (737,280 combinations, most significant first): shape
(3: square, ellipse, heart), scale (6, 0.5 to 1), orientation (40, 0 to 351 degrees), position x
(32) and y (32) in [-0.6, 0] (the upper-left of the centre, because speeds are >= 0 and sprites only
move right and down). The state moves continuously from there:

    =============  ==================================  ================
    name           state                               unit
    =============  ==================================  ================
    translation_x  centre u, frame coordinates [-1,1]  0.1 (3.2 px at 64)
    translation_y  centre v (downwards)                0.1
    rotation       angle, degrees, CCW                 20
    scale          log scale                           log(1.1)  (x1.1)
    =============  ==================================  ================

A sprite moved or grown past the frame's edge is cropped (as in dSprites at its extremes).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import DatasetSpec, coverage, mixed_radix_digits, pixel_grid, sdf_box, sdf_ellipse, sdf_heart, to_local

TRANSFORMATIONS = ("translation_x", "translation_y", "rotation", "scale")
UNITS = (0.1, 0.1, 20.0, math.log(1.1))
SHAPES = ("square", "ellipse", "heart")
FACTOR_SIZES = (3, 6, 40, 32, 32)
NUM_SOURCES = math.prod(FACTOR_SIZES)
#: sprite half-size at scale 1, in frame units (the frame is 2 wide)
BASE_SIZE = 0.35
POSITION_RANGE = (-0.6, 0.0)


def factors(index: Tensor) -> Tensor:
    """Source index (N,) -> factor indices (N, 5) in the order of :data:`FACTOR_SIZES`."""
    return mixed_radix_digits(index, FACTOR_SIZES)


def load_content(index: Tensor, image_size: int) -> Tensor:
    """The sprite's shape id (N,) in 0..2 (see :data:`SHAPES`)."""
    return factors(index)[:, 0]


def initial_state(index: Tensor, generator: torch.Generator) -> Tensor:
    """(N, 4) = (x, y, angle, log scale) of the source's grid point."""
    f = factors(index).float()
    low, high = POSITION_RANGE
    x = low + f[:, 3] * (high - low) / 31
    y = low + f[:, 4] * (high - low) / 31
    angle = f[:, 2] * 9.0
    log_scale = torch.log(0.5 + f[:, 1] * 0.1)
    return torch.stack([x, y, angle, log_scale], dim=1)


def sprite_sdf(shape: Tensor, qu: Tensor, qv: Tensor) -> Tensor:
    """Signed distance (M, S, S) to each frame's sprite, in sprite units (half-size ~1)."""
    square = sdf_box(qu, qv, 0.8, 0.8)
    ellipse = sdf_ellipse(qu, qv, 1.0, 0.5)
    heart = sdf_heart(qu, qv)
    s = shape[:, None, None]
    return torch.where(s == 0, square, torch.where(s == 1, ellipse, heart))


def render(shape: Tensor, state: Tensor, image_size: int) -> Tensor:
    """shape (M,), state (M, 4) -> frames (M, 1, S, S) in [0, 1] (anti-aliased coverage)."""
    u, v = pixel_grid(image_size)
    size = BASE_SIZE * torch.exp(state[:, 3])
    qu, qv = to_local(u, v, state[:, 0], state[:, 1], state[:, 2], size)
    return coverage(sprite_sdf(shape, qu, qv), size, image_size)[:, None]


SPEC = DatasetSpec(
    name="sprites",
    transformations=TRANSFORMATIONS,
    units=UNITS,
    channels=1,
    default_size=64,
    min_size=8,
    num_sources=NUM_SOURCES,
    load_content=load_content,
    initial_state=initial_state,
    render=render,
)
