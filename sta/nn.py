"""Drop-in modules over the functional ops."""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor, nn

from .backends import check_backend_name
from .fields import FieldBank
from .ops import flow_step, real_number

__all__ = ["SparseFlowLayer"]


class SparseFlowLayer(nn.Module):
    """A sparse flow step with its log-density update, owning its fields.

    Moves ``z: (B, D)`` along ``sum_k g_pot[b,k] grad u_k + sum_k g_rot[b,k] r_k`` for one step of
    size ``dt`` and carries the log-density by the continuity equation,
    ``logq_next = logq - dt * div``.

    Args:
        dim: latent size D.
        num_potential: Kp, curl-free fields.
        num_rotational: Kr, rotational fields.
        hidden: hidden width H of each field.
        rotational: "hamiltonian" (exactly divergence-free) or "mlp".
        rank: low-rank skew matrices for "hamiltonian" (None = dense).
        dt: step size.
        backend: "auto", "torch", "cpu", "triton" or "cuda" (see :func:`sta.flow_step`).

    Example::

        layer = SparseFlowLayer(dim=16, num_potential=4, num_rotational=2, hidden=32)
        z_next, logq_next = layer(z, 0.0, g_pot, g_rot, logq)   # logq: (B,)
        z_next, dlogq = layer(z, 0.0, g_pot, g_rot)             # dlogq = -dt * div: (B,)
    """

    def __init__(
        self,
        dim: int,
        num_potential: int,
        num_rotational: int,
        hidden: int,
        rotational: str = "hamiltonian",
        rank: Optional[int] = None,
        dt: float = 1.0,
        backend: str = "auto",
    ):
        super().__init__()
        self.fields = FieldBank(dim, num_potential, num_rotational, hidden, rotational, rank)
        self.dt = real_number("dt", dt)  # a bad dt fails here, not at the first forward
        self.backend = check_backend_name(backend)

    def forward(
        self,
        z: Tensor,
        t: Union[float, Tensor],
        g_pot: Optional[Tensor],
        g_rot: Optional[Tensor],
        logq: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor]:
        """z: (B, D), g_pot: (B, Kp), g_rot: (B, Kr), logq: (B,) or None.

        Returns ``(z_next: (B, D), logq_next: (B,))``, or ``(z_next, -dt * div)`` when logq is None.
        Non-finite values follow :func:`sta.flow_step`; a non-finite logq propagates.
        """
        out = flow_step(z, t, g_pot, g_rot, self.fields, dt=self.dt, outputs=("z", "div"), backend=self.backend)
        dlogq = -self.dt * out.div
        if logq is None:
            return out.z, dlogq
        if not isinstance(logq, Tensor):
            raise TypeError(f"logq: expected a Tensor of shape (B,) = {tuple(dlogq.shape)} or None, "
                            f"got {type(logq).__name__}")
        if not logq.is_floating_point():
            raise TypeError(f"logq: expected a floating-point tensor, got {str(logq.dtype).replace('torch.', '')}")
        if logq.shape != dlogq.shape:
            raise ValueError(f"logq: expected shape (B,) = {tuple(dlogq.shape)}, got {tuple(logq.shape)}")
        if logq.device != dlogq.device:
            raise ValueError(f"logq: expected device {dlogq.device} (that of z), got {logq.device}")
        return out.z, logq + dlogq

    def extra_repr(self) -> str:
        return f"dt={self.dt}, backend={self.backend!r}"
