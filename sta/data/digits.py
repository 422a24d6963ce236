"""``digits``: the 1,797 handwritten 8x8 digits bundled with scikit-learn, coloured, scaled, rotated.

Sources: ``sklearn.datasets.load_digits()`` (shipped inside scikit-learn, no download), values
0..16 scaled to [0, 1], upsampled once (bicubic, with a one-pixel zero margin) so that the 8x8 digit
spans a centred box of 20/28 of the frame, like MNIST's 20x20 box in 28x28. Transformations per unit speed are the authors' MNIST settings:

    =========  ===========================  =====================
    name       state                        unit
    =========  ===========================  =====================
    scale      log scale factor             log(1.1)  (x1.1)
    rotation   angle, degrees, CCW          20
    hue        hue, degrees                 20
    =========  ===========================  =====================

Frame 0 has scale 1, angle 0 and a uniform random base hue. Each frame is rendered from the
upsampled source with one ``affine_grid``/``grid_sample`` (bilinear, zero padding) for its
cumulative scale and angle, then coloured: ``x = mask * rgb(hue)`` (HSV with saturation 1 and
value 1, so ``x.max(channel) == mask`` whatever the hue). Speeds are >= 0, so digits only grow
(a digit scaled past ~1.4x is cropped by the frame) and turn counter-clockwise.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import DatasetSpec, hue_to_rgb

TRANSFORMATIONS = ("scale", "rotation", "hue")
UNITS = (math.log(1.1), 20.0, 20.0)
NUM_SOURCES = 1797
#: side of the digit's box relative to the frame (MNIST: 20 of 28 pixels)
BOX_FRACTION = 20.0 / 28.0


@lru_cache(maxsize=1)
def _raw_digits() -> Tensor:
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images).float() / 16.0  # (1797, 8, 8) in [0, 1]
    if images.shape[0] != NUM_SOURCES:  # pragma: no cover - guards a scikit-learn change
        raise RuntimeError(f"expected {NUM_SOURCES} digits from scikit-learn, got {images.shape[0]}")
    return images


@lru_cache(maxsize=4)
def source_images(image_size: int) -> Tensor:
    """All 1,797 sources upsampled and centred: (1797, 1, S, S) float32 in [0, 1]."""
    box = int(round(image_size * BOX_FRACTION))
    # Many digits touch the 8x8 border; a zero margin of one source pixel (upsampled with the
    # digit) lets their strokes fade out instead of ending in a straight cut when rotated.
    padded = F.pad(_raw_digits()[:, None], (1, 1, 1, 1))
    box = int(round(box * 10 / 8))
    up = F.interpolate(padded, size=(box, box), mode="bicubic", align_corners=False)
    up = up.clamp(0.0, 1.0)
    before = (image_size - box) // 2
    return F.pad(up, (before, image_size - box - before, before, image_size - box - before))


def load_content(index: Tensor, image_size: int) -> Tensor:
    """Source images of the given indices, (N, 1, S, S)."""
    return source_images(image_size)[index]


def initial_state(index: Tensor, generator: torch.Generator) -> Tensor:
    """(N, 3): log scale 0, angle 0, base hue uniform in [0, 360)."""
    n = index.shape[0]
    hue = torch.rand(n, generator=generator) * 360.0
    return torch.stack([torch.zeros(n), torch.zeros(n), hue], dim=1)


def render(source: Tensor, state: Tensor, image_size: int) -> Tensor:
    """source (M, 1, S, S), state (M, 3) = (log scale, angle, hue) -> frames (M, 3, S, S).

    The sampling grid maps each output pixel p to the source point ``R(-angle) p / scale``
    (same convention as :func:`sta.data.base.to_local`: positive angles turn counter-clockwise).
    """
    scale = torch.exp(state[:, 0])
    a = torch.deg2rad(state[:, 1])
    cos, sin = torch.cos(a) / scale, torch.sin(a) / scale
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(source.shape), align_corners=False)
    mask = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return mask * hue_to_rgb(state[:, 2])[:, :, None, None]


SPEC = DatasetSpec(
    name="digits",
    transformations=TRANSFORMATIONS,
    units=UNITS,
    channels=3,
    default_size=28,
    min_size=8,
    num_sources=NUM_SOURCES,
    load_content=load_content,
    initial_state=initial_state,
    render=render,
)
