"""``static``: no transitions, ``z_0`` is decoded for every frame (docs/maths.md section 6: the lower bar for equivariance)."""
from __future__ import annotations

from torch import Tensor

from ..ops import FlowStepOut
from .base import Initial, PathTerms, STAModel
from .registry import register

__all__ = ["Static"]


@register
class Static(STAModel):
    """Every frame is decoded from ``z_0 ~ q(z_0 | x_0)``; the path term repeats z_0's density at
    every step (``kl_path = T * kl_z0``), and there is nothing to identify."""

    name = "static"
    has_transitions = False

    def step(self, z: Tensor, t: int, g: Tensor, outputs=("z",), backend=None):
        return FlowStepOut(z=z, div=z.new_zeros(z.shape[0]))

    def infer_coefficients(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Zeros ``(B, T, Kc)`` (no coefficients to infer)."""
        z = x.new_zeros(x.shape[0], x.shape[1] - 1, self.config.num_coefficients)
        return z, z

    def latent_path(self, x: Tensor, initial: Initial, temperature: float, slab: bool, generator) -> PathTerms:
        B, T = x.shape[0], x.shape[1] - 1
        zero = x.new_zeros(())
        z = initial.z[:, None].expand(B, T + 1, initial.z.shape[1])
        return PathTerms(z, T * initial.kl, zero, zero, zero, zero)
