"""The op ``flow_step``: definition, checks, the torch implementation, and dispatch.

:func:`flow_step` is the fused sparse flow step of docs/ops.md section 1. Inputs are validated once
here; the per-step field parameters are prepared here (time embedding, ``M = A W^T``), so the
backends only ever see plain tensors (:mod:`sta.reference` documents the contract). Its
implementations (:mod:`sta.backends`) define the three term methods of :mod:`sta.reference`;
:func:`sta.flow_path` runs on them too.
"""
from __future__ import annotations

import functools
import numbers
import sys
from collections import abc
from typing import Iterable, NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import reference
from .backends import Backend, Request, define_op, register, select
from .backends import dtype_name as _dtype_name
from .fields import FieldBank

__all__ = ["flow_step", "FlowStepOut", "OUTPUT_NAMES", "prepare_step", "real_number"]

#: Every output flow_step can return.
OUTPUT_NAMES = ("z", "div", "hj", "div_rot", "curl", "u")


class FlowStepOut(NamedTuple):
    """Result of :func:`flow_step`; an entry is None unless it was requested in ``outputs``.

    z:       (B, D)        z_next = z + dt * (sum_k g_pot[b,k] v_k + sum_k g_rot[b,k] r_k)
    div:     (B,)          sum_k g_pot[b,k] lap u_k + sum_k g_rot[b,k] div r_k
    hj:      (B, Kp)       Hamilton-Jacobi residual du_k/dt + |grad u_k|^2 / 2 per active pair
    div_rot: (B, Kr)       divergence of each active rotational field (0 for "hamiltonian")
    curl:    (B, Kp + Kr)  curl energy 0.5 |J - J^T|_F^2 per active pair (0 for potential fields)
    u:       (B, Kp)       potential value u_k per active pair

    Per-pair outputs are 0 where the pair is inactive (its coefficient is 0). They are not
    multiplied by the coefficient.
    """

    z: Optional[Tensor] = None
    div: Optional[Tensor] = None
    hj: Optional[Tensor] = None
    div_rot: Optional[Tensor] = None
    curl: Optional[Tensor] = None
    u: Optional[Tensor] = None


def real_number(name: str, value, dtype: Optional[torch.dtype] = None) -> float:
    """``value`` as a finite Python float, or a TypeError/ValueError naming ``name``.

    ``dtype``: the value must also be finite in that dtype (e.g. dt = 1e300 is finite as a Python
    float but Inf in float32, and ``Inf * 0`` would turn the rows with no active field into NaN).
    Plain Python arithmetic only, so torch.compile traces it as constants.
    """
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a finite float, got {type(value).__name__} {value!r:.60}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range, e.g. 10**400
        raise ValueError(f"{name}: expected a finite float, got an int of {value.bit_length()} bits, "
                         f"beyond the float range") from None
    # A comparison, not math.isfinite: under torch.compile a float argument is traced as a symbolic
    # float, which math.isfinite cannot take; the comparison is False for NaN and +-Inf alike.
    if not abs(number) <= sys.float_info.max:
        raise ValueError(f"{name}: expected a finite float, got {number!r}")
    if dtype is not None and abs(number) > torch.finfo(dtype).max:
        raise ValueError(f"{name}: {number!r} is not finite in {_dtype_name(dtype)} (largest "
                         f"{torch.finfo(dtype).max:.4g}); use a smaller value or float64")
    return number


def _check_outputs(outputs) -> frozenset:
    if isinstance(outputs, str):
        outputs = (outputs,)
    if not isinstance(outputs, abc.Iterable):
        raise TypeError(f"outputs: expected a name or an iterable of names from {OUTPUT_NAMES}, "
                        f"got {type(outputs).__name__}")
    outputs = tuple(outputs)
    unknown = [o for o in outputs if not isinstance(o, str) or o not in OUTPUT_NAMES]
    if unknown:
        raise ValueError(f"outputs: unknown names {unknown}; expected a subset of {OUTPUT_NAMES}")
    return frozenset(outputs)


def _check_coefficients(name: str, g, z: Tensor, K: int) -> Tensor:
    B = z.shape[0]
    if g is None:
        return z.new_zeros(B, K)
    if not isinstance(g, Tensor):
        raise TypeError(f"{name}: expected a Tensor of shape (B, {K}) = ({B}, {K}), got {type(g).__name__}")
    if g.dim() != 2 or tuple(g.shape) != (B, K):
        raise ValueError(f"{name}: expected shape (B, K) = ({B}, {K}), got {tuple(g.shape)}")
    if g.dtype != z.dtype:
        raise TypeError(f"{name}: expected dtype {_dtype_name(z.dtype)} (that of z), got {_dtype_name(g.dtype)}")
    if g.device != z.device:
        raise ValueError(f"{name}: expected device {z.device} (that of z), got {g.device}")
    return g


def _check_inputs(z, t, g_pot, g_rot, fields, dt, outputs):
    if not isinstance(fields, FieldBank):
        raise TypeError(f"fields: expected a sta.FieldBank, got {type(fields).__name__}")
    D = fields.dim
    if not isinstance(z, Tensor):
        raise TypeError(f"z: expected a Tensor of shape (B, {D}), got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"z: expected a floating-point tensor (float32 or float64), got {_dtype_name(z.dtype)}")
    if z.dim() != 2 or z.shape[1] != D:
        raise ValueError(f"z: expected shape (B, D) with D = fields.dim = {D}, got {tuple(z.shape)}")
    g_pot = _check_coefficients("g_pot", g_pot, z, fields.num_potential)
    g_rot = _check_coefficients("g_rot", g_rot, z, fields.num_rotational)
    for pname, param in fields.named_parameters():
        if param.dtype != z.dtype:
            raise TypeError(f"fields: parameter {pname} has dtype {_dtype_name(param.dtype)} but z has "
                            f"{_dtype_name(z.dtype)}; call fields.to(z.dtype)")
        if param.device != z.device:
            raise ValueError(f"fields: parameter {pname} is on {param.device} but z is on {z.device}; "
                             f"call fields.to(z.device)")
    if isinstance(t, Tensor):
        if t.dim() != 0 or not t.is_floating_point():
            raise ValueError(f"t: expected a float or a 0-dim floating-point tensor, got shape "
                             f"{tuple(t.shape)} dtype {_dtype_name(t.dtype)}")
        if t.device != z.device:
            raise ValueError(f"t: expected device {z.device} (that of z), got {t.device}")
    elif not isinstance(t, numbers.Real) or isinstance(t, bool):
        raise TypeError(f"t: expected a finite float or a 0-dim tensor, got {type(t).__name__} {t!r:.60}")
    else:
        real_number("t", t, z.dtype)
    real_number("dt", dt, z.dtype)
    return g_pot, g_rot, _check_outputs(outputs)


#: An implementation defines the three term methods of :mod:`sta.reference`, with its signatures.
define_op("flow_step", ("potential_terms", "hamiltonian_terms", "mlp_terms"))
define_op("flow_path", runs_on="flow_step")  # sta.flow_path chains flow_step's term methods


class TorchFlowStep(Backend):
    """The pure-PyTorch reference (:mod:`sta.reference`): any device, autograd for gradients."""

    op = "flow_step"
    name = "torch"
    dtypes = frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16})
    potential_terms = staticmethod(reference.potential_terms)
    hamiltonian_terms = staticmethod(reference.hamiltonian_terms)
    mlp_terms = staticmethod(reference.mlp_terms)


register(TorchFlowStep())


def select_backend(z: Tensor, backend: str, op: str = "flow_step") -> Backend:
    """The implementation for steps of ``z: (B, D)`` (the one dispatch of :func:`flow_step` and
    :func:`sta.flow_path`, which passes ``op="flow_path"``)."""
    return select(Request(op, z.device, z.dtype, torch.is_grad_enabled()), backend)


def _active_fields(g: Optional[Tensor]) -> Optional[Tensor]:
    """(K,) bool: the fields with at least one active pair in ``g: (B, K)``; None (every field) when
    ``g`` is None or no gradient is recorded: the gate (:func:`sta.fields.gate`) only concerns
    gradients, and skipping it saves ~0.1 ms of a small inference step (bench_flow_step S1 fwd)."""
    return None if g is None or not torch.is_grad_enabled() else (g != 0).any(0)


def prepare_step(fields: FieldBank, t: Union[float, Tensor], g_pot: Optional[Tensor] = None,
                 g_rot: Optional[Tensor] = None):
    """Per-step parameters of both banks: ``(PotentialParams | None, HamiltonianParams | MLPParams | None)``.

    Evaluated once per step, differentiable in t and the parameters. Given the coefficients
    ``g_pot: (B, Kp)`` / ``g_rot: (B, Kr)``, the fields with no active pair get exactly 0 gradients
    and a NaN/Inf they hold reaches no output (:func:`sta.fields.gate`).
    """
    pot = fields.potential.prepare(t, _active_fields(g_pot)) if fields.num_potential else None
    rot = fields.rotational.prepare(t, _active_fields(g_rot)) if fields.num_rotational else None
    return pot, rot


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def float32_under_autocast(op):
    """Run a flow op in float32 when the caller is inside ``torch.autocast`` for z's device.

    Autocast would otherwise hand the op a mix of dtypes (bf16 activations from an autocast
    encoder, float32 field parameters, bf16 products inside the parameter preparation), which no
    backend accepts. The fields, divergences and log-density sums are precision-sensitive (a
    divergence is a sum of D terms of both signs), so they are computed in float32 with autocast
    off, and the outputs are float32. Outside autocast nothing changes (dtypes are validated as usual).
    """

    def cast(x):
        return x.float() if isinstance(x, Tensor) and x.dtype in _LOW_PRECISION else x

    @functools.wraps(op)
    def wrapper(z, t, g_pot, g_rot, *args, **kwargs):
        # meta tensors (shape-only, e.g. a backend's why_not tests): autocast has no such device
        if isinstance(z, Tensor) and z.device.type != "meta" and torch.is_autocast_enabled(z.device.type):
            with torch.autocast(z.device.type, enabled=False):
                return op(cast(z), cast(t), cast(g_pot), cast(g_rot), *args, **kwargs)
        return op(z, t, g_pot, g_rot, *args, **kwargs)

    return wrapper


@float32_under_autocast
def flow_step(
    z: Tensor,
    t: Union[float, Tensor],
    g_pot: Optional[Tensor],
    g_rot: Optional[Tensor],
    fields: FieldBank,
    dt: float = 1.0,
    outputs: Iterable[str] = ("z", "div"),
    backend: str = "auto",
) -> FlowStepOut:
    """One fused sparse flow step (docs/maths.md section 2): move z along a sparse mix of fields.

    Only the active (sample, field) pairs -- those with a non-zero coefficient -- are evaluated.

    Args:
        z: (B, D) latents; float32 or float64 (float16/bfloat16 where the backend supports them).
        t: the step time, a float or a 0-dim tensor (differentiable).
        g_pot: (B, Kp) coefficients of the potential fields, or None (all zero).
        g_rot: (B, Kr) coefficients of the rotational fields, or None (all zero).
        fields: a :class:`sta.FieldBank` with ``dim == D``, parameters on z's device and dtype.
        dt: step size, a finite float (finite in z's dtype too).
        outputs: a name or an iterable of names from ``("z", "div", "hj", "div_rot", "curl", "u")``.
        backend: "auto" (default; ``STA_BACKEND`` overrides it), "torch", "cpu", "triton" or "cuda".

    Returns:
        :class:`FlowStepOut` with
          z: (B, D) the moved latents ``z + dt * sum_k g[b,k] field_k(z_b, t)``;
          div: (B,) the divergence of the mixed flow (``logq_next = logq - dt * div``);
          hj: (B, Kp) Hamilton-Jacobi residuals; div_rot: (B, Kr) rotational divergences;
          curl: (B, Kp + Kr) curl energies; u: (B, Kp) potential values;
        each None unless requested; per-pair outputs are 0 at inactive pairs.

    Differentiable with respect to z, t, g_pot, g_rot and every field parameter. The gradient
    with respect to a zero coefficient is 0 (an inactive pair is not evaluated).

    Non-finite values (the same on every backend):
        * ``t`` and ``dt`` given as Python numbers must be finite, also once cast to z's dtype
          (dt = 1e300 with float32 z is a ValueError naming ``dt``), so ``dt * 0`` is always 0:
          a row with no active field returns z unchanged and div 0.
        * NaN/Inf in z, g_pot, g_rot, a tensor t or the field parameters is not checked (that
          would synchronise the device and break torch.compile); it propagates as in torch, to
          the rows it touches: row b of z, a NaN coefficient (NaN != 0, so the pair is active),
          the active pairs of a field with non-finite parameters.
        * Inactive pairs give exactly zero outputs and gradients whatever the field's parameters
          hold: no backend reads a field with no active pair in the batch, its time-embedding
          weights are zeroed before e(t) and its parameters' gradients are zeroed
          (:func:`sta.fields.gate`), so its gradients, and the gradient of t, are exactly 0 even if
          its parameters are NaN.

    Raises:
        TypeError / ValueError naming the argument for bad shapes, dtypes, devices or values;
        sta.BackendUnavailableError when a named backend cannot run the input.
    """
    g_pot, g_rot, want = _check_inputs(z, t, g_pot, g_rot, fields, dt, outputs)
    impl = select_backend(z, backend)
    pot_params, rot_params = prepare_step(fields, t, g_pot, g_rot)
    return apply_step(impl, z, g_pot, g_rot, pot_params, rot_params, fields.construction, dt, want)


def apply_step(impl, z: Tensor, g_pot: Optional[Tensor], g_rot: Optional[Tensor], pot_params, rot_params,
               construction: str, dt: float, want: frozenset) -> FlowStepOut:
    """The part of :func:`flow_step` after validation, dispatch and :func:`prepare_step`: run the
    backend ``impl`` on prepared per-step parameters and assemble the requested outputs.
    Shared by :func:`flow_step` and :func:`sta.flow_path` (which prepares a whole path at once)."""
    velocity = None
    div = z.new_zeros(z.shape[0]) if "div" in want else None
    result = {}
    if pot_params is not None:
        terms = impl.potential_terms(z, g_pot, pot_params, tuple(sorted(want & {"div", "hj", "u", "curl"})))
        velocity = terms.velocity
        if div is not None:
            div = terms.div
        result.update(hj=terms.hj, u=terms.u, curl_pot=terms.curl)
    if rot_params is not None:
        rot_want = tuple(sorted(want & {"div", "div_rot", "curl"}))
        if construction == "hamiltonian":
            terms = impl.hamiltonian_terms(z, g_rot, rot_params, rot_want)
        else:
            terms = impl.mlp_terms(z, g_rot, rot_params, rot_want)
        velocity = terms.velocity if velocity is None else velocity + terms.velocity
        if div is not None:
            div = div + terms.div
        result.update(div_rot=terms.div_rot, curl_rot=terms.curl)
    B = z.shape[0]
    out = {}
    if "z" in want:
        out["z"] = z + dt * velocity if velocity is not None else z.clone()
    if div is not None:
        out["div"] = div
    if "hj" in want:
        out["hj"] = result.get("hj") if result.get("hj") is not None else z.new_zeros(B, 0)
    if "u" in want:
        out["u"] = result.get("u") if result.get("u") is not None else z.new_zeros(B, 0)
    if "div_rot" in want:
        out["div_rot"] = result.get("div_rot") if result.get("div_rot") is not None else z.new_zeros(B, 0)
    if "curl" in want:
        parts = [result.get("curl_pot"), result.get("curl_rot")]
        parts = [p for p in parts if p is not None]
        out["curl"] = torch.cat(parts, 1) if parts else z.new_zeros(B, 0)
    return FlowStepOut(**out)
