"""The configuration of a model (:class:`ModelConfig`) and the coefficient layout of a step
(:class:`CoefficientLayout`), the one place that decodes single and double control."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields as dataclass_fields
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .registry import KINDS, kind_class

__all__ = ["ModelConfig", "CoefficientLayout"]

_ROTATIONAL = ("hamiltonian", "mlp", "none")
_CONTROL = ("single", "double")
_PRIOR = ("diffusion", "potential")
_LIKELIHOOD = ("bernoulli", "gaussian")
_ARCH = ("small", "authors")


class CoefficientLayout(NamedTuple):
    """How the ``Kc`` coefficients of one step drive the ``K`` fields (the control scheme, docs/maths.md 4.1).

    Single control (``Kc = K``): field k's potential and rotational parts share ``g^k``. Double
    control (``Kc = 2K``, field kinds with rotational parts only): the potential coefficients come
    first, then the rotational ones. Every reader of a coefficient vector goes through this class.
    """

    num_fields: int  # K
    rotational: bool  # the fields have rotational parts (g_rot is not None)
    double: bool  # Kc = 2K

    @property
    def size(self) -> int:
        """Kc."""
        return 2 * self.num_fields if self.double else self.num_fields

    def split(self, g: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """``g: (..., Kc) -> (g_pot: (..., K), g_rot: (..., K) or None)``."""
        if not self.rotational:
            return g, None
        if self.double:
            K = self.num_fields
            return g[..., :K], g[..., K:]
        return g, g

    def unit(self, field: int, *shape: int) -> Tensor:
        """``(*shape, Kc)`` float32 coefficients: field ``field`` alone at unit speed (both parts)."""
        if not 0 <= field < self.num_fields:
            raise ValueError(f"field: expected an index in [0, {self.num_fields}), got {field!r}")
        g = torch.zeros(*shape, self.size)
        g[..., field] = 1.0
        if self.double:
            g[..., self.num_fields + field] = 1.0
        return g

    def per_field(self, scores: Tensor) -> Tensor:
        """``(..., Kc) -> (..., K)``: with double control, the larger of a field's two scores."""
        if self.double:
            K = self.num_fields
            return torch.maximum(scores[..., :K], scores[..., K:])
        return scores


@dataclass
class ModelConfig:
    """Sizes and options of an STA model (or baseline). Every field is JSON-serialisable.

    model: a registered kind (``sta.models.MODELS``).  channels, image_size: of the frames (C, H = W).
    transitions: T, the number of steps per sequence (the diffusion prior has one scale per step).
    latent: D.  num_fields: K.  hidden: width H of every field.  conv: channels of the conv nets.
    arch: "small" (the default conv nets, width ``conv``) or "authors" (the authors' MNIST nets,
        :mod:`sta.models.nets_authors`: encoder and decoder widths tied to D, ``conv`` is the
        posterior's width; image_size a multiple of 4).
    rotational: "hamiltonian" (exactly divergence-free), "mlp" (the authors', penalised) or "none".
    rank: low-rank skew matrices for "hamiltonian" (None = dense).
    field_weight_scale: initial scale of the fields' first layers (:class:`sta.FieldBank`
        ``weight_scale``); small values start every field as a near-constant direction.
    control: "single" (field k's potential and rotational parts share g^k) or "double" (separate
        spikes and speeds for the two parts).
    prior: "diffusion" (learned sigma_{t,k}) or "potential" (a second bank of potential fields).
    likelihood: "bernoulli" per pixel, or "gaussian" with fixed ``gaussian_sigma``.
    hard: straight-through hard spikes in training (see :mod:`sta.models.base`).
    spike_floor: sparse training: a relaxed spike below it becomes an exact zero in the flow's
        coefficients, so that (sample, field) pair is not evaluated, forward or backward, and its
        spike receives no reconstruction gradient (the KL terms still see the relaxed spike).
        0 keeps every pair. Default 0.01, measured (benchmarks/results/spike_floor_precision_digits.md:
        digits, quick, seeds 0-2, against 0): equivariance 0.0600 vs 0.0596, identification 0.891 vs
        0.900, -ELBO 4268 vs 4273, every paired interval includes 0; 45% of the pairs skipped over
        the run; the gradient it drops is at most 1.2% of the full gradient's norm (cosine >=
        0.9999, benchmarks/results/spike_floor_gradient_digits.md).
    lambda_hj, lambda_div: weights of the Hamilton-Jacobi and mlp-divergence penalties.
    pi0, stay, slab_loc, slab_scale: the spike-and-slab prior (docs/maths.md 4.1).
    backend: flow_step backend ("auto" picks the fastest available).
    beta: betavae only, the weight of the KL terms in the loss (None = the kind's default, 4).
    slow_rate: slowvae only, the rate lambda of the Laplace prior on z_t - z_{t-1} (None = 6).
    Kind-specific entries (beta, slow_rate) must stay None for the other kinds.
    """

    model: str = "sta"
    channels: int = 3
    image_size: int = 28
    transitions: int = 8
    latent: int = 32
    num_fields: int = 3
    hidden: int = 64
    conv: int = 32
    arch: str = "small"
    rotational: str = "hamiltonian"
    rank: Optional[int] = None
    # 0.1, not 1: digits, quick preset, seeds 0 / 1: equivariance 0.0675 / 0.0653 at 1, 0.0614 / 0.0623
    # at 0.3, 0.0616 / 0.0614 at 0.1; identification 0.71 / 0.62 at 1, 0.84 / 0.85 at 0.1.
    field_weight_scale: float = 0.1
    control: str = "single"
    prior: str = "diffusion"
    likelihood: str = "bernoulli"
    gaussian_sigma: float = 0.1
    hard: bool = False
    spike_floor: float = 0.01
    lambda_hj: float = 1.0
    lambda_div: float = 1.0
    pi0: float = 0.1
    stay: float = 0.9
    slab_loc: float = 1.0
    slab_scale: float = 0.1
    backend: str = "auto"
    beta: Optional[float] = None
    slow_rate: Optional[float] = None

    def __post_init__(self):
        kind = kind_class(self.model)  # ValueError "model: expected one of (...)"
        choices = {"arch": _ARCH, "rotational": _ROTATIONAL, "control": _CONTROL, "prior": _PRIOR,
                   "likelihood": _LIKELIHOOD}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        for name in ("channels", "image_size", "transitions", "latent", "num_fields", "hidden", "conv"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.image_size < 4:
            raise ValueError(f"image_size: expected >= 4, got {self.image_size}")
        for name in ("lambda_hj", "lambda_div"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        for name in ("pi0", "stay"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name}: expected a probability in (0, 1), got {getattr(self, name)}")
        if self.slab_scale <= 0 or self.gaussian_sigma <= 0 or self.field_weight_scale <= 0:
            raise ValueError("slab_scale, gaussian_sigma, field_weight_scale: expected > 0")
        if isinstance(self.spike_floor, bool) or not isinstance(self.spike_floor, (int, float)) \
                or not 0.0 <= self.spike_floor < 1.0:
            raise ValueError(f"spike_floor: expected a float in [0, 1), got {self.spike_floor!r}")
        self._check_kind_options(kind)

    def _check_kind_options(self, kind) -> None:
        """Entries read by one kind only: None elsewhere (a silently ignored setting hides a mistake)."""
        owners = {}
        for cls in KINDS.values():
            for name in cls.options:
                owners.setdefault(name, []).append(cls.name)
        for name, models in owners.items():
            value = getattr(self, name)
            if value is None:
                continue
            if name not in kind.options:
                raise ValueError(f"{name}: read only by model {' / '.join(models)}; expected None for "
                                 f"model {self.model!r}, got {value!r}")
            low, strict = kind.options[name][1:]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < low or (strict and value == low):
                raise ValueError(f"{name}: expected a finite number {'>' if strict else '>='} {low}, got {value!r}")

    @property
    def coefficients(self) -> CoefficientLayout:
        """The :class:`CoefficientLayout` of one step (double control only for kinds with fields)."""
        rotational = kind_class(self.model).has_fields and self.rotational != "none"
        return CoefficientLayout(self.num_fields, rotational, rotational and self.control == "double")

    @property
    def num_coefficients(self) -> int:
        """Kc: K, or 2K with double control (potential part first, then rotational)."""
        return self.coefficients.size

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclass_fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model config: unknown keys {unknown}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)
