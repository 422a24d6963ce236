"""The whole latent path of a sequence in one call: ``flow_path`` = T chained ``flow_step`` calls.

What a training iteration needs from the flow ops is not one step but the T transitions of every
sequence in the batch. Calling :func:`sta.flow_step` T times re-forms, at every step, the field
parameters that do not depend on t -- above all ``M = A W^T`` of the hamiltonian rotational fields,
a ``(K, D, D) x (K, D, H)`` batched product that dominated a training iteration at D = 1024, K = 32
(see benchmarks/bench_train.py). :func:`flow_path` validates and dispatches once, prepares those
parameters once per call (the hidden bias ``b + e(t)`` is the only per-step part, the time embeddings
of all T steps one product), and autograd then accumulates their gradient across the steps into one
backward product instead of T.

The T steps are the registered op ``torch.ops.sta.flow_path`` on the prepared parameters, a
``CompositeImplicitAutograd`` op over the chosen backend's registered step ops (on every backend):
its fake kernel and its autograd formula are theirs. So ``torch.compile`` and ``opcheck`` see one op
whose pieces are already checked, and the backward is the step ops' own backward: each step saves
its inputs and, on the cpu and cuda backends, the per-pair rows its backward would otherwise
recompute (docs/ops.md, "flow_path" and "Saved rows", gives the memory and the time).
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Optional, Union

import torch
from torch import Tensor

from .backends import Request, select
from .backends.library import register_composite_op
from .fields import FieldBank, as_time_tensor
from .ops import (OUTPUT_NAMES, _active_fields, _check_inputs, _dtype_name, apply_step, float32_under_autocast,
                  flow_step, select_backend)
from .reference import HamiltonianParams, MLPParams, PotentialParams, mlp_divergence_matrix

__all__ = ["flow_path", "FlowPathOut", "chained_flow_path"]


class FlowPathOut(NamedTuple):
    """Outputs of :func:`flow_path`, stacked per step (None unless requested).

    z: (B, T+1, D) with ``z[:, 0] = z0``; div: (B, T); hj: (B, T, Kp); div_rot: (B, T, Kr);
    curl: (B, T, Kp+Kr); u: (B, T, Kp).
    """

    z: Optional[Tensor] = None
    div: Optional[Tensor] = None
    hj: Optional[Tensor] = None
    div_rot: Optional[Tensor] = None
    curl: Optional[Tensor] = None
    u: Optional[Tensor] = None


def _check_path_coefficients(name: str, g, z0: Tensor, K: int, T: Optional[int]) -> Optional[Tensor]:
    if g is None:
        return None
    if not isinstance(g, Tensor):
        raise TypeError(f"{name}: expected a Tensor of shape (B, T, {K}), got {type(g).__name__}")
    if g.dim() != 3 or g.shape[0] != z0.shape[0] or g.shape[2] != K or (T is not None and g.shape[1] != T):
        want = f"({z0.shape[0]}, {'T' if T is None else T}, {K})"
        raise ValueError(f"{name}: expected shape (B, T, K) = {want}, got {tuple(g.shape)}")
    if g.dtype != z0.dtype:
        raise TypeError(f"{name}: expected dtype {_dtype_name(z0.dtype)} (that of z0), got {_dtype_name(g.dtype)}")
    return g


@float32_under_autocast
def flow_path(
    z0: Tensor,
    t0: Union[float, Tensor],
    g_pot: Optional[Tensor],
    g_rot: Optional[Tensor],
    fields: FieldBank,
    dt: float = 1.0,
    outputs: Iterable[str] = ("z", "div"),
    backend: str = "auto",
) -> FlowPathOut:
    """T fused sparse flow steps in one call; equal to chaining :func:`sta.flow_step`.

    Step t (t = 0..T-1) runs at time ``t0 + t * dt`` from ``z[:, t]`` with coefficients
    ``g_pot[:, t]``, ``g_rot[:, t]``, and gives ``z[:, t+1]``. Forward values and gradients equal
    those of T chained ``flow_step`` calls (same backend, same sparsity contract: a zero coefficient
    is not evaluated and receives no gradient).

    Args:
        z0: (B, D) initial latents (float32 or float64).
        t0: time of the first step, a float or a 0-dim tensor (differentiable).
        g_pot: (B, T, Kp) potential coefficients per step, or None (all zero).
        g_rot: (B, T, Kr) rotational coefficients per step, or None (all zero).
            At least one of g_pot, g_rot must be given (it fixes T).
        fields: a :class:`sta.FieldBank` with ``dim == D``.
        dt: step size, a finite float.
        outputs: names from ``("z", "div", "hj", "div_rot", "curl", "u")``.
        backend: as for :func:`sta.flow_step`; chosen once for the whole path.

    Returns:
        :class:`FlowPathOut`: z (B, T+1, D), div (B, T), hj (B, T, Kp), div_rot (B, T, Kr),
        curl (B, T, Kp+Kr), u (B, T, Kp); None unless requested.

    The field parameters that do not depend on t are prepared once; as for flow_step, the fields
    that have no active pair anywhere in the path get exactly 0 gradients whatever they hold
    (:func:`sta.fields.gate`).
    """
    if not isinstance(fields, FieldBank):
        raise TypeError(f"fields: expected a sta.FieldBank, got {type(fields).__name__}")
    if not isinstance(z0, Tensor):
        raise TypeError(f"z0: expected a Tensor of shape (B, {fields.dim}), got {type(z0).__name__}")
    if z0.dim() != 2:
        raise ValueError(f"z0: expected shape (B, D) with D = fields.dim = {fields.dim}, got {tuple(z0.shape)}")
    if g_pot is None and g_rot is None:
        raise ValueError("g_pot, g_rot: at least one must be a (B, T, K) tensor (it gives the number of steps T)")
    g_pot = _check_path_coefficients("g_pot", g_pot, z0, fields.num_potential, None)
    g_rot = _check_path_coefficients("g_rot", g_rot, z0, fields.num_rotational,
                                     None if g_pot is None else g_pot.shape[1])
    B, T = z0.shape[0], (g_pot if g_pot is not None else g_rot).shape[1]
    if g_pot is None:
        g_pot = z0.new_zeros(B, T, fields.num_potential)
    if g_rot is None:
        g_rot = z0.new_zeros(B, T, fields.num_rotational)
    # Every per-step check of flow_step (z, devices, dtypes of the parameters, t, dt, outputs), once.
    _, _, want = _check_inputs(z0, t0, g_pot[:, 0] if T else None, g_rot[:, 0] if T else None, fields, dt, outputs)
    impl = select_backend(z0, backend, op="flow_path")
    # Everything that does not depend on t is prepared once (M = A W^T above all), the time
    # embeddings of all T steps in one product: times (T,) -> hidden biases (T, K, H).
    times = as_time_tensor(t0, z0) + dt * torch.arange(T, dtype=z0.dtype, device=z0.device)
    # Fields with an active pair somewhere in the path: (Kp,) / (Kr,) bool, on the device (no sync).
    potential = rotational = []
    if fields.num_potential:
        potential = list(fields.potential.prepare(times, _active_fields(g_pot.flatten(0, 1))))
    if fields.num_rotational:
        prepared = fields.rotational.prepare(times, _active_fields(g_rot.flatten(0, 1)))
        if isinstance(prepared, MLPParams) and want & {"div", "div_rot"}:
            # once, not per step; by the backend's own kernel when it has one
            form = getattr(impl, "divergence_matrix", mlp_divergence_matrix)
            prepared = prepared._replace(Pdiv=form(prepared))
        rotational = [t for t in prepared if t is not None]
    names = [name for name in OUTPUT_NAMES if name in want]
    # dt * 1.0: an int dt becomes a float, and a symbolic dt under torch.compile stays symbolic
    # (float() would specialise the graph on its value)
    result = flow_path_op(z0, g_pot, g_rot, potential, rotational, fields.construction, dt * 1.0, names, impl.name)
    return FlowPathOut(**dict(zip(names, result)))


def _flow_path_composite(z0: Tensor, g_pot: Tensor, g_rot: Tensor, potential: list, rotational: list,
                         construction: str, dt: float, outputs: list, backend: str) -> list:
    """The op ``sta::flow_path`` on prepared parameters: T steps of ``backend``'s flow_step.

    z0: (B, D); g_pot: (B, T, Kp); g_rot: (B, T, Kr); potential: the fields of
    :class:`sta.reference.PotentialParams` (``[]`` when Kp = 0) with ``c, de: (T, Kp, H)``;
    rotational: those of ``HamiltonianParams`` / ``MLPParams`` (``[]`` when Kr = 0) with the hidden
    bias ``(T, Kr, H)`` (and, for the mlp fields, ``Pdiv`` when it was prepared). Returns the
    ``outputs`` (names in :data:`sta.ops.OUTPUT_NAMES` order), stacked per step as in
    :class:`FlowPathOut`.
    """
    # The backend by the name sta.flow_path resolved (a direct call of the op names one too): this
    # loads its ops when no caller did (opcheck), and is not a second user-level dispatch.
    impl = select(Request("flow_step", z0.device, z0.dtype, torch.is_grad_enabled()), backend)
    B, T = g_pot.shape[:2]
    pot = PotentialParams(*potential) if potential else None
    rot = None
    if rotational:
        rot = (HamiltonianParams if construction == "hamiltonian" else MLPParams)(*rotational)
    want = frozenset(outputs) | {"z"}
    steps, z = [], z0
    for t in range(T):
        out = apply_step(impl, z, g_pot[:, t], g_rot[:, t], _at_step(pot, t), _at_step(rot, t), construction, dt,
                         want)
        z = out.z
        steps.append(out)
    widths = {"hj": g_pot.shape[2], "div_rot": g_rot.shape[2], "curl": g_pot.shape[2] + g_rot.shape[2],
              "u": g_pot.shape[2]}
    result = []
    for name in outputs:
        if name == "z":
            result.append(torch.stack([z0] + [s.z for s in steps], 1))
        elif T:
            result.append(torch.stack([getattr(s, name) for s in steps], 1))
        else:
            result.append(z0.new_zeros((B, 0) if name == "div" else (B, 0, widths[name])))
    return result


def _at_step(params, t: int):
    """The parameters of step t: the rows t of the per-step members of prepared path parameters."""
    if params is None:
        return None
    if isinstance(params, PotentialParams):
        return params._replace(c=params.c[t], de=params.de[t])
    if isinstance(params, HamiltonianParams):
        return params._replace(c=params.c[t])
    return params._replace(c1=params.c1[t])


#: ``torch.ops.sta.flow_path``: registered once, composite over the backends' registered step ops.
flow_path_op = register_composite_op(
    "sta::flow_path",
    "flow_path(Tensor z0, Tensor g_pot, Tensor g_rot, Tensor[] potential, Tensor[] rotational, "
    "str construction, float dt, str[] outputs, str backend) -> Tensor[]",
    _flow_path_composite)


def chained_flow_path(z0, t0, g_pot, g_rot, fields, dt=1.0, outputs=("z", "div"), backend="auto") -> FlowPathOut:
    """The definition of :func:`flow_path`: T separate :func:`sta.flow_step` calls, every field
    parameter (``M = A W^T`` included) formed again at every step. Slower; the reference that the
    tests and benchmarks/bench_train.py compare flow_path with. Same arguments and result."""
    T = (g_pot if g_pot is not None else g_rot).shape[1]
    z, steps = z0, []
    for t in range(T):
        out = flow_step(z, t0 + t * dt, None if g_pot is None else g_pot[:, t], None if g_rot is None else g_rot[:, t],
                        fields, dt=dt, outputs=tuple(set(outputs) | {"z"}), backend=backend)
        steps.append(out)
        z = out.z
    stacked = {"z": torch.stack([z0] + [s.z for s in steps], 1)} if "z" in outputs else {}
    for name in outputs:
        if name != "z":
            stacked[name] = torch.stack([getattr(s, name) for s in steps], 1)
    return FlowPathOut(**stacked)
