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
        c = self.config
        B, T = g.shape[:2]
        zero = z0.new_zeros(())
        outputs = ["z", "div", "hj"]
        if c.rotational == "mlp":
            outputs.append("div_rot")
        zs, cum, path = [z0], z0.new_zeros(B), z0.new_zeros(B)
        hj_sum, hj_count, dr_sum, dr_count = zero, 0, zero, 0
        for t in range(T):
            out = self.step(zs[-1], t, g[:, t], outputs=tuple(outputs))
            # log q_{t+1} - log p_{t+1} = (log q_0 - log p_0) - sum_{s<=t} (div_s - div^prior_s)
            cum = cum + out.div - self.prior_divergence(zs[-1], t, g[:, t])
            path = path - cum
            g_pot, g_rot = self.split_coefficients(g[:, t])
            active = g_pot != 0
            hj_sum = hj_sum + (out.hj * out.hj).sum()
            hj_count += int(active.sum())
            if out.div_rot is not None and g_rot is not None:
                dr_sum = dr_sum + (out.div_rot * out.div_rot).sum()
                dr_count += int((g_rot != 0).sum())
            zs.append(out.z)
        hj = hj_sum / max(hj_count, 1)
        active0 = self.split_coefficients(g[:, 0])[0] != 0
        if active0.any():  # boundary condition: |grad u_k(z, 0)|^2 on the pairs active at t = 0
            v = self.fields.potential.velocity(z0, 0.0)  # (B, K, D)
            hj = hj + ((v * v).sum(-1) * active0).sum() / active0.sum()
        div_pen = dr_sum / max(dr_count, 1)
        return torch.stack(zs, 1), path, c.lambda_hj * hj, c.lambda_div * div_pen
