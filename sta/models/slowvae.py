"""``slowvae``: every frame encoded, a sparse (Laplace) prior on latent steps (Klindt et al. 2021).

Generative model: ``z_0 ~ N(0, I)``, ``z_t = z_{t-1} + u_t`` with ``u_t ~ Laplace(0, 1 / rate)`` per
coordinate (``rate = slow_rate``, 6 by default as in the authors' code), ``x_t ~ p(x | z_t)``.
Inference: ``q(z_t | x_t)`` is the shared encoder applied to every frame. The ELBO's path term is

    kl_path = sum_{t>=1} E_q[log q(z_t | x_t) - log Laplace(z_t; z_{t-1}, 1 / rate)]

with ``z_{t-1}`` the posterior sample of the previous frame and the expectation over ``z_t`` in closed
form (:func:`sta.priors.gaussian_laplace_cross_entropy`). Klindt et al. centre the Laplace on the
previous posterior mean and weight the terms (their gamma = 10); here it is the unweighted bound.

How a model without fields is rolled forward (evaluation and plots). SlowVAE has no transition of
its own, so it gets the one of ``linear``, with directions it did not learn by gradient:
``z_{t+1} = z_t + sum_k g_t^k d_k``. The K directions ``d_k`` (buffer ``directions: (K, D)``) are the
principal directions of the latent steps ``mu(x_{t+1}) - mu(x_t)`` between consecutive posterior
means, tracked during training like batch-norm statistics (a debiased moving average of their second
moment, momentum :data:`STEP_MOMENTUM`; each rank keeps its own under torchrun and rank 0's is saved),
each scaled to the root-mean-square step along it and signed along the mean step. Evaluation infers
the coefficients the way it does for sta, from consecutive frames: ``g_t^k`` is the projection of
the step between the encodings of ``x_t`` and ``x_{t+1}`` on ``d_k`` (in units of ``d_k``, so about
1 for a typical step), and ``|g_t^k|`` is field k's score (identification; active when > 1/2). So
the prediction of frame t moves ``mu(x_0)`` by the K-dimensional part of the encoded steps, the same
K numbers per step that sta's and linear's coefficients carry.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..priors import gaussian_laplace_cross_entropy
from .base import LOG_2PI, Initial, PathTerms, STAModel, reparameterise, translation_step
from .registry import register

__all__ = ["SlowVAE", "principal_steps", "STEP_MOMENTUM"]

#: Weight of the newest batch in the moving moments of the latent steps: an average over the last
#: ~50 training batches (the encoder moves during training, so older steps go stale).
STEP_MOMENTUM = 0.02


@register
class SlowVAE(STAModel):
    name = "slowvae"
    options = {"slow_rate": (6.0, 0.0, True)}  # default, lower bound, bound excluded

    def __init__(self, config):
        super().__init__(config)
        D, K = config.latent, config.num_fields
        if K > D:
            raise ValueError(f"num_fields: slowvae rolls forward along K <= latent = {D} directions, got {K}")
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("step_mean", torch.zeros(D))
        self.register_buffer("step_moment", torch.zeros(D, D))
        self.register_buffer("directions", torch.zeros(K, D))

    def latent_path(self, x: Tensor, initial: Initial, temperature: float, slab: bool, generator) -> PathTerms:
        B, T = x.shape[0], x.shape[1] - 1
        mu, logvar = self.encode(x[:, 1:].flatten(0, 1))
        mu, logvar = mu.view(B, T, -1), logvar.view(B, T, -1)
        z = torch.cat([initial.z[:, None], reparameterise(mu, logvar, generator)], 1)  # (B, T+1, D)
        log_q = -0.5 * (logvar + LOG_2PI + 1).sum(-1)  # E log q(z_t | x_t): minus the entropy, (B, T)
        # z_t - z_{t-1} ~ N(mu_t - z_{t-1}, sigma_t^2) given the previous sample
        cross = gaussian_laplace_cross_entropy(mu - z[:, :-1], logvar, 1.0 / self.option("slow_rate")).sum(-1)
        if self.training:
            self.track_steps(torch.cat([initial.mu[:, None], mu], 1))
        zero = x.new_zeros(())
        return PathTerms(z, (log_q + cross).sum(1), zero, zero, zero, zero)

    @torch.no_grad()
    def track_steps(self, mu: Tensor) -> None:
        """Fold the latent steps of posterior means ``mu: (B, T+1, D)`` into the moving moments and
        refresh ``directions`` (see the module docstring)."""
        delta = (mu[:, 1:] - mu[:, :-1]).flatten(0, 1).to(self.step_moment.dtype)  # (B*T, D)
        self.step_count += 1
        self.step_mean.lerp_(delta.mean(0), STEP_MOMENTUM)
        self.step_moment.lerp_(delta.T @ delta / delta.shape[0], STEP_MOMENTUM)
        debias = 1.0 - (1.0 - STEP_MOMENTUM) ** self.step_count  # the moments start at 0 (a tensor: no host sync)
        self.directions.copy_(principal_steps(self.step_moment / debias, self.step_mean, self.config.num_fields))

    def step(self, z: Tensor, t: int, g: Tensor, outputs=("z",), backend=None):
        return translation_step(z, g, self.directions)

    @torch.no_grad()
    def infer_coefficients(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``g: (B, T, K)`` the projections of the encoded steps on the directions; score ``|g|``."""
        B, T1 = x.shape[:2]
        mu = self.encode(x.flatten(0, 1))[0].view(B, T1, -1)
        d = self.directions
        norm2 = (d * d).sum(-1)  # (K,); 0 before any training step: no direction, g = 0
        g = (mu[:, 1:] - mu[:, :-1]) @ d.T / norm2.clamp_min(torch.finfo(d.dtype).tiny)
        return g, g.abs()


def principal_steps(moment: Tensor, mean: Tensor, k: int) -> Tensor:
    """The ``k`` leading eigenvectors of the step second moment ``moment: (D, D)``, each scaled by
    the root of its eigenvalue and signed so that it points along ``mean: (D,)``: ``(k, D)``."""
    values, vectors = torch.linalg.eigh(moment.double())  # ascending
    values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
    sign = torch.where(mean.double() @ vectors < 0, -1.0, 1.0).to(vectors.dtype)
    return (vectors * (sign * values.clamp_min(0).sqrt())).T.to(moment.dtype)
