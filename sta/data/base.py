"""What every sequence dataset shares: the state model, generation, the Dataset class, caching.

A dataset is a set of *sources* (a digit image, an initial scene) and K_true transformations. Each
transformation k moves one scalar of the frame's *state* additively, by ``unit_k`` per unit of
speed (angles and hues in degrees, scale as log-scale, positions in normalised [-1, 1] image
coordinates), so one step is

    state_{t+1} = state_t + active_t * speed_t * units            (apply_transformations)

and the cumulative state of frame t is ``state_0 + cumsum``. Every frame is rendered from its source
and its cumulative state (never from the previous frame), so interpolation blur does not compound.
``active`` and ``speed`` come from :class:`sta.priors.SpikeSlabPrior` (docs/maths.md 4.1, 5).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..priors import SpikeSlabPrior

#: bump when the generated tensors of any dataset change (invalidates caches)
GENERATOR_VERSION = 1

SPLITS = ("train", "test")
#: fraction of the sources in the train split
TRAIN_FRACTION = 0.8
#: the source split is fixed once for everyone, independent of the sequence seed
SPLIT_SEED = 20241007

#: frames rendered per call; bounds peak memory (64x64 scenes: ~30 float32 temporaries per pixel)
RENDER_CHUNK = 1024


@dataclass(frozen=True)
class DatasetSpec:
    """How one dataset is made.

    Attributes:
        name: dataset name.
        transformations: names of the K_true transformations.
        units: change of the state per unit speed, one per transformation.
        channels: image channels.
        default_size: default image side.
        min_size: smallest image side supported.
        num_sources: number of sources (split into train/test by :func:`source_split`).
        load_content: ``(source index (N,), image_size) -> content``: per-sequence fixed content
            (a tensor with leading dim N, or a tuple of them).
        initial_state: ``(source index (N,), generator) -> (N, K_true)`` state of frame 0.
        render: ``(content (M, ...), state (M, K_true), image_size) -> (M, C, S, S)`` in [0, 1].
    """

    name: str
    transformations: tuple
    units: tuple
    channels: int
    default_size: int
    min_size: int
    num_sources: int
    load_content: Callable
    initial_state: Callable
    render: Callable
    notes: dict = field(default_factory=dict)


def apply_transformations(state: Tensor, active: Tensor, speed: Tensor, units) -> Tensor:
    """One step of the ground-truth dynamics: ``state + active * speed * units``.

    state, active, speed: (..., K_true); units: (K_true,) sequence or tensor. Returns (..., K_true).
    """
    units = torch.as_tensor(units, dtype=state.dtype, device=state.device)
    if not (state.shape[-1] == active.shape[-1] == speed.shape[-1] == units.shape[-1]):
        raise ValueError(
            f"state, active, speed must end in K_true={units.shape[-1]}, got {tuple(state.shape)}, "
            f"{tuple(active.shape)}, {tuple(speed.shape)}"
        )
    return state + active.to(state.dtype) * speed.to(state.dtype) * units


def mixed_radix_digits(index: Tensor, sizes) -> Tensor:
    """Index (N,) into a grid of factors with ``sizes`` (last fastest) -> digits (N, len(sizes))."""
    out = []
    rest = index.clone()
    for size in reversed(sizes):
        out.append(rest % size)
        rest = rest // size
    return torch.stack(out[::-1], dim=1)


def source_split(num_sources: int, split: str) -> Tensor:
    """Source indices of ``split`` ('train' or 'test'): a fixed seeded permutation, 80/20, disjoint."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    perm = torch.randperm(num_sources, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_train = int(round(TRAIN_FRACTION * num_sources))
    return perm[:n_train] if split == "train" else perm[n_train:]


def derived_seed(*parts) -> int:
    """A 63-bit seed from the parts (name, split, seed), so each split has its own stream."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _index_content(content, idx):
    if isinstance(content, tuple):
        return tuple(c[idx] for c in content)
    return content[idx]


class SequenceDataset(Dataset):
    """Sequences of frames with the ground truth of how they were made.

    ``ds[i]`` is a dict: ``x`` (T+1, C, H, W) float32 in [0, 1]; ``active`` (T, K_true) float32 in
    {0, 1}; ``speed`` (T, K_true) float32 >= 0; ``state`` (T+1, K_true) float32, the cumulative
    state of every frame (see :mod:`sta.data.base`); ``index`` int, the source index.

    Attributes: ``name``, ``split``, ``transformations`` (K_true names), ``units``, ``channels``,
    ``image_size``, ``T``, ``seed``, ``single``.
    """

    def __init__(self, spec: DatasetSpec, tensors: dict, split: str, seed: int, single: bool):
        self.spec = spec
        self.name = spec.name
        self.transformations = spec.transformations
        self.units = spec.units
        self.split = split
        self.seed = seed
        self.single = single
        self._x = tensors["x"]
        self.active = tensors["active"]
        self.speed = tensors["speed"]
        self.state = tensors["state"]
        self.index = tensors["index"]
        n, t1, c, h, w = self._x.shape
        self.T = t1 - 1
        self.channels = c
        self.image_size = h

    def __len__(self) -> int:
        return self._x.shape[0]

    def _frames(self, x: Tensor) -> Tensor:
        return x.float() / 255.0 if x.dtype == torch.uint8 else x

    def __getitem__(self, i: int) -> dict:
        return dict(
            x=self._frames(self._x[i]),
            active=self.active[i],
            speed=self.speed[i],
            state=self.state[i],
            index=int(self.index[i]),
        )

    @property
    def x(self) -> Tensor:
        """All frames, (N, T+1, C, H, W) float32."""
        return self._frames(self._x)

    def tensors(self) -> dict:
        """All sequences stacked: x (N, T+1, C, H, W) float32, active/speed (N, T, K_true),
        state (N, T+1, K_true), index (N,) int64."""
        return dict(x=self.x, active=self.active, speed=self.speed, state=self.state, index=self.index)

    def __repr__(self) -> str:
        return (
            f"SequenceDataset({self.name!r}, split={self.split!r}, N={len(self)}, T={self.T}, "
            f"C={self.channels}, size={self.image_size}, transformations={self.transformations}, "
            f"single={self.single})"
        )


def render_states(spec: DatasetSpec, content, state: Tensor, image_size: int) -> Tensor:
    """Render frames: content with leading dim M, state (M, K_true) -> (M, C, S, S) float32, chunked."""
    m = state.shape[0]
    out = torch.empty(m, spec.channels, image_size, image_size)
    for start in range(0, m, RENDER_CHUNK):
        sl = slice(start, min(start + RENDER_CHUNK, m))
        out[sl] = spec.render(_index_content(content, sl), state[sl], image_size)
    return out.clamp_(0.0, 1.0)


def generate(
    spec: DatasetSpec,
    split: str,
    num_sequences: int,
    T: int,
    image_size: int,
    seed: int,
    prior: SpikeSlabPrior,
    single: bool,
) -> dict:
    """Generate the tensors of a dataset (see :class:`SequenceDataset`), deterministic in the arguments."""
    g = torch.Generator().manual_seed(derived_seed(spec.name, split, seed, "single" if single else "prior"))
    pool = source_split(spec.num_sources, split)
    index = pool[torch.randint(len(pool), (num_sequences,), generator=g)]
    K = len(spec.transformations)
    state0 = spec.initial_state(index, g).float()
    active, speed = prior.sample(T, K, batch=num_sequences, generator=g, single=single)
    units = torch.tensor(spec.units, dtype=torch.float32)
    steps = active * speed * units
    state = torch.cat([state0[:, None], state0[:, None] + torch.cumsum(steps, dim=1)], dim=1)
    content = spec.load_content(index, image_size)
    # every frame of a sequence shares its content; frames are rendered flat, (N * (T+1), ...)
    repeat = torch.arange(num_sequences).repeat_interleave(T + 1)
    frames = render_states(spec, _index_content(content, repeat), state.reshape(-1, K), image_size)
    x = frames.reshape(num_sequences, T + 1, spec.channels, image_size, image_size)
    return dict(x=x, active=active, speed=speed, state=state, index=index)


def cache_key(**params) -> str:
    """A file name for the cache of a dataset made with ``params`` (plus the generator version)."""
    text = json.dumps(dict(params, version=GENERATOR_VERSION), sort_keys=True)
    return f"{params['name']}-{params['split']}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.pt"


def load_or_generate(cache_dir: Optional[str], key_params: dict, make: Callable[[], dict]) -> dict:
    """Load the tensors from ``cache_dir`` if cached there, else ``make()`` them and write the cache
    atomically (temporary file in the same directory, then ``os.replace``)."""
    if cache_dir is None:
        return make()
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, cache_key(**key_params))
    if os.path.exists(path):
        return torch.load(path, weights_only=True)
    tensors = make()
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(tensors, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tensors


# ------------------------------------------------------------------------------ rendering helpers
def hue_to_rgb(hue_deg: Tensor, saturation: float = 1.0) -> Tensor:
    """HSV colour with value 1: hue (...) in degrees -> (..., 3) RGB in [0, 1], max channel 1.

    The standard formula ``f(n) = v - v s max(0, min(k, 4 - k, 1))``, ``k = (n + h / 60) mod 6``,
    n = 5, 3, 1 for R, G, B. Multiplying by a value v keeps ``max channel = v``, so a hue shift
    never changes the intensity (max over channels) of a pixel.
    """
    n = torch.tensor([5.0, 3.0, 1.0], dtype=hue_deg.dtype, device=hue_deg.device)
    k = torch.remainder(n + hue_deg[..., None] / 60.0, 6.0)
    return 1.0 - saturation * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def pixel_grid(image_size: int, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates in [-1, 1] (grid_sample's align_corners=False convention):
    returns (u, v) each (S, S); u grows to the right, v grows downwards."""
    c = (torch.arange(image_size, dtype=dtype) + 0.5) / image_size * 2.0 - 1.0
    v, u = torch.meshgrid(c, c, indexing="ij")
    return u, v


def to_local(u: Tensor, v: Tensor, cx: Tensor, cy: Tensor, angle_deg: Tensor, size: Tensor):
    """Screen coordinates (S, S) -> object coordinates (M, S, S) of M objects centred at (cx, cy)
    (M,), of half-size ``size`` (M,), rotated by ``angle_deg`` (M,) counter-clockwise on screen.

    On a screen with v downwards, a counter-clockwise rotation by a maps object point q to
    ``(q_u cos a + q_v sin a, -q_u sin a + q_v cos a)``; this is its inverse, divided by size.
    """
    a = torch.deg2rad(angle_deg)[:, None, None]
    cos, sin = torch.cos(a), torch.sin(a)
    du = u[None] - cx[:, None, None]
    dv = v[None] - cy[:, None, None]
    s = size[:, None, None]
    return (du * cos - dv * sin) / s, (du * sin + dv * cos) / s


def coverage(sdf: Tensor, size: Tensor, image_size: int) -> Tensor:
    """Anti-aliased coverage in [0, 1] from a signed distance in object units (M, S, S).

    The distance is converted to pixels (one pixel is 2 / S in screen units; object units are
    ``size`` screen units) and ramped linearly over one pixel around the boundary.
    """
    px = sdf * size[:, None, None] * (image_size / 2.0)
    return torch.clamp(0.5 - px, 0.0, 1.0)


def sdf_box(qu: Tensor, qv: Tensor, half_u: float, half_v: float) -> Tensor:
    """Signed distance to an axis-aligned box of half extents (half_u, half_v)."""
    du, dv = qu.abs() - half_u, qv.abs() - half_v
    outside = torch.sqrt(du.clamp_min(0) ** 2 + dv.clamp_min(0) ** 2)
    return outside + torch.clamp(torch.maximum(du, dv), max=0.0)


def sdf_ellipse(qu: Tensor, qv: Tensor, ru: float, rv: float) -> Tensor:
    """Approximate signed distance to an ellipse of radii (ru, rv) (exact for circles): the
    circle distance in the stretched space times the smaller radius (good near the boundary,
    which is all anti-aliasing needs)."""
    return (torch.sqrt((qu / ru) ** 2 + (qv / rv) ** 2) - 1.0) * min(ru, rv)


def sdf_capsule(qu: Tensor, qv: Tensor, half_length: float, radius: float) -> Tensor:
    """Signed distance to a vertical capsule: segment from v=-half_length to v=+half_length, radius."""
    return torch.sqrt(qu**2 + (qv.abs() - half_length).clamp_min(0) ** 2) - radius


def sdf_heart(qu: Tensor, qv: Tensor) -> Tensor:
    """Signed distance to a heart of half-size ~1 centred at 0, tip down (Inigo Quilez's exact
    heart distance, in its y-up frame where the tip is at (0, 0) and the lobes reach y ~ 1.1)."""
    scale = 0.6  # the heart spans x in [-0.6, 0.6], y in [0, 1.1]: map half-size 1 onto it
    x = (qu * scale).abs()
    y = -qv * scale + 0.55
    upper = torch.sqrt((x - 0.25) ** 2 + (y - 0.75) ** 2) - 2**0.5 / 4
    t = torch.clamp(x + y, min=0.0) * 0.5
    lower = torch.sqrt(torch.minimum(x**2 + (y - 1.0) ** 2, (x - t) ** 2 + (y - t) ** 2)) * torch.sign(x - y)
    return torch.where(x + y > 1.0, upper, lower) / scale
