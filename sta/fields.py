"""Field modules: the learned vector fields that move latents (docs/maths.md section 1).

Every bank stores the parameters of all its K fields stacked along a leading field axis, which is
the layout every backend consumes (one grouped matrix product per field):

    PotentialFields   W: (K, H, D), b: (K, H), a: (K, H)           u_k = a_k . tanh(W_k z + b_k + e_k(t))
    RotationalFields  "hamiltonian": the potential parameters of psi_k plus a skew matrix A_k
                      (dense P: (K, D, D), A = P - P^T; or low rank U, V: (K, D, R), A = U V^T - V U^T)
                      "mlp": W1: (K, H, D), b1: (K, H), W2: (K, D, H), b2: (K, D)

Each bank owns a :class:`TimeEmbedding` that turns the scalar time t into the per-field hidden
bias shift ``e(t): (K, H)`` and its time derivative ``de/dt: (K, H)``; it is evaluated once per
step, never per sample.

``prepare(t, active)`` returns the per-step parameter tuple a backend consumes (see
:mod:`sta.reference`). It is differentiable in t and in every parameter, so autograd carries the
backends' gradients back to the modules. ``active: (K,) bool`` marks the fields with at least one
active pair in the step; whatever the other fields hold (NaN, Inf) reaches no output, and their
gradients and the gradient of t are exactly zero (the non-finite policy of :func:`sta.flow_step`):
their time-embedding weights are zeroed before ``e(t)`` (:func:`zero_inactive`), their other
parameters pass unchanged with their gradients zeroed (:func:`gate`; no backend reads a field
without active pairs).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .reference import (
    HamiltonianParams,
    MLPParams,
    PotentialParams,
    hamiltonian_velocity,
    mlp_velocity,
    potential_gradient,
    potential_value,
)

__all__ = ["TimeEmbedding", "PotentialFields", "RotationalFields", "FieldBank", "ROTATIONAL_CONSTRUCTIONS"]

ROTATIONAL_CONSTRUCTIONS = ("hamiltonian", "mlp")

#: Displacement a unit coefficient gives a standard-normal z at initialisation, relative to |z|.
INIT_STEP_RATIO = 0.1
#: Standard-normal probes used to calibrate that ratio (fixed seed, so init is reproducible).
_CALIBRATION_PROBES = 256


class _GateGradient(torch.autograd.Function):
    """Identity forward (views, no copy); the backward zeroes the gradient slices of the fields
    that ``mask`` marks inactive. One application gates all the parameters of a bank: each
    ``apply`` costs a few microseconds of Python, a measurable part of a small step."""

    @staticmethod
    def forward(ctx, active: Tensor, *params: Tensor) -> tuple:
        ctx.save_for_backward(active)
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx, *grads):
        (active,) = ctx.saved_tensors
        if active.device.type == "cpu" and not torch.compiler.is_compiling():
            inactive = (~active).nonzero().reshape(-1)  # host memory: no device to wait for
            return (None,) + tuple(_zero_inactive_cpu(g, active, inactive) for g in grads)
        # on a GPU a look at the data would be a sync, and torch.compile cannot branch on data
        return (None,) + tuple(None if g is None else zero_inactive(g, active) for g in grads)


def _zero_inactive_cpu(grad: Optional[Tensor], active: Tensor, inactive: Tensor) -> Optional[Tensor]:
    """``grad`` with the slices of the ``inactive`` fields (their indices) zeroed, reading host
    memory only where it can skip the pass: the backends already give those slices exact zeros
    unless a parameter is non-finite (``0 * NaN``), so a look at the inactive slices alone (nothing
    when every field is active, the usual case in training) usually returns ``grad`` itself. A full
    ``where`` cost 6-24% of a D = H = 1024 step's backward (bench_flow_step S3) and 0.5 ms of a
    7 ms S1 step."""
    if grad is None or inactive.numel() == 0 or not grad.detach().index_select(0, inactive).ne(0).numpy().any():
        return grad
    return zero_inactive(grad, active)


def gate(active: Optional[Tensor], *params: Tensor) -> tuple:
    """``params``, each ``(K, ...)``, with gradients that are exactly 0 in the slices of the fields
    that are not ``active: (K,) bool`` (``torch.where`` in the backward: ``0 * NaN`` is NaN, ``where``
    is 0). Returns a tuple, one entry per param.

    The values pass unchanged (no copy): every product a step forms from a field's parameters
    (``M = A W^T``, ``Pdiv``, the curl matrices) stays within that field, and a backend reads only
    the fields of active pairs, so a NaN/Inf in an inactive field reaches no output; only its
    gradients could (``0 @ NaN``), and those are zeroed here. Gating the values with a ``where`` in
    the forward instead cost a full copy of every (K, H, D) parameter per step: benchmarks/
    bench_flow_step.py S3 (D = H = 1024) forward 269 ms against 168 ms without it.
    :func:`zero_inactive` is the forward version, for a parameter whose product mixes the fields.
    ``active=None`` returns ``params`` themselves.
    """
    if active is None:
        return params
    return _GateGradient.apply(active, *params)


def zero_inactive(param: Tensor, active: Optional[Tensor]) -> Tensor:
    """``param: (K, ...)`` with the slices of the fields that are not ``active: (K,) bool`` set to 0
    (``torch.where``: ``0 * NaN`` would be NaN). For a parameter whose product sums over the fields
    (the time embedding's ``e(t)`` feeds the gradient of the shared ``t``), and for the gradients in
    :func:`gate`'s backward. ``active=None`` returns ``param``."""
    if active is None:
        return param
    return torch.where(active.reshape((-1,) + (1,) * (param.dim() - 1)), param, param.new_zeros(()))


def as_time_tensor(t: Union[float, int, Tensor], like: Tensor) -> Tensor:
    """The step time as a 0-dim tensor of ``like``'s dtype and device (keeps autograd history)."""
    if isinstance(t, Tensor):
        return t.to(dtype=like.dtype, device=like.device)
    # zeros + t, not torch.tensor(float(t)) or torch.full: under torch.compile a float t is symbolic,
    # and only arithmetic with a tensor keeps it symbolic through inductor (the others specialise
    # the graph on t's value: one recompilation per step time).
    return like.new_zeros(()) + t


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t, then one linear map per field.

    ``phi(t) = [sin(w_i t), cos(w_i t)]_i`` with ``num_frequencies`` fixed frequencies ``w_i``
    spaced geometrically in [1/max_period, 1] * 2 pi, so times 0..max_period are resolved.

    Returns ``e(t) = E phi(t): (K, H)`` and ``de/dt = E dphi/dt: (K, H)``; for a vector of times
    ``t: (T,)``, ``(T, K, H)`` each (every step of a path in one product).
    """

    def __init__(self, num_fields: int, hidden: int, num_frequencies: int = 8, max_period: float = 32.0):
        super().__init__()
        freqs = 2 * math.pi * torch.logspace(-math.log10(max_period), 0.0, num_frequencies)
        self.register_buffer("frequencies", freqs)
        features = 2 * num_frequencies
        self.weight = nn.Parameter(torch.randn(num_fields, hidden, features) * (0.1 / math.sqrt(features)))

    def forward(self, t: Tensor, active: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """t: 0-dim (or (T,)) tensor -> (e, de_dt), each (K, H) (or (T, K, H)); fields not
        ``active: (K,) bool`` get zeros."""
        wt = self.frequencies.to(t.dtype) * t[..., None]
        phi = torch.cat([torch.sin(wt), torch.cos(wt)], -1)
        dphi = (torch.cat([torch.cos(wt), -torch.sin(wt)], -1)
                * torch.cat([self.frequencies, self.frequencies]).to(t.dtype))
        weight = zero_inactive(self.weight, active)  # before the product: 0 * NaN in the t-gradient is NaN
        e = torch.einsum("khf,...f->...kh", weight, phi)
        de = torch.einsum("khf,...f->...kh", weight, dphi)
        return e, de


def _calibrate(measure, rescale, dim: int, dtype: torch.dtype) -> None:
    """Rescale a bank so a unit coefficient moves standard-normal z by INIT_STEP_RATIO |z|.

    measure(z) -> (N, K, D) velocities; rescale(factor: (K,)) multiplies the output scale.
    Three rounds, because tanh makes the mlp construction slightly non-linear in its scale.
    """
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(_CALIBRATION_PROBES, dim, generator=gen, dtype=dtype)
    with torch.no_grad():
        for _ in range(3):
            v = measure(z)
            ratio = (v.norm(dim=-1) / z.norm(dim=-1, keepdim=True)).mean(0)  # (K,)
            factor = torch.where(ratio > 0, INIT_STEP_RATIO / ratio.clamp_min(1e-30), torch.ones_like(ratio))
            rescale(factor)


class PotentialFields(nn.Module):
    """K curl-free fields ``v_k = grad u_k``, ``u_k(z, t) = a_k . tanh(W_k z + b_k + e_k(t))``.

    Args:
        dim: latent size D.
        num_fields: K (may be 0).
        hidden: hidden width H.
        time_frequencies: number of sinusoidal frequencies of the time embedding.
        weight_scale: W is initialised N(0, weight_scale^2 / D), so a unit is at ``weight_scale``
            standard deviations of tanh's input for standard-normal z (see :func:`_init_weight`).

    Parameters: ``W: (K, H, D)``, ``b: (K, H)``, ``a: (K, H)``, ``time: TimeEmbedding``.
    """

    def __init__(self, dim: int, num_fields: int, hidden: int, time_frequencies: int = 8,
                 weight_scale: float = 1.0):
        super().__init__()
        _check_sizes(dim=dim, num_fields=num_fields, hidden=hidden)
        self.dim, self.num_fields, self.hidden = dim, num_fields, hidden
        self.W = nn.Parameter(_init_weight(num_fields, hidden, dim, weight_scale))
        self.b = nn.Parameter(torch.randn(num_fields, hidden) * 0.1)
        self.a = nn.Parameter(torch.randn(num_fields, hidden) / math.sqrt(hidden))
        self.time = TimeEmbedding(num_fields, hidden, time_frequencies)
        if num_fields:
            _calibrate(lambda z: self.velocity(z, 0.0), self._scale_output, dim, self.W.dtype)

    def _scale_output(self, factor: Tensor) -> None:
        self.a.mul_(factor[:, None])

    def prepare(self, t: Union[float, Tensor], active: Optional[Tensor] = None) -> PotentialParams:
        """Per-step parameters: ``PotentialParams(W: (K,H,D), c = b + e(t): (K,H), a: (K,H), de: (K,H))``.

        ``active: (K,) bool`` (or None: every field): the other fields get exactly 0 gradients
        (:func:`gate`). ``t: (T,)``, the times of a path's steps: ``c`` and ``de`` are ``(T, K, H)``
        (row t for step t), the rest is formed once (:func:`sta.flow_path`).
        """
        e, de = self.time(as_time_tensor(t, self.W), active)
        W, b, a = gate(active, self.W, self.b, self.a)
        return PotentialParams(W, b + e, a, de)

    def potential(self, z: Tensor, t: Union[float, Tensor]) -> Tensor:
        """Plain evaluation of every field: ``z: (B, D) -> u: (B, K)``."""
        return potential_value(z, self.prepare(t))

    def velocity(self, z: Tensor, t: Union[float, Tensor]) -> Tensor:
        """Plain evaluation of every field: ``z: (B, D) -> grad u: (B, K, D)``."""
        return potential_gradient(z, self.prepare(t))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_fields={self.num_fields}, hidden={self.hidden}"


class RotationalFields(nn.Module):
    """K rotational fields ``r_k``; divergence-free exactly ("hamiltonian") or by penalty ("mlp").

    Args:
        dim: latent size D.
        num_fields: K (may be 0).
        hidden: hidden width H.
        construction: ``"hamiltonian"`` (``r_k = A_k grad psi_k``, A_k skew) or ``"mlp"``
            (``r_k = tanh(W2_k tanh(W1_k z + b1_k + e_k(t)) + b2_k)``, the authors' choice).
        rank: for "hamiltonian", None gives a dense skew matrix ``A = P - P^T`` with ``P: (K, D, D)``;
            an int R gives ``A = U V^T - V U^T`` with ``U, V: (K, D, R)``.
        weight_scale: initial scale of the first layer (W of psi, or W1), as in
            :class:`PotentialFields`.
    """

    def __init__(
        self,
        dim: int,
        num_fields: int,
        hidden: int,
        construction: str = "hamiltonian",
        rank: Optional[int] = None,
        time_frequencies: int = 8,
        weight_scale: float = 1.0,
    ):
        super().__init__()
        _check_sizes(dim=dim, num_fields=num_fields, hidden=hidden)
        if construction not in ROTATIONAL_CONSTRUCTIONS:
            raise ValueError(f"rotational: expected one of {ROTATIONAL_CONSTRUCTIONS}, got {construction!r}")
        if rank is not None and (construction != "hamiltonian" or not isinstance(rank, int) or isinstance(rank, bool)
                                 or rank < 1):
            raise ValueError(f"rank: expected None or a positive int with construction='hamiltonian', got {rank!r}")
        self.dim, self.num_fields, self.hidden = dim, num_fields, hidden
        self.construction, self.rank = construction, rank
        self.time = TimeEmbedding(num_fields, hidden, time_frequencies)
        if construction == "hamiltonian":
            self.W = nn.Parameter(_init_weight(num_fields, hidden, dim, weight_scale))
            self.b = nn.Parameter(torch.randn(num_fields, hidden) * 0.1)
            self.a = nn.Parameter(torch.randn(num_fields, hidden) / math.sqrt(hidden))
            if rank is None:
                self.P = nn.Parameter(torch.randn(num_fields, dim, dim) / math.sqrt(2 * dim))
            else:
                self.U = nn.Parameter(torch.randn(num_fields, dim, rank) / math.sqrt(dim))
                self.V = nn.Parameter(torch.randn(num_fields, dim, rank) / math.sqrt(dim))
        else:
            self.W1 = nn.Parameter(_init_weight(num_fields, hidden, dim, weight_scale))
            self.b1 = nn.Parameter(torch.randn(num_fields, hidden) * 0.1)
            self.W2 = nn.Parameter(torch.randn(num_fields, dim, hidden) / math.sqrt(hidden))
            self.b2 = nn.Parameter(torch.zeros(num_fields, dim))
        if num_fields:
            _calibrate(lambda z: self.velocity(z, 0.0), self._scale_output, dim, self.time.weight.dtype)

    def _scale_output(self, factor: Tensor) -> None:
        if self.construction == "hamiltonian":
            self.a.mul_(factor[:, None])
        else:
            self.W2.mul_(factor[:, None, None])
            self.b2.mul_(factor[:, None])

    def skew(self, active: Optional[Tensor] = None) -> Tensor:
        """The skew-symmetric matrices ``A: (K, D, D)`` of the hamiltonian construction
        (zero for the fields not ``active: (K,) bool``, when given)."""
        if self.construction != "hamiltonian":
            raise ValueError("skew(): only the 'hamiltonian' construction has a skew matrix")
        if self.rank is None:
            (P,) = gate(active, self.P)
            return P - P.transpose(1, 2)
        U, V = gate(active, self.U, self.V)
        uv = U @ V.transpose(1, 2)
        return uv - uv.transpose(1, 2)

    def prepare(self, t: Union[float, Tensor], active: Optional[Tensor] = None) -> Union[HamiltonianParams, MLPParams]:
        """Per-step parameters (see :class:`sta.reference.HamiltonianParams` / ``MLPParams``).

        ``active: (K,) bool`` (or None: every field): the other fields get exactly 0 gradients
        (:func:`gate`). ``t: (T,)``, the times of a path's steps: the hidden bias ``b + e(t)`` is
        ``(T, K, H)`` (row t for step t), and ``M = A W^T`` (the costly ``(K, D, D) x (K, D, H)``
        product) is formed once for the whole path (:func:`sta.flow_path`).
        """
        ref = self.time.weight
        e, _ = self.time(as_time_tensor(t, ref), active)
        if self.construction == "hamiltonian":
            W, b, a = gate(active, self.W, self.b, self.a)
            M = self.skew(active) @ W.transpose(1, 2)  # (K, D, H): r_k = M_k (a_k * s')
            return HamiltonianParams(W, b + e, a, M)
        W1, b1, W2, b2 = gate(active, self.W1, self.b1, self.W2, self.b2)
        return MLPParams(W1, b1 + e, W2, b2)

    def velocity(self, z: Tensor, t: Union[float, Tensor]) -> Tensor:
        """Plain evaluation of every field: ``z: (B, D) -> r: (B, K, D)``."""
        p = self.prepare(t)
        if self.construction == "hamiltonian":
            return hamiltonian_velocity(z, p)
        return mlp_velocity(z, p)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_fields={self.num_fields}, hidden={self.hidden}, "
            f"construction={self.construction!r}, rank={self.rank}"
        )


class FieldBank(nn.Module):
    """All the fields of one STA model: ``.potential`` (curl-free) and ``.rotational``.

    Args:
        dim: latent size D.
        num_potential: Kp, number of curl-free fields.
        num_rotational: Kr, number of rotational fields.
        hidden: hidden width H of every field.
        rotational: ``"hamiltonian"`` (exactly divergence-free, default) or ``"mlp"``.
        rank: low-rank skew matrices for "hamiltonian" (None = dense).
        weight_scale: initial scale of every field's first layer (see :class:`PotentialFields`);
            below 1 the fields start close to constant directions.

    Example::

        fields = sta.FieldBank(dim=16, num_potential=3, num_rotational=2, hidden=32)
        out = sta.flow_step(z, 0.0, g_pot, g_rot, fields)
    """

    def __init__(
        self,
        dim: int,
        num_potential: int,
        num_rotational: int,
        hidden: int,
        rotational: str = "hamiltonian",
        rank: Optional[int] = None,
        weight_scale: float = 1.0,
    ):
        super().__init__()
        # checked here so the error names FieldBank's own arguments, not the banks' num_fields
        _check_sizes(dim=dim, num_potential=num_potential, num_rotational=num_rotational, hidden=hidden)
        self.dim, self.hidden = dim, hidden
        self.potential = PotentialFields(dim, num_potential, hidden, weight_scale=weight_scale)
        self.rotational = RotationalFields(dim, num_rotational, hidden, rotational, rank, weight_scale=weight_scale)

    @property
    def num_potential(self) -> int:
        return self.potential.num_fields

    @property
    def num_rotational(self) -> int:
        return self.rotational.num_fields

    @property
    def construction(self) -> str:
        return self.rotational.construction

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_potential={self.num_potential}, num_rotational={self.num_rotational}"


def _init_weight(num_fields: int, hidden: int, dim: int, scale: float) -> Tensor:
    """First-layer weights ``(K, H, D)`` ~ N(0, scale^2 / D).

    scale 1 puts tanh's inputs at one standard deviation for standard-normal z, so a field's
    direction changes across the latent space from the start; a small scale keeps tanh near its
    linear range, so each field starts as a near-constant direction plus a little curvature (the
    output scale is calibrated afterwards, so the step size does not depend on it).
    """
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"weight_scale: expected a positive finite float, got {scale!r}")
    return torch.randn(num_fields, hidden, dim) * (scale / math.sqrt(dim))


def _check_sizes(**sizes: int) -> None:
    """Each size an int: the numbers of fields (``num_*``) >= 0, dim and hidden >= 1."""
    for name, value in sizes.items():
        minimum = 0 if name.startswith("num_") else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
