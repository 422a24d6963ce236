"""The base every model kind shares (docs/maths.md sections 4, 6): encoder, decoder, likelihood, ELBO skeleton, and the
coefficient posterior of the kinds that infer per-step coefficients from frame pairs.

A sequence ``x: (B, T+1, C, S, S)`` is explained by an initial latent ``z_0 ~ q(z_0 | x_0)`` and a
path ``z_1..z_T`` that each kind defines; every ``z_t`` is decoded with a Bernoulli (or Gaussian)
decoder. :meth:`STAModel.elbo` is written once; a kind supplies only what differs:

* :meth:`STAModel.latent_path`: the path ``z: (B, T+1, D)`` and its KL / penalty terms
  (:class:`PathTerms`); for the coefficient kinds (:class:`CoefficientModel`) this is the
  coefficient sample plus :meth:`CoefficientModel.transport`;
* :meth:`STAModel.step`: one transition ``z_t -> z_{t+1}`` given coefficients ``g: (B, Kc)``
  (:meth:`STAModel.rollout` chains it; evaluation and plots roll every kind forward with it);
* :meth:`STAModel.infer_coefficients`: the posterior-mode coefficients and per-field scores that
  evaluation rolls forward and matches against the true transformations.

``STAModel(config)`` builds the kind registered under ``config.model`` (see
:mod:`sta.models.registry`); ``has_transitions`` / ``has_fields`` tell evaluation and plots which
metrics and figures apply.

Sparsity. A (sample, field) pair is active iff its coefficient is non-zero, and by the kernel
contract the gradient with respect to an exactly-zero coefficient is 0 (inactive pairs are not
evaluated). Relaxed Gumbel-sigmoid spikes are never exactly zero (except after float underflow at
low temperature), so during training every pair is evaluated and every spike logit receives the
reconstruction gradient: this is the default (``hard=False``). With ``hard=True``
(straight-through) the forward spikes are exactly 0/1, inactive pairs cost nothing, and an off
spike learns to switch on only through the KL terms, never through the reconstruction. Evaluation
(:meth:`CoefficientModel.infer_coefficients`) always uses hard spikes (posterior probability > 1/2).
"""
from __future__ import annotations

import math
from typing import ClassVar, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import FlowStepOut
from .config import ModelConfig
from .nets_authors import AuthorsDecoder, AuthorsEncoder, AuthorsPosterior
from .networks import ConvDecoder, ConvEncoder
from .registry import kind_class

__all__ = ["STAModel", "CoefficientModel", "ELBOTerms", "PathTerms", "Initial"]

LOG_2PI = math.log(2 * math.pi)


class ELBOTerms(NamedTuple):
    """Every term of the objective, per sequence and batch-averaged (nats; 0-dim tensors).

    recon:    -sum_t E log p(x_t | z_t)
    kl_z0:    KL(q(z_0 | x_0) || N(0, I))                         (t = 0, closed form)
    kl_path:  sum_{t>=1} E[log q_t(z_t) - log p_t(z_t)]            (the kind's path densities:
              transported along the flow for sta/dense/linear, z_0's for static/betavae, the
              Laplace transition prior for slowvae)
    kl_spike: sum_t sum_k KL(q(y_t^k) || p(y_t^k | y_{t-1}^k))     (Markov prior)
    kl_slab:  sum_t sum_k y_t^k KL(Laplace(m, b) || Laplace(loc, scale))
    hj:       lambda_hj * (mean_active hj^2 + mean_active |grad u_k(z_0, 0)|^2)
    div:      lambda_div * mean_active div_rot^2  (mlp rotational fields only)
    nelbo:    recon + kl_z0 + kl_path + kl_spike + kl_slab (the negative ELBO)
    loss:     recon + kl_weight * kl_scale * (kl_z0 + kl_path + kl_spike + kl_slab) + hj + div (what
              is minimised; kl_weight < 1 only during a KL warm-up, kl_scale = beta for betavae and
              1 otherwise, so loss = nelbo + hj + div after the warm-up for every other kind)
    evaluated: a diagnostic, not part of the loss: the fraction of (sample, transition, field)
              pairs the flow evaluates (coefficient != 0): below 1 for spikes under
              ``spike_floor`` (default 0.01) and for relaxed spikes that underflow to 0 at a low
              temperature; 1 for kinds without flow pairs (static, betavae, slowvae)
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
    evaluated: Tensor

    def scalars(self) -> dict:
        """Plain floats, for logging."""
        return {name: float(value.detach()) for name, value in self._asdict().items()}


class Initial(NamedTuple):
    """``q(z_0 | x_0)`` and its sample: mu, logvar, z ``(B, D)``; kl = KL(q || N(0, I)) ``(B,)``."""

    mu: Tensor
    logvar: Tensor
    z: Tensor
    kl: Tensor


class PathTerms(NamedTuple):
    """What a kind's :meth:`STAModel.latent_path` returns, per sequence (not yet batch-averaged).

    z: ``(B, T+1, D)``.  kl_path, kl_spike, kl_slab: ``(B,)`` or 0-dim.  hj, div: 0-dim, weighted.
    evaluated: 0-dim fraction of (sample, transition, field) pairs with a nonzero coefficient, or None.
    """

    z: Tensor
    kl_path: Tensor
    kl_spike: Tensor
    kl_slab: Tensor
    hj: Tensor
    div: Tensor
    evaluated: Optional[Tensor] = None


class STAModel(nn.Module):
    """A model of the STA harness; ``STAModel(config)`` builds the kind named by ``config.model``.

    Example::

        model = STAModel(ModelConfig(channels=3, image_size=28, transitions=8))   # an sta.models.sta.STA
        terms = model.elbo(x, temperature=1.0)      # x: (B, 9, 3, 28, 28) in [0, 1]
        terms.loss.backward()

    Class attributes of a kind: ``name`` (its registry key), ``has_transitions`` (z moves between
    frames; False: identification does not apply), ``has_fields`` (learned vector fields driven
    through flow_step), ``options`` (kind-specific ModelConfig entries: name -> (default, lower
    bound, bound excluded)).
    """

    name: ClassVar[str] = ""
    has_transitions: ClassVar[bool] = True
    has_fields: ClassVar[bool] = False
    options: ClassVar[dict] = {}

    def __new__(cls, *args, **kwargs):
        if cls is STAModel:  # the factory: dispatch on config.model
            config = args[0] if args else kwargs.get("config")
            if not isinstance(config, ModelConfig):
                raise TypeError(f"config: expected a ModelConfig, got {type(config).__name__}")
            cls = kind_class(config.model)
        return super().__new__(cls)

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config: expected a ModelConfig, got {type(config).__name__}")
        if config.model != self.name:
            raise ValueError(f"config.model: {type(self).__name__} builds {self.name!r} models, got {config.model!r}")
        self.config = c = config
        self.coefficients = c.coefficients
        if c.arch == "authors":  # the authors' MNIST networks: widths tied to D (nets_authors.py)
            self.encoder = AuthorsEncoder(c.channels, c.latent, c.image_size)
            self.decoder = AuthorsDecoder(c.latent, c.channels, c.image_size)
        else:
            self.encoder = ConvEncoder(c.channels, 2 * c.latent, c.image_size, c.conv)
            self.decoder = ConvDecoder(c.latent, c.channels, c.image_size, c.conv)

    def option(self, name: str) -> float:
        """A kind-specific config entry, or the kind's default when it is None."""
        value = getattr(self.config, name)
        return self.options[name][0] if value is None else value

    # -- pieces ------------------------------------------------------------------------------

    #: dtype of the conv networks under autocast (None: no autocast); set by the trainer from
    #: ``TrainConfig.precision``. Their outputs come back as float32, so the fields, divergences
    #: and ELBO sums are float32 whatever it is.
    network_dtype: Optional[torch.dtype] = None

    def run_network(self, net: nn.Module, x: Tensor) -> Tensor:
        """``net(x)`` under autocast to :attr:`network_dtype` (when set), returned in float32."""
        if self.network_dtype is None:
            return net(x)
        with torch.autocast(x.device.type, dtype=self.network_dtype):
            return net(x).float()

    def encode(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """``x0: (B, C, S, S) -> (mu: (B, D), logvar: (B, D))`` of q(z | x)."""
        mu, logvar = self.run_network(self.encoder, x0).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 6.0)

    def decode(self, z: Tensor) -> Tensor:
        """``z: (N, D) -> logits: (N, C, S, S)`` (Bernoulli logits; Gaussian mean is their sigmoid)."""
        return self.run_network(self.decoder, z)

    def mean_image(self, z: Tensor) -> Tensor:
        """Decoder mean in [0, 1]: ``z: (N, D) -> (N, C, S, S)``."""
        return torch.sigmoid(self.decode(z))

    def split_coefficients(self, g: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """``g: (B, Kc) -> (g_pot: (B, K), g_rot: (B, K) or None)`` by the control scheme."""
        return self.coefficients.split(g)

    def step(self, z: Tensor, t: int, g: Tensor, outputs=("z",), backend: Optional[str] = None) -> FlowStepOut:
        """One transition ``z_t -> z_{t+1}`` with coefficients ``g: (B, Kc)``: a
        :class:`sta.FlowStepOut` with at least ``z: (B, D)`` and ``div: (B,)``. ``backend``
        overrides ``config.backend`` for the kinds that call flow_step."""
        raise NotImplementedError(f"{type(self).__name__}.step")

    def rollout(self, z0: Tensor, g: Tensor) -> Tensor:
        """Deterministic path: ``z0: (B, D)``, ``g: (B, T, Kc)`` -> ``z: (B, T+1, D)``."""
        zs = [z0]
        for t in range(g.shape[1]):
            zs.append(self.step(zs[-1], t, g[:, t]).z)
        return torch.stack(zs, 1)

    def infer_coefficients(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior-mode coefficients for evaluation: ``x: (B, T+1, ...) -> (g, score)``, ``(B, T, Kc)``;
        ``score`` says how strongly each field acts at each step (identification)."""
        raise NotImplementedError(f"{type(self).__name__}.infer_coefficients")

    # -- the objective -------------------------------------------------------------------------

    @property
    def kl_scale(self) -> float:
        """Weight of the KL terms in the loss on top of the warm-up (1: the ELBO)."""
        return 1.0

    def log_likelihood(self, logits: Tensor, x: Tensor) -> Tensor:
        """``log p(x | z)`` summed over pixels: logits, x ``(N, C, S, S)`` -> ``(N,)``."""
        if self.config.likelihood == "bernoulli":
            return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        sigma = self.config.gaussian_sigma
        err = (x - torch.sigmoid(logits)) / sigma
        return -0.5 * (err * err + LOG_2PI + 2 * math.log(sigma)).flatten(1).sum(1)

    def elbo(self, x: Tensor, temperature: float = 1.0, slab: bool = True, generator=None,
             kl_weight: float = 1.0) -> ELBOTerms:
        """The terms of docs/maths.md 4.3 for ``x: (B, T+1, C, S, S)`` in [0, 1] (one posterior sample).

        temperature: of the Gumbel-sigmoid spikes. slab: False = spike-only phase (speeds fixed at
        1, no slab KL). kl_weight: weight of the KL terms in ``loss`` (KL warm-up; ``nelbo`` is
        always unweighted). Kinds without spikes or slabs ignore temperature and slab. Returns
        :class:`ELBOTerms` (per sequence, batch mean).
        """
        self._check_input(x)
        B, T = x.shape[0], x.shape[1] - 1
        mu, logvar = self.encode(x[:, 0])
        z0 = reparameterise(mu, logvar, generator)
        kl_z0 = 0.5 * (mu * mu + logvar.exp() - 1 - logvar).sum(1)  # (B,)
        path = self.latent_path(x, Initial(mu, logvar, z0, kl_z0), temperature=temperature, slab=slab,
                                generator=generator)
        logits_x = self.decode(path.z.reshape(B * (T + 1), -1))
        recon = -self.log_likelihood(logits_x, x.flatten(0, 1)).view(B, T + 1).sum(1)
        recon, kl_z0, kl_path = recon.mean(), kl_z0.mean(), path.kl_path.mean()
        kl_spike, kl_slab = _mean(path.kl_spike), _mean(path.kl_slab)
        kl = kl_z0 + kl_path + kl_spike + kl_slab
        loss = recon + (kl_weight * self.kl_scale) * kl + path.hj + path.div
        evaluated = path.evaluated if path.evaluated is not None else loss.new_ones(()).detach()
        return ELBOTerms(recon, kl_z0, kl_path, kl_spike, kl_slab, path.hj, path.div, recon + kl, loss, evaluated)

    def latent_path(self, x: Tensor, initial: Initial, temperature: float, slab: bool, generator) -> PathTerms:
        """The kind's posterior path for ``x: (B, T+1, C, S, S)`` from ``initial`` (q(z_0|x_0), its
        sample and KL) and its terms (:class:`PathTerms`)."""
        raise NotImplementedError(f"{type(self).__name__}.latent_path")

    @torch.no_grad()
    def iw_bound(self, x0: Tensor, samples: int = 64, generator=None) -> Tensor:
        """Importance-weighted lower bound of ``log p(x_0)``: ``x0: (B, C, S, S) -> (B,)`` nats."""
        mu, logvar = self.encode(x0)
        std = torch.exp(0.5 * logvar)
        out = []
        for _ in range(samples):
            eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
            z = mu + std * eps
            log_q = -0.5 * (eps * eps + logvar + LOG_2PI).sum(1)
            log_p = -0.5 * (z * z + LOG_2PI).sum(1)
            out.append(self.log_likelihood(self.decode(z), x0) + log_p - log_q)
        w = torch.stack(out, 0)
        return torch.logsumexp(w, 0) - math.log(samples)

    def _check_input(self, x: Tensor) -> None:
        c = self.config
        want = (c.transitions + 1, c.channels, c.image_size, c.image_size)
        if not isinstance(x, Tensor) or x.dim() != 5 or tuple(x.shape[1:]) != want:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected shape (B, T+1, C, S, S) = (B, {', '.join(map(str, want))}), got {got}")


class CoefficientModel(STAModel):
    """Kinds whose coefficients ``g_t = y_t * s_t`` (spikes times speeds) are inferred from each frame
    pair ``(x_t, x_{t+1})`` by a posterior network (docs/maths.md 4.2); a kind adds :meth:`transport` (how
    the path moves and what density terms it carries) and :meth:`step`.

    ``spikes = False`` (dense): no spike logits, every field on at every step, ``g = s``.
    """

    spikes: ClassVar[bool] = True

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        from ..priors import SpikeSlabPrior

        c = config
        Kc = c.num_coefficients
        self.prior = SpikeSlabPrior(pi0=c.pi0, stay=c.stay, slab_loc=c.slab_loc, slab_scale=c.slab_scale)
        # posterior on (x_t, x_{t+1}): spike logits (if any), slab location and scale
        self.num_posterior = (3 if self.spikes else 2) * Kc
        if c.arch == "authors":  # two stacks: spike logits from one, the 2 * Kc slab outputs from the other
            self.posterior = AuthorsPosterior(2 * c.channels, self.num_posterior, 2 * Kc, c.image_size, c.conv)
        else:
            self.posterior = ConvEncoder(2 * c.channels, self.num_posterior, c.image_size, c.conv)
        with torch.no_grad():  # start at m ~ slab_loc, b ~ slab_scale, spike probability ~ 1/2
            out = self.posterior.mlp[-1]
            out.weight.mul_(0.1)
            out.bias.zero_()
            out.bias[-2 * Kc:-Kc] = _softplus_inverse(c.slab_loc)
            out.bias[-Kc:] = _softplus_inverse(c.slab_scale)

    def posterior_params(self, x: Tensor) -> tuple[Optional[Tensor], Tensor, Tensor]:
        """Frame pairs of ``x: (B, T+1, C, S, S)`` -> spike logits, slab m, slab b, each ``(B, T, Kc)``.

        The spike logits are None for a kind without spikes (every field always on).
        """
        B, T1 = x.shape[:2]
        pairs = torch.cat([x[:, :-1], x[:, 1:]], dim=2).flatten(0, 1)  # (B*T, 2C, S, S)
        out = self.run_network(self.posterior, pairs).view(B, T1 - 1, self.num_posterior)
        Kc = self.config.num_coefficients
        m = F.softplus(out[..., -2 * Kc:-Kc])
        b = F.softplus(out[..., -Kc:]) + 1e-3
        logits = out[..., :Kc] if self.spikes else None
        return logits, m, b

    def sample_spikes(self, logits: Tensor, temperature: float, generator) -> tuple[Tensor, Tensor]:
        """Relaxed spikes ``(B, T, Kc)`` and their Markov-prior KL ``(B,)`` (docs/maths.md 4.3)."""
        from ..priors import bernoulli_kl, gumbel_sigmoid

        spikes = gumbel_sigmoid(logits, temperature, hard=self.config.hard, generator=generator)
        q = torch.sigmoid(logits)
        kls = [bernoulli_kl(q[:, t], self.prior.spike_prob(None if t == 0 else spikes[:, t - 1]))
               for t in range(logits.shape[1])]
        return spikes, torch.stack(kls, 1).sum((1, 2))

    def latent_path(self, x: Tensor, initial: Initial, temperature: float, slab: bool, generator) -> PathTerms:
        from ..priors import laplace_kl, laplace_rsample

        c = self.config
        T = x.shape[1] - 1
        zero = x.new_zeros(())
        logits, m, b = self.posterior_params(x)
        speed = laplace_rsample(m, b, generator=generator) if slab else torch.ones_like(m)
        if logits is None:  # every field always on
            spikes, kl_spike = torch.ones_like(m), zero
        else:
            spikes, kl_spike = self.sample_spikes(logits, temperature, generator)
        kl_slab = (spikes * laplace_kl(m, b, c.slab_loc, c.slab_scale)).sum((1, 2)) if slab else zero
        coefficient_spikes = spikes
        if c.spike_floor > 0:  # sparse training: pairs below the floor are exact zeros, never evaluated
            coefficient_spikes = torch.where(spikes < c.spike_floor, torch.zeros_like(spikes), spikes)
        g = coefficient_spikes * speed
        z, kl_flow, hj, div = self.transport(initial.z, g)
        evaluated = (g != 0).float().mean().detach()  # on the device: elbo never syncs with the host
        # T * kl_z0: the t = 0 part of log q_t - log p_t, for t = 1..T (closed form)
        return PathTerms(z, T * initial.kl + kl_flow, kl_spike, kl_slab, hj, div, evaluated)

    def transport(self, z0: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Roll the posterior path: ``z0: (B, D)``, ``g: (B, T, Kc)`` -> ``(z: (B, T+1, D), path term:
        (B,), weighted hj penalty, weighted div penalty)``; the path term is the flow part of
        ``sum_t log q_t - log p_t`` (docs/maths.md 4.3)."""
        raise NotImplementedError(f"{type(self).__name__}.transport")

    @torch.no_grad()
    def infer_coefficients(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Spikes are hard (probability > 1/2), speeds the slab location m; ``score`` is the spike
        probability (without spikes: the speed m). Shapes ``(B, T, Kc)``."""
        logits, m, _ = self.posterior_params(x)
        if logits is None:
            return m, m
        prob = torch.sigmoid(logits)
        return (prob > 0.5).to(m.dtype) * m, prob


def translation_step(z: Tensor, g: Tensor, directions: Tensor) -> FlowStepOut:
    """``z + g @ directions`` with divergence 0: ``z: (B, D)``, ``g: (B, K)``, ``directions: (K, D)``."""
    return FlowStepOut(z=z + g @ directions, div=z.new_zeros(z.shape[0]))


def reparameterise(mu: Tensor, logvar: Tensor, generator) -> Tensor:
    # empty_like(...).normal_ draws what torch.randn(mu.shape, ...) draws, and unlike it compiles
    # with a dynamic batch size (torch.compile cannot build randn from symbolic sizes and a generator)
    eps = torch.empty_like(mu).normal_(generator=generator)
    return mu + torch.exp(0.5 * logvar) * eps


def _mean(v: Tensor) -> Tensor:
    return v.mean() if v.dim() else v


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))
