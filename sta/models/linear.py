"""``linear``: spike-and-slab coefficients as in STA, but each field is a learned constant direction.

``z_{t+1} = z_t + sum_k g_t^k d_k``: translations, so the path carries no divergence on either side
of the ELBO and no penalties.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import CoefficientModel, translation_step
from .registry import register

__all__ = ["Linear"]


@register
class Linear(CoefficientModel):
    name = "linear"

    def __init__(self, config):
        super().__init__(config)
        D = config.latent
        self.directions = nn.Parameter(torch.randn(config.num_fields, D) * (0.5 / math.sqrt(D)))  # (K, D)

    def step(self, z: Tensor, t: int, g: Tensor, outputs=("z",), backend=None):
        return translation_step(z, g, self.directions)

    def transport(self, z0: Tensor, g: Tensor):
        zero = z0.new_zeros(())
        return self.rollout(z0, g), z0.new_zeros(z0.shape[0]), zero, zero
