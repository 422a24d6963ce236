"""The ``triton`` backend of :mod:`sta.backends` (imported as ``sta.kernels.backend``).

Implements the kernel contract of :mod:`sta.reference` -- ``potential_terms``,
``hamiltonian_terms``, ``mlp_terms`` -- with the fused sparse kernels of
:mod:`sta.kernels.flow_step`, registered as the torch ops ``sta::triton_flow_step_fwd`` /
``sta::triton_flow_step_bwd``. Per-step products that the reference also builds once per step
are formed here from the parameters with plain torch ops (autograd carries their gradients):
``Q = G - N o N^T`` from :func:`sta.reference.hamiltonian_curl_matrices` for the hamiltonian
curl, and ``C = W2 o W1^T`` for the exact mlp divergence.

The curl of ``mlp`` fields is a diagnostic computed with the reference on the active rows
(explicit Jacobians, O(D^2 H) per row); every other output comes from the kernels.

Importing this module never fails: when triton is missing or broken it registers a backend whose
``why_not`` gives the reason. Where it runs:

* CUDA: float32, with the ``tl.dot`` precision of ``torch.get_float32_matmul_precision()``
  ("highest": "ieee" fp32 products; "high" / "medium": TF32 tensor cores), bfloat16 and float16
  (``tl.dot`` in the input dtype on tensor cores, fp32 accumulation); see
  :func:`sta.kernels.flow_step.precision_for`.
* CPU: only under the Triton interpreter (``TRITON_INTERPRET=1``, set before triton is
  imported), float32 only, and only when asked for by name: the interpreter is a test mode,
  orders of magnitude slower than the reference, so ``auto`` never picks it.
* float64 is not a Triton dtype for these kernels: ``auto`` falls back to another backend.
* Not under ``torch.use_deterministic_algorithms(True)``: the velocity, divergence and dz
  scatter-adds are float atomics, whose order (so the rounding) varies run to run on a GPU;
  ``why_not`` says so and ``auto`` picks a deterministic backend (in warn-only mode the kernels
  run and warn).
"""
from __future__ import annotations

import os

import torch

from sta import reference
from sta.backends import Backend, register

__all__ = ["TritonBackend", "IMPORT_ERROR"]

IMPORT_ERROR = None
try:
    import triton  # noqa: F401

    from . import flow_step as _fs
except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
    IMPORT_ERROR = ("triton is not installed (pip install triton)" if err.name == "triton"
                    else f"import failed: {err}")
except Exception as err:  # pragma: no cover - a broken triton install
    IMPORT_ERROR = f"triton is installed but unusable: {type(err).__name__}: {err}"

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend(Backend):
    """Fused sparse Triton kernels (mixture-of-experts layout), forward and backward."""

    name = "triton"
    dtypes = frozenset({torch.float32, torch.bfloat16, torch.float16})

    @staticmethod
    def precision(dtype: torch.dtype) -> str:
        """``tl.dot`` precision for inputs of ``dtype`` (:func:`sta.kernels.flow_step.precision_for`)."""
        return _fs.precision_for(dtype)

    def unavailable(self) -> list[str]:
        return [IMPORT_ERROR] if IMPORT_ERROR else []

    def why_not(self, request) -> list[str]:
        reasons = self.unavailable()
        if reasons:
            return reasons
        dev, dtype = request.device.type, request.dtype
        if dtype == torch.float64:
            reasons.append("float64 is not a Triton dtype for these kernels (float32 everywhere, "
                           "bfloat16/float16 on GPU); use backend='auto' or 'torch' for float64")
        elif dtype not in self.dtypes:
            reasons.append(f"dtype {str(dtype).replace('torch.', '')} not supported "
                           f"(supports float32; bfloat16/float16 on GPU)")
        if dev == "cpu":
            if not _interpreting():
                reasons.append("Triton needs a CUDA device; set TRITON_INTERPRET=1 to run the "
                               "interpreter on CPU (slow, for tests)")
            elif dtype in _LOW_PRECISION:
                reasons.append("bfloat16/float16 only on GPU (the Triton interpreter computes float32)")
        elif dev != "cuda":
            reasons.append(f"device {dev} is not supported by Triton (CUDA, or CPU under TRITON_INTERPRET=1)")
        if _fs.deterministic_refusal():
            reasons.append(_fs.deterministic_refusal())
        return reasons

    def why_not_auto(self, request) -> list[str]:
        """Reasons ``auto`` must skip this backend even if it can run: the CPU interpreter is a test mode."""
        reasons = self.why_not(request)
        if not reasons and request.device.type == "cpu":
            reasons.append("the Triton interpreter on CPU is a test mode; ask for backend='triton' explicitly")
        return reasons

    # -- the kernel contract -----------------------------------------------------------------

    def potential_terms(self, z, g, p, want):
        vel, div, hj, u = _fs.FlowStepFunction.apply(
            z, g, _fs.POTENTIAL, p.W, p.c, p.a, p.de, precision=self.precision(z.dtype))
        curl = z.new_zeros(g.shape) if "curl" in want else None  # a gradient field has no curl
        return reference.FieldTerms(velocity=vel, div=div if "div" in want else None,
                                    hj=hj if "hj" in want else None, u=u if "u" in want else None, curl=curl)

    def hamiltonian_terms(self, z, g, p, want):
        want_curl = "curl" in want and g.shape[1] > 0
        Q = None
        if want_curl:
            G, N = reference.hamiltonian_curl_matrices(p)
            Q = G - N * N.transpose(1, 2)  # curl = d^T G d - d^T (N o N^T) d
        vel, _, curl, _ = _fs.FlowStepFunction.apply(
            z, g, _fs.HAMILTONIAN, p.W, p.c, p.a, None, p.M, None, Q, want_curl, self.precision(z.dtype))
        return reference.FieldTerms(
            velocity=vel,
            div=z.new_zeros(z.shape[0]) if "div" in want else None,  # skew times symmetric: exactly 0
            div_rot=z.new_zeros(g.shape) if "div_rot" in want else None,
            curl=(curl if want_curl else z.new_zeros(g.shape)) if "curl" in want else None,
        )

    def mlp_terms(self, z, g, p, want):
        C = p.W2 * p.W1.transpose(1, 2)  # (K, D, H): div r = sum_i s2'_i [C s1']_i
        vel, div, div_rot, _ = _fs.FlowStepFunction.apply(
            z, g, _fs.MLP, p.W1, p.c1, None, None, p.W2, p.b2, C, False, self.precision(z.dtype))
        curl = None
        if "curl" in want:  # diagnostic: explicit Jacobians with the reference, active rows only
            curl = reference.mlp_terms(z, g, p, ("curl",)).curl
        return reference.FieldTerms(velocity=vel, div=div if "div" in want else None,
                                    div_rot=div_rot if "div_rot" in want else None, curl=curl)


register(TritonBackend())
