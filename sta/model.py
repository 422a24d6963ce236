"""The STA model (SPEC section 5) and the baselines of SPEC section 7, in one harness.

A sequence ``x: (B, T+1, C, H, W)`` is explained by an initial latent ``z_0 ~ q(z_0 | x_0)`` and
per-step coefficients ``g_t = y_t * s_t`` (spikes times speeds) inferred from each frame pair
``(x_t, x_{t+1})``; the latent moves with the learned fields through :func:`sta.flow_step`:

    z_{t+1} = flow_step(z_t, t, g_pot_t, g_rot_t, fields).z

and every ``z_t`` is decoded with a Bernoulli (or Gaussian) decoder.

Models (``ModelConfig.model``):

    "sta"     spike-and-slab coefficients, learned potential + rotational fields (the method)
    "dense"   STA without the spike prior: every field is on at every step, g = s
    "linear"  spike-and-slab coefficients, but each field is a learned constant direction d_k
              (z_{t+1} = z_t + sum_k g_k d_k; divergence 0)
    "static"  no transitions: z_0 is decoded for every frame

The ELBO (SPEC 5.3) is reported term by term (:class:`ELBOTerms`), per sequence, batch-averaged.

Sparsity. A (sample, field) pair is active iff its coefficient is non-zero, and by the kernel
contract the gradient with respect to an exactly-zero coefficient is 0 (inactive pairs are not
evaluated). Relaxed Gumbel-sigmoid spikes are never exactly zero (except after float underflow at
low temperature), so during training every pair is evaluated and every spike logit receives the
reconstruction gradient: this is the default (``hard=False``). With ``hard=True``
(straight-through) the forward spikes are exactly 0/1, inactive pairs cost nothing, and an off
spike learns to switch on only through the KL terms, never through the reconstruction. Evaluation
(:meth:`STAModel.infer_coefficients`) always uses hard spikes (posterior probability > 1/2).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields as dataclass_fields
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fields import FieldBank
from .ops import flow_step

__all__ = ["MODELS", "ModelConfig", "ELBOTerms", "STAModel", "ConvEncoder", "ConvDecoder"]

MODELS = ("sta", "static", "linear", "dense")
_ROTATIONAL = ("hamiltonian", "mlp", "none")
_CONTROL = ("single", "double")
_PRIOR = ("diffusion", "potential")
_LIKELIHOOD = ("bernoulli", "gaussian")
_LOG_2PI = math.log(2 * math.pi)


@dataclass
class ModelConfig:
    """Sizes and options of an STA model (or baseline). Every field is JSON-serialisable.

    model: one of MODELS.  channels, image_size: of the frames (C, H = W).
    transitions: T, the number of steps per sequence (the diffusion prior has one scale per step).
    latent: D.  num_fields: K.  hidden: width H of every field.  conv: channels of the conv nets.
    rotational: "hamiltonian" (exactly divergence-free), "mlp" (the authors', penalised) or "none".
    rank: low-rank skew matrices for "hamiltonian" (None = dense).
    field_weight_scale: initial scale of the fields' first layers (:class:`sta.FieldBank`
        ``weight_scale``); small values start every field as a near-constant direction.
    control: "single" (field k's potential and rotational parts share g^k) or "double" (separate
        spikes and speeds for the two parts).
    prior: "diffusion" (learned sigma_{t,k}) or "potential" (a second bank of potential fields).
    likelihood: "bernoulli" per pixel, or "gaussian" with fixed ``gaussian_sigma``.
    hard: straight-through hard spikes in training (see the module docstring).
    lambda_hj, lambda_div: weights of the Hamilton-Jacobi and mlp-divergence penalties.
    pi0, stay, slab_loc, slab_scale: the spike-and-slab prior (SPEC 5.1).
    backend: flow_step backend ("auto" picks the fastest available).
    """

    model: str = "sta"
    channels: int = 3
    image_size: int = 28
    transitions: int = 8
    latent: int = 32
    num_fields: int = 3
    hidden: int = 64
    conv: int = 32
    rotational: str = "hamiltonian"
    rank: Optional[int] = None
    # 0.1, not 1: digits, quick preset, seeds 0 / 1: equivariance 0.0675 / 0.0653 at 1, 0.0614 / 0.0623
    # at 0.3, 0.0616 / 0.0614 at 0.1; identification 0.71 / 0.62 at 1, 0.84 / 0.85 at 0.1.
    field_weight_scale: float = 0.1
    control: str = "single"
    prior: str = "diffusion"
    likelihood: str = "bernoulli"
    gaussian_sigma: float = 0.1
    hard: bool = False
    lambda_hj: float = 1.0
    lambda_div: float = 1.0
    pi0: float = 0.1
    stay: float = 0.9
    slab_loc: float = 1.0
    slab_scale: float = 0.1
    backend: str = "auto"

    def __post_init__(self):
        choices = {"model": MODELS, "rotational": _ROTATIONAL, "control": _CONTROL, "prior": _PRIOR,
                   "likelihood": _LIKELIHOOD}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        for name in ("channels", "image_size", "transitions", "latent", "num_fields", "hidden", "conv"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.image_size < 4:
            raise ValueError(f"image_size: expected >= 4, got {self.image_size}")
        for name in ("lambda_hj", "lambda_div"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        for name in ("pi0", "stay"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name}: expected a probability in (0, 1), got {getattr(self, name)}")
        if self.slab_scale <= 0 or self.gaussian_sigma <= 0 or self.field_weight_scale <= 0:
            raise ValueError("slab_scale, gaussian_sigma, field_weight_scale: expected > 0")

    @property
    def num_coefficients(self) -> int:
        """Kc: K, or 2K with double control (potential part first, then rotational)."""
        double = self.control == "double" and self.model in ("sta", "dense") and self.rotational != "none"
        return 2 * self.num_fields if double else self.num_fields

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclass_fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model config: unknown keys {unknown}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class ELBOTerms(NamedTuple):
    """Every term of the objective, per sequence and batch-averaged (nats; 0-dim tensors).

    recon:    -sum_t E log p(x_t | z_t)
    kl_z0:    KL(q(z_0 | x_0) || N(0, I))                         (t = 0, closed form)
    kl_path:  sum_{t>=1} E[log q_t(z_t) - log p_t(z_t)]            (transported densities)
    kl_spike: sum_t sum_k KL(q(y_t^k) || p(y_t^k | y_{t-1}^k))     (Markov prior)
    kl_slab:  sum_t sum_k y_t^k KL(Laplace(m, b) || Laplace(loc, scale))
    hj:       lambda_hj * (mean_active hj^2 + mean_active |grad u_k(z_0, 0)|^2)
    div:      lambda_div * mean_active div_rot^2  (mlp rotational fields only)
    nelbo:    recon + kl_z0 + kl_path + kl_spike + kl_slab (the negative ELBO)
    loss:     recon + kl_weight * (kl_z0 + kl_path + kl_spike + kl_slab) + hj + div (what is
              minimised; kl_weight < 1 only during a KL warm-up, so loss = nelbo + hj + div after it)
    """

    recon: Tensor
    kl_z0: Tensor
    kl_path: Tensor
    kl_spike: Tensor
    kl_slab: Tensor
    hj: Tensor
    div: Tensor
    nelbo: Tensor
    loss: Tensor

    def scalars(self) -> dict:
        """Plain floats, for logging."""
        return {name: float(value.detach()) for name, value in self._asdict().items()}


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------

def _init_relu_net(net: nn.Module) -> None:
    """He (fan-in, ReLU) initialisation with zero biases for every conv and linear layer.

    Why: with PyTorch's default init the quick preset's encoder output was nearly independent of
    the image (std of mu over a batch 0.0013) and every model collapsed to the mean image (static
    VAE on digits, 300 Adam steps: KL(z_0) 0.1 nats, recon 505 nats/frame, worse than the 532 of
    the mean image). With He init: KL 17 nats, recon 342 nats/frame after the same 300 steps.
    """
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)


def _conv_sizes(image_size: int) -> list[int]:
    """Spatial sizes of the stride-2 conv stack: halve (floor) until <= 4, e.g. 28 -> [28, 14, 7, 3]."""
    sizes = [image_size]
    while sizes[-1] > 4:
        sizes.append((sizes[-1] - 2) // 2 + 1)  # Conv2d(kernel 4, stride 2, padding 1)
    return sizes


class ConvEncoder(nn.Module):
    """Images ``(N, C, S, S) -> (N, out)``: stride-2 4x4 convolutions down to <= 4x4, then an MLP."""

    def __init__(self, in_channels: int, out_features: int, image_size: int, width: int = 32, mlp: int = 256):
        super().__init__()
        sizes = _conv_sizes(image_size)
        layers, ch = [], in_channels
        for _ in sizes[1:]:
            layers += [nn.Conv2d(ch, width, 4, 2, 1), nn.ReLU()]
            ch = width
        self.conv = nn.Sequential(*layers)
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(ch * sizes[-1] ** 2, mlp), nn.ReLU(), nn.Linear(mlp, out_features))
        _init_relu_net(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.conv(x))


class ConvDecoder(nn.Module):
    """Latents ``(N, D) -> (N, C, S, S)`` logits: an MLP, then nearest upsampling + 3x3 convolutions."""

    def __init__(self, latent: int, out_channels: int, image_size: int, width: int = 32, mlp: int = 256):
        super().__init__()
        sizes = _conv_sizes(image_size)[::-1]
        self.width, self.start = width, sizes[0]
        self.mlp = nn.Sequential(nn.Linear(latent, mlp), nn.ReLU(), nn.Linear(mlp, width * sizes[0] ** 2), nn.ReLU())
        layers = []
        for size in sizes[1:]:
            layers += [nn.Upsample(size=(size, size), mode="nearest"), nn.Conv2d(width, width, 3, 1, 1), nn.ReLU()]
        layers.append(nn.Conv2d(width, out_channels, 3, 1, 1))
        self.conv = nn.Sequential(*layers)
        _init_relu_net(self)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mlp(z).view(z.shape[0], self.width, self.start, self.start)
        return self.conv(h)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class STAModel(nn.Module):
    """STA (or a baseline) on image sequences. See the module docstring and :class:`ModelConfig`.

    Example::

        model = STAModel(ModelConfig(channels=3, image_size=28, transitions=8))
        terms = model.elbo(x, temperature=1.0)      # x: (B, 9, 3, 28, 28) in [0, 1]
        terms.loss.backward()
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        from .priors import SpikeSlabPrior

        self.config = c = config
        self.prior = SpikeSlabPrior(pi0=c.pi0, stay=c.stay, slab_loc=c.slab_loc, slab_scale=c.slab_scale)
        D, K, Kc = c.latent, c.num_fields, c.num_coefficients
        self.encoder = ConvEncoder(c.channels, 2 * D, c.image_size, c.conv)
        self.decoder = ConvDecoder(D, c.channels, c.image_size, c.conv)
        if c.model == "static":
            return
        # posterior on (x_t, x_{t+1}): spike logits (not for dense), slab location and scale
        self.num_posterior = (2 if c.model == "dense" else 3) * Kc
        self.posterior = ConvEncoder(2 * c.channels, self.num_posterior, c.image_size, c.conv)
        with torch.no_grad():  # start at m ~ slab_loc, b ~ slab_scale, spike probability ~ 1/2
            out = self.posterior.mlp[-1]
            out.weight.mul_(0.1)
            out.bias.zero_()
            m_bias, b_bias = _softplus_inverse(c.slab_loc), _softplus_inverse(c.slab_scale)
            out.bias[-2 * Kc:-Kc] = m_bias
            out.bias[-Kc:] = b_bias
        if c.model == "linear":
            self.directions = nn.Parameter(torch.randn(K, D) * (0.5 / math.sqrt(D)))
            return
        Kr = 0 if c.rotational == "none" else K
        self.fields = FieldBank(D, K, Kr, c.hidden, "hamiltonian" if Kr == 0 else c.rotational, c.rank,
                                weight_scale=c.field_weight_scale)
        if c.prior == "diffusion":
            # log sigma_{t,k}, sigma initialised at 1
            self.log_sigma = nn.Parameter(torch.zeros(c.transitions, Kc))
        else:
            self.prior_fields = FieldBank(D, K, 0, c.hidden, weight_scale=c.field_weight_scale)

    # -- pieces ------------------------------------------------------------------------------

    def encode(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """``x0: (B, C, S, S) -> (mu: (B, D), logvar: (B, D))`` of q(z_0 | x_0)."""
        mu, logvar = self.encoder(x0).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 6.0)

    def decode(self, z: Tensor) -> Tensor:
        """``z: (N, D) -> logits: (N, C, S, S)`` (Bernoulli logits; Gaussian mean is their sigmoid)."""
        return self.decoder(z)

    def mean_image(self, z: Tensor) -> Tensor:
        """Decoder mean in [0, 1]: ``z: (N, D) -> (N, C, S, S)``."""
        return torch.sigmoid(self.decode(z))

    def posterior_params(self, x: Tensor) -> tuple[Optional[Tensor], Tensor, Tensor]:
        """Frame pairs of ``x: (B, T+1, C, S, S)`` -> spike logits, slab m, slab b, each ``(B, T, Kc)``.

        The spike logits are None for the dense model (every field always on).
        """
        B, T1 = x.shape[:2]
        pairs = torch.cat([x[:, :-1], x[:, 1:]], dim=2).flatten(0, 1)  # (B*T, 2C, S, S)
        out = self.posterior(pairs).view(B, T1 - 1, self.num_posterior)
        Kc = self.config.num_coefficients
        m = F.softplus(out[..., -2 * Kc:-Kc])
        b = F.softplus(out[..., -Kc:]) + 1e-3
        logits = None if self.config.model == "dense" else out[..., :Kc]
        return logits, m, b

    def split_coefficients(self, g: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """``g: (B, Kc) -> (g_pot: (B, K), g_rot: (B, K) or None)`` by the control scheme."""
        K = self.config.num_fields
        if self.config.rotational == "none":
            return g, None
        if g.shape[-1] == 2 * K:
            return g[..., :K], g[..., K:]
        return g, g

    def step(self, z: Tensor, t: int, g: Tensor, outputs=("z",)):
        """One transition ``z_t -> z_{t+1}`` with coefficients ``g: (B, Kc)``.

        Returns a :class:`sta.FlowStepOut` (for "linear": only z, with div = 0).
        """
        from .ops import FlowStepOut

        model = self.config.model
        if model == "static":
            return FlowStepOut(z=z, div=z.new_zeros(z.shape[0]))
        if model == "linear":
            return FlowStepOut(z=z + g @ self.directions, div=z.new_zeros(z.shape[0]))
        g_pot, g_rot = self.split_coefficients(g)
        return flow_step(z, float(t), g_pot, g_rot, self.fields, outputs=outputs, backend=self.config.backend)

    def prior_divergence(self, z: Tensor, t: int, g: Tensor) -> Tensor:
        """Divergence of the prior flow at step t: ``(B,)`` (SPEC 5.1)."""
        if self.config.prior == "diffusion":
            return (g / torch.exp(2 * self.log_sigma[t])).sum(-1)
        g_pot, _ = self.split_coefficients(g)
        return flow_step(z, float(t), g_pot, None, self.prior_fields, outputs=("div",),
                         backend=self.config.backend).div

    def rollout(self, z0: Tensor, g: Tensor) -> Tensor:
        """Deterministic path: ``z0: (B, D)``, ``g: (B, T, Kc)`` -> ``z: (B, T+1, D)``."""
        zs = [z0]
        for t in range(g.shape[1]):
            zs.append(self.step(zs[-1], t, g[:, t]).z)
        return torch.stack(zs, 1)

    @torch.no_grad()
    def infer_coefficients(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior-mode coefficients for evaluation: ``x: (B, T+1, ...) -> (g, score)``, ``(B, T, Kc)``.

        Spikes are hard (probability > 1/2), speeds the slab location m. ``score`` is the spike
        probability (for "dense", the speed m), used to identify transformations.
        """
        B, T = x.shape[0], x.shape[1] - 1
        if self.config.model == "static":
            z = x.new_zeros(B, T, self.config.num_coefficients)
            return z, z
        logits, m, _ = self.posterior_params(x)
        if logits is None:
            return m, m
        prob = torch.sigmoid(logits)
        return (prob > 0.5).to(m.dtype) * m, prob

    # -- the objective -------------------------------------------------------------------------

    def log_likelihood(self, logits: Tensor, x: Tensor) -> Tensor:
        """``log p(x | z)`` summed over pixels: logits, x ``(N, C, S, S)`` -> ``(N,)``."""
        if self.config.likelihood == "bernoulli":
            return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        sigma = self.config.gaussian_sigma
        err = (x - torch.sigmoid(logits)) / sigma
        return -0.5 * (err * err + _LOG_2PI + 2 * math.log(sigma)).flatten(1).sum(1)

    def elbo(self, x: Tensor, temperature: float = 1.0, slab: bool = True, generator=None,
             kl_weight: float = 1.0) -> ELBOTerms:
        """The terms of SPEC 5.3 for ``x: (B, T+1, C, S, S)`` in [0, 1] (one posterior sample).

        temperature: of the Gumbel-sigmoid spikes. slab: False = spike-only phase (speeds fixed at
        1, no slab KL). kl_weight: weight of the KL terms in ``loss`` (KL warm-up; ``nelbo`` is
        always unweighted). Returns :class:`ELBOTerms` (per sequence, batch mean).
        """
        from .priors import bernoulli_kl, gumbel_sigmoid, laplace_kl, laplace_rsample

        c = self.config
        self._check_input(x)
        B, T = x.shape[0], x.shape[1] - 1
        zero = x.new_zeros(())
        mu, logvar = self.encode(x[:, 0])
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        z0 = mu + torch.exp(0.5 * logvar) * eps
        kl_z0 = 0.5 * (mu * mu + logvar.exp() - 1 - logvar).sum(1)  # (B,)
        kl_spike = kl_slab = hj = div_pen = zero
        kl_path = T * kl_z0  # the t = 0 part of log q_t - log p_t, for t = 1..T (closed form)

        if c.model == "static":
            z = z0[:, None].expand(B, T + 1, z0.shape[1])
        else:
            logits, m, b = self.posterior_params(x)
            Kc = m.shape[-1]
            speed = laplace_rsample(m, b, generator=generator) if slab else torch.ones_like(m)
            if logits is None:  # dense: every field always on
                spikes = torch.ones_like(m)
            else:
                spikes = gumbel_sigmoid(logits, temperature, hard=c.hard, generator=generator)
                q = torch.sigmoid(logits)
                kls = [bernoulli_kl(q[:, t], self.prior.spike_prob(None if t == 0 else spikes[:, t - 1]))
                       for t in range(T)]
                kl_spike = torch.stack(kls, 1).sum((1, 2))
            if slab:
                kl_slab = (spikes * laplace_kl(m, b, c.slab_loc, c.slab_scale)).sum((1, 2))
            g = spikes * speed
            z, kl_path_flow, hj, div_pen = self._path(z0, g)
            kl_path = kl_path + kl_path_flow

        logits_x = self.decode(z.reshape(B * (T + 1), -1))
        recon = -self.log_likelihood(logits_x, x.flatten(0, 1)).view(B, T + 1).sum(1)
        recon, kl_z0, kl_path = recon.mean(), kl_z0.mean(), kl_path.mean()
        kl_spike, kl_slab = _mean(kl_spike), _mean(kl_slab)
        kl = kl_z0 + kl_path + kl_spike + kl_slab
        loss = recon + kl_weight * kl + hj + div_pen
        return ELBOTerms(recon, kl_z0, kl_path, kl_spike, kl_slab, hj, div_pen, recon + kl, loss)

    def _path(self, z0: Tensor, g: Tensor):
        """Roll the posterior path; returns (z: (B, T+1, D), path term: (B,), hj penalty, div penalty)."""
        c = self.config
        B, T = g.shape[:2]
        zero = z0.new_zeros(())
        if c.model == "linear":  # translations: no divergence on either side, no penalties
            return self.rollout(z0, g), z0.new_zeros(B), zero, zero
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

    @torch.no_grad()
    def iw_bound(self, x0: Tensor, samples: int = 64, generator=None) -> Tensor:
        """Importance-weighted lower bound of ``log p(x_0)``: ``x0: (B, C, S, S) -> (B,)`` nats."""
        mu, logvar = self.encode(x0)
        std = torch.exp(0.5 * logvar)
        out = []
        for _ in range(samples):
            eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
            z = mu + std * eps
            log_q = -0.5 * (eps * eps + logvar + _LOG_2PI).sum(1)
            log_p = -0.5 * (z * z + _LOG_2PI).sum(1)
            out.append(self.log_likelihood(self.decode(z), x0) + log_p - log_q)
        w = torch.stack(out, 0)
        return torch.logsumexp(w, 0) - math.log(samples)

    def _check_input(self, x: Tensor) -> None:
        c = self.config
        want = (c.transitions + 1, c.channels, c.image_size, c.image_size)
        if not isinstance(x, Tensor) or x.dim() != 5 or tuple(x.shape[1:]) != want:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected shape (B, T+1, C, S, S) = (B, {', '.join(map(str, want))}), got {got}")


def _mean(v: Tensor) -> Tensor:
    return v.mean() if v.dim() else v


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))
