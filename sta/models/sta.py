"""``sta``: the method (docs/maths.md section 4): spike-and-slab coefficients drive learned potential + rotational
fields through :func:`sta.flow_step`,

    z_{t+1} = flow_step(z_t, t, g_pot_t, g_rot_t, fields).z

and the path densities are transported by the continuity equation: ``log q_t`` by the posterior
fields' divergence, ``log p_t`` by the prior flow's (learned diffusion scales, or a second bank of
potential fields), with the Hamilton-Jacobi (and, for mlp rotational fields, divergence) penalties.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..fields import FieldBank
from ..ops import flow_step
from ..path import flow_path
from .base import CoefficientModel
from .registry import register

__all__ = ["STA"]


@register
class STA(CoefficientModel):
    name = "sta"
    has_fields = True

    def __init__(self, config):
        super().__init__(config)
        c = config
        D, K = c.latent, c.num_fields
        Kr = 0 if c.rotational == "none" else K
        self.fields = FieldBank(D, K, Kr, c.hidden, "hamiltonian" if Kr == 0 else c.rotational, c.rank,
                                weight_scale=c.field_weight_scale)
        if c.prior == "diffusion":
            # log sigma_{t,k}, sigma initialised at 1
            self.log_sigma = nn.Parameter(torch.zeros(c.transitions, c.num_coefficients))
        else:
            self.prior_fields = FieldBank(D, K, 0, c.hidden, weight_scale=c.field_weight_scale)

    def step(self, z: Tensor, t: int, g: Tensor, outputs=("z",), backend=None):
        g_pot, g_rot = self.split_coefficients(g)
        return flow_step(z, float(t), g_pot, g_rot, self.fields, outputs=outputs,
                         backend=backend or self.config.backend)

    def prior_divergence(self, z: Tensor, t: int, g: Tensor) -> Tensor:
        """Divergence of the prior flow at step t: ``(B,)`` (docs/maths.md 4.1)."""
        if self.config.prior == "diffusion":
            return (g / torch.exp(2 * self.log_sigma[t])).sum(-1)
        g_pot, _ = self.split_coefficients(g)
        return flow_step(z, float(t), g_pot, None, self.prior_fields, outputs=("div",),
                         backend=self.config.backend).div

    def transport(self, z0: Tensor, g: Tensor):
        """The posterior path in one :func:`sta.flow_path` call. No host synchronisation: the
        penalty normalisers (counts of active pairs) stay tensors on the device."""
        c = self.config
        B, T = g.shape[:2]
        outputs = ["z", "div", "hj"]
        if c.rotational == "mlp":
            outputs.append("div_rot")
        g_pot, g_rot = self.split_coefficients(g)  # (B, T, Kp), (B, T, Kr) or None
        out = flow_path(z0, 0.0, g_pot, g_rot, self.fields, outputs=tuple(outputs), backend=c.backend)
        zs = out.z  # (B, T+1, D)
        prior_div = torch.stack([self.prior_divergence(zs[:, t], t, g[:, t]) for t in range(T)], 1)  # (B, T)
        # log q_{t+1} - log p_{t+1} = (log q_0 - log p_0) - sum_{s<=t} (div_s - div^prior_s)
        path = -torch.cumsum(out.div - prior_div, 1).sum(1)
        hj = (out.hj * out.hj).sum() / (g_pot != 0).sum().clamp_min(1)
        active0 = g_pot[:, 0] != 0  # boundary condition: |grad u_k(z, 0)|^2 on the pairs active at t = 0
        v = self.fields.potential.velocity(z0, 0.0)  # (B, K, D)
        hj = hj + ((v * v).sum(-1) * active0).sum() / active0.sum().clamp_min(1)
        div_pen = z0.new_zeros(())
        if out.div_rot is not None and g_rot is not None:
            div_pen = (out.div_rot * out.div_rot).sum() / (g_rot != 0).sum().clamp_min(1)
        return zs, path, c.lambda_hj * hj, c.lambda_div * div_pen
