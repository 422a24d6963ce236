"""The ``triton`` backend: the Triton kernels of :mod:`sta.kernels`, for every op.

``flow_step``: the contract of :mod:`sta.reference` -- ``potential_terms``, ``hamiltonian_terms``,
``mlp_terms`` -- with the fused sparse kernels of :mod:`sta.kernels.flow_step`, registered as the
torch ops ``sta::triton_flow_step_fwd`` / ``sta::triton_flow_step_bwd``. Per-step products that the
reference also builds once per step are formed here from the parameters with plain torch ops
(autograd carries their gradients): ``C = G - N o N^T`` from
:func:`sta.reference.hamiltonian_curl_matrices` for the hamiltonian curl, and ``Pdiv = W2 o W1^T``
for the exact mlp divergence (names of docs/ops.md section 7). The curl of ``mlp`` fields is a diagnostic computed with the reference
on the active rows (explicit Jacobians, O(D^2 H) per row); every other output comes from the kernels.

``grid_transport``: :mod:`sta.kernels.grid_transport`, the torch op ``sta::triton_grid_transport``
(float32, float64; forward only).

Importing this module never fails: when triton is missing or broken it registers implementations
whose ``why_not`` gives the reason. Where they run:

* CUDA: the flow step in float32, with the ``tl.dot`` precision of
  ``torch.get_float32_matmul_precision()`` ("highest": "ieee" fp32 products; "high" / "medium":
  TF32 tensor cores), bfloat16 and float16 (``tl.dot`` in the input dtype on tensor cores, fp32
  accumulation); see :func:`sta.kernels.flow_step.precision_for`.
* CPU: only under the Triton interpreter (:func:`sta.kernels.configs.interpreting`, ``TRITON_INTERPRET=1``
  set before triton is imported), float32 only for the flow step, and only when asked for by name:
  the interpreter is a test mode, orders of magnitude slower than the reference, so ``auto`` never
  picks it.
* float64 is not a Triton dtype for the flow-step kernels: ``auto`` falls back to another backend.
* Not under ``torch.use_deterministic_algorithms(True)`` for the flow step: the velocity,
  divergence and dz scatter-adds are float atomics, whose order (so the rounding) varies run to run
  on a GPU; ``why_not`` says so and ``auto`` picks a deterministic backend (in warn-only mode the
  kernels run and warn).
"""
from __future__ import annotations

import torch

from .. import reference
from ..grid.transport import LIMITERS
from . import Backend, dtype_name, register

__all__ = ["TritonFlowStep", "TritonGridTransport", "IMPORT_ERROR"]

IMPORT_ERROR = None
try:
    import triton  # noqa: F401

    from ..kernels import flow_step as _fs
    from ..kernels import grid_transport as _gt
    from ..kernels.configs import interpreting
except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
    IMPORT_ERROR = ("triton is not installed (pip install triton)" if err.name == "triton"
                    else f"import failed: {err}")
except Exception as err:  # pragma: no cover - a broken triton install
    IMPORT_ERROR = f"triton is installed but unusable: {type(err).__name__}: {err}"

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class _Triton(Backend):
    """Where Triton runs: CUDA tensors, or CPU tensors under the interpreter (named only)."""

    name = "triton"

    def unavailable(self) -> list[str]:
        return [IMPORT_ERROR] if IMPORT_ERROR else []

    def _device_reasons(self, request) -> list[str]:
        dev = request.device.type
        if dev == "cpu" and not interpreting():
            return ["Triton needs a CUDA device; set TRITON_INTERPRET=1 to run the interpreter on CPU "
                    "(slow, for tests)"]
        if dev not in ("cpu", "cuda"):
            return [f"device {dev} is not supported by Triton (CUDA, or CPU under TRITON_INTERPRET=1)"]
        return []

    def why_not_auto(self, request) -> list[str]:
        """Reasons ``auto`` must skip this backend even if it can run: the CPU interpreter is a test mode."""
        reasons = self.why_not(request)
        if not reasons and request.device.type == "cpu":
            reasons.append("the Triton interpreter on CPU is a test mode; ask for backend='triton' explicitly")
        return reasons


class TritonFlowStep(_Triton):
    """Fused sparse Triton kernels (mixture-of-experts layout), forward and backward."""

    op = "flow_step"
    dtypes = frozenset({torch.float32, torch.bfloat16, torch.float16})

    @staticmethod
    def precision(dtype: torch.dtype) -> str:
        """``tl.dot`` precision for inputs of ``dtype`` (:func:`sta.kernels.flow_step.precision_for`)."""
        return _fs.precision_for(dtype)

    def why_not(self, request) -> list[str]:
        reasons = self.unavailable()
        if reasons:
            return reasons
        dtype = request.dtype
        if dtype == torch.float64:
            reasons.append("float64 is not a Triton dtype for these kernels (float32 everywhere, "
                           "bfloat16/float16 on GPU); use backend='auto' or 'torch' for float64")
        elif dtype not in self.dtypes:
            reasons.append(f"dtype {dtype_name(dtype)} not supported "
                           f"(supports float32; bfloat16/float16 on GPU)")
        reasons.extend(self._device_reasons(request))
        if request.device.type == "cpu" and not reasons and dtype in _LOW_PRECISION:
            reasons.append("bfloat16/float16 only on GPU (the Triton interpreter computes float32)")
        if _fs.deterministic_refusal():
            reasons.append(_fs.deterministic_refusal())
        return reasons

    def potential_terms(self, z, g, p, want):
        vel, div, hj, u = _fs.triton_flow_step(
            z, g, _fs.POTENTIAL, p.W, p.c, p.a, p.de, precision=self.precision(z.dtype))
        curl = z.new_zeros(g.shape) if "curl" in want else None  # a gradient field has no curl
        return reference.FieldTerms(velocity=vel, div=div if "div" in want else None,
                                    hj=hj if "hj" in want else None, u=u if "u" in want else None, curl=curl)

    def hamiltonian_terms(self, z, g, p, want):
        want_curl = "curl" in want and g.shape[1] > 0
        C = None
        if want_curl:
            G, N = reference.hamiltonian_curl_matrices(p)
            C = G - N * N.transpose(1, 2)  # curl = d^T G d - d^T (N o N^T) d
        vel, _, curl, _ = _fs.triton_flow_step(
            z, g, _fs.HAMILTONIAN, p.W, p.c, p.a, None, p.M, None, C, want_curl, self.precision(z.dtype))
        return reference.FieldTerms(
            velocity=vel,
            div=z.new_zeros(z.shape[0]) if "div" in want else None,  # skew times symmetric: exactly 0
            div_rot=z.new_zeros(g.shape) if "div_rot" in want else None,
            curl=(curl if want_curl else z.new_zeros(g.shape)) if "curl" in want else None,
        )

    def mlp_terms(self, z, g, p, want):
        Pdiv = reference.mlp_divergence_matrix(p)  # (K, D, H): div r = sum_i s2'_i [Pdiv s1']_i
        vel, div, div_rot, _ = _fs.triton_flow_step(
            z, g, _fs.MLP, p.W1, p.c1, None, None, p.W2, p.b2, Pdiv, False, self.precision(z.dtype))
        curl = None
        if "curl" in want:  # diagnostic: explicit Jacobians with the reference, active rows only
            curl = reference.mlp_terms(z, g, p, ("curl",)).curl
        return reference.FieldTerms(velocity=vel, div=div if "div" in want else None,
                                    div_rot=div_rot if "div_rot" in want else None, curl=curl)


class TritonGridTransport(_Triton):
    """One finite-volume step in one kernel launch (float32, float64; forward only)."""

    op = "grid_transport"
    differentiable = False

    def why_not(self, request) -> list[str]:
        return self.unavailable() or self._device_reasons(request) + super().why_not(request)

    def transport(self, rho, faces, coef, periodic, limiter):
        u2 = faces[2] if len(faces) == 3 else None
        return _gt.grid_transport_op(rho, faces[0], faces[1], u2, list(coef), periodic, LIMITERS[limiter])


register(TritonFlowStep())
register(TritonGridTransport())
