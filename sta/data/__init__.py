"""Sequence datasets with ground truth (docs/maths.md section 5), generated locally, never downloaded.

    >>> from sta.data import make_dataset
    >>> ds = make_dataset("digits", split="train", num_sequences=1000, T=8)
    >>> item = ds[0]   # x (T+1, 3, 28, 28), active (T, 3), speed (T, 3), state (T+1, 3), index
    >>> ds.transformations
    ('scale', 'rotation', 'hue')

======== ====================================================== ===== =============
name     transformations (unit per unit speed)                  C     default size
======== ====================================================== ===== =============
digits   scale x1.1, rotation 20 deg, hue 20 deg                3     28
shapes   floor/wall/object hue 30 deg, scale x1.1, orient. 20   3     64
sprites  translation x/y 0.1 (of the half-frame), rotation      1     64
         20 deg, scale x1.1
mnist    as digits; real MNIST (extra sta[mnist])               3     28
======== ====================================================== ===== =============

Which transformations act at each step, and how fast, follow the spike-and-slab Markov prior
(:class:`sta.priors.SpikeSlabPrior`: pi0 0.1, stay 0.9, no all-off step, speeds
``|Laplace(1, 0.1)|``), or exactly one per step with ``single=True``. See :mod:`sta.data.base`
for the state model shared by all datasets.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..priors import SpikeSlabPrior
from . import base, digits, mnist, shapes, sprites
from .base import SPLITS, DatasetSpec, SequenceDataset, source_split
from .mnist import MissingExtraError

__all__ = [
    "DATASETS",
    "SPECS",
    "SPLITS",
    "SequenceDataset",
    "DatasetSpec",
    "MissingExtraError",
    "make_dataset",
    "apply_transformations",
    "render",
    "source_split",
]

SPECS = {spec.name: spec for spec in (digits.SPEC, shapes.SPEC, sprites.SPEC, mnist.SPEC)}
DATASETS = tuple(SPECS)

_STORAGE = {"float32": torch.float32, "uint8": torch.uint8}


def _spec(name: str) -> DatasetSpec:
    if name not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    return SPECS[name]


def make_dataset(
    name: str,
    split: str = "train",
    num_sequences: int = 1000,
    T: int = 8,
    image_size: Optional[int] = None,
    seed: int = 0,
    prior: Optional[SpikeSlabPrior] = None,
    single: bool = False,
    cache_dir: Optional[str] = None,
    storage: str = "float32",
) -> SequenceDataset:
    """Generate (or load from ``cache_dir``) a dataset of ``num_sequences`` sequences of T+1 frames.

    Args:
        name: one of :data:`DATASETS`.
        split: 'train' or 'test'; the two use disjoint sources (a fixed 80/20 split of source
            indices, the same for every seed) and independent random streams.
        num_sequences: N; sources are drawn uniformly, with replacement, from the split.
        T: transitions per sequence (frames: T + 1).
        image_size: frame side (default: the dataset's, 28 for digits and mnist, 64 otherwise).
        seed: the same arguments give the same tensors, bit for bit.
        prior: the spike-and-slab process of the ground truth (default ``SpikeSlabPrior()``).
        single: exactly one transformation per step (:meth:`SpikeSlabPrior.sample_single`), for
            identification accuracy (docs/maths.md 6).
        cache_dir: if given, the tensors are cached there (written atomically) and reloaded.
        storage: 'float32', or 'uint8' to keep frames quantised to 1/255 (4x less memory); items
            and :meth:`SequenceDataset.tensors` are float32 either way.
    """
    spec = _spec(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    for arg, value, low in (("num_sequences", num_sequences, 1), ("T", T, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{arg} must be an int >= {low}, got {value!r}")
    image_size = spec.default_size if image_size is None else image_size
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < spec.min_size:
        raise ValueError(f"image_size must be an int >= {spec.min_size} for {name}, got {image_size!r}")
    if storage not in _STORAGE:
        raise ValueError(f"storage must be one of {tuple(_STORAGE)}, got {storage!r}")
    prior = SpikeSlabPrior() if prior is None else prior
    if not isinstance(prior, SpikeSlabPrior):
        raise TypeError(f"prior must be a SpikeSlabPrior, got {type(prior).__name__}")
    key = dict(name=name, split=split, num_sequences=num_sequences, T=T, image_size=image_size, seed=seed,
               prior=prior.config(), single=bool(single), storage=storage)

    def make():
        tensors = base.generate(spec, split, num_sequences, T, image_size, seed, prior, bool(single))
        if storage == "uint8":
            tensors["x"] = torch.round(tensors["x"] * 255.0).to(torch.uint8)
        return tensors

    tensors = base.load_or_generate(cache_dir, key, make)
    return SequenceDataset(spec, tensors, split, seed, bool(single))


def apply_transformations(name: str, state: Tensor, active: Tensor, speed: Tensor) -> Tensor:
    """Ground-truth step of dataset ``name``: ``state + active * speed * units``, all (..., K_true)."""
    return base.apply_transformations(state, active, speed, _spec(name).units)


def render(name: str, index: Tensor, state: Tensor, image_size: Optional[int] = None) -> Tensor:
    """Render frames of dataset ``name`` from source indices (M,) and states (M, K_true):
    (M, C, S, S) float32 in [0, 1] -- exactly how the dataset's frames are made."""
    spec = _spec(name)
    image_size = spec.default_size if image_size is None else image_size
    index = torch.as_tensor(index, dtype=torch.long)
    return base.render_states(spec, spec.load_content(index, image_size), state.float(), image_size)
