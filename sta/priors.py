"""The spike-and-slab Markov prior of STA (docs/maths.md 4.1, 4.3) and its relaxations.

Per sequence of T steps and K fields:

* spikes ``y_t in {0,1}^K``, a Markov chain per field: ``P(y_0^k = 1) = pi0``,
  ``P(y_t^k = y_{t-1}^k) = stay``; a step with no active field is rejected, so at least one
  transformation acts at every step;
* slabs (speeds) ``s_t^k``, independent over t and k, ``Laplace(slab_loc, slab_scale)`` (the
  authors' ``Laplace(1, 0.1)``); data generation uses ``|s|`` so speeds are never negative;
* coefficients ``g_t = y_t * s_t``.

The same process generates the ground truth of every dataset in :mod:`sta.data`, and its per-field
factors enter the ELBO as the Bernoulli KLs (:meth:`SpikeSlabPrior.spike_prob`,
:func:`bernoulli_kl`) and the slab KL (:func:`laplace_kl`). The posterior spikes are relaxed with
:func:`gumbel_sigmoid` under :func:`temperature_schedule`; the posterior slabs are sampled with
:func:`laplace_rsample`.

Shapes: ``T`` steps, ``K`` fields, optional leading ``batch``: spikes and speeds are ``(T, K)`` or
``(batch, T, K)``.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = [
    "SpikeSlabPrior",
    "bernoulli_kl",
    "laplace_kl",
    "laplace_rsample",
    "gaussian_laplace_cross_entropy",
    "gumbel_sigmoid",
    "temperature_schedule",
]


def _check_probability(name: str, value: float, low_open: bool = True) -> float:
    value = float(value)
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok or not math.isfinite(value):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must be a probability in {interval}, got {value}")
    return value


class SpikeSlabPrior:
    """Spike-and-slab Markov prior over the coefficients of K fields for T steps.

    Args:
        pi0: ``P(y_0^k = 1)``, in (0, 1] (0 would make the first step impossible under the
            no-all-off rule).
        stay: ``P(y_t^k = y_{t-1}^k)``, in (0, 1].
        slab_loc, slab_scale: location and scale of the Laplace slab (scale > 0).
    """

    def __init__(self, pi0: float = 0.1, stay: float = 0.9, slab_loc: float = 1.0, slab_scale: float = 0.1):
        self.pi0 = _check_probability("pi0", pi0)
        self.stay = _check_probability("stay", stay)
        self.slab_loc = float(slab_loc)
        self.slab_scale = float(slab_scale)
        if not (self.slab_scale > 0 and math.isfinite(self.slab_scale)) or not math.isfinite(self.slab_loc):
            raise ValueError(f"slab_scale must be finite and > 0 and slab_loc finite, got ({slab_loc}, {slab_scale})")

    def __repr__(self) -> str:
        return (
            f"SpikeSlabPrior(pi0={self.pi0}, stay={self.stay}, slab_loc={self.slab_loc}, "
            f"slab_scale={self.slab_scale})"
        )

    def config(self) -> dict:
        """The constructor arguments (for caching keys and checkpoints)."""
        return dict(pi0=self.pi0, stay=self.stay, slab_loc=self.slab_loc, slab_scale=self.slab_scale)

    # ----------------------------------------------------------------------------------- spikes
    def spike_prob(
        self, prev: Optional[Tensor], dtype: Optional[torch.dtype] = None, device=None
    ) -> Tensor:
        """Per-field factor ``p(y_t^k = 1 | y_{t-1}^k = prev)`` of the Markov prior, elementwise.

        ``prev`` is the previous spike (any shape), hard {0,1} or relaxed in [0,1]; relaxed values
        interpolate linearly: ``prev * stay + (1 - prev) * (1 - stay)``. ``prev=None`` (t = 0)
        gives the 0-d tensor ``pi0`` (of ``dtype``/``device`` if given), which broadcasts.

        This is the factorised per-field term used in the ELBO's Bernoulli KLs (docs/maths.md 4.3); the
        no-all-off rule couples the fields of a step only through a normaliser and is not part of it.
        """
        if prev is None:
            return torch.tensor(self.pi0, dtype=dtype or torch.get_default_dtype(), device=device)
        return prev * self.stay + (1.0 - prev) * (1.0 - self.stay)

    def sample_spikes(
        self, T: int, K: int, batch: Optional[int] = None, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """Spikes ``(T, K)`` or ``(batch, T, K)`` float32 in {0, 1}, never all-off at a step.

        How the rejection is done: each step t is drawn from its Markov conditional restricted to
        "at least one field on", i.e. exactly the law of "draw ``y_t ~ prod_k Bern(p_t^k)``, redraw
        the whole step while it is all-off". Instead of looping until acceptance, the restricted
        law is sampled directly and sequentially over fields: while no earlier field of the step
        is on, field k is on with probability ``p_k / (1 - prod_{j>=k} (1 - p_j))`` (the
        probability that k is on given that some field in k..K-1 is on), afterwards with plain
        ``p_k``. This costs one uniform per (sample, step, field), vectorised over the batch, with
        a fixed number of draws (so the generator state after sampling does not depend on the
        outcome), and it never stalls when all-off is likely (e.g. pi0 = 0.1, small K).
        """
        T, K = _check_sizes(T=T, K=K)
        b = 1 if batch is None else _check_sizes(batch=batch)[0]
        device = generator.device if generator is not None else torch.device("cpu")
        # float64 for the normalisers: 1 - prod(1 - p) can be ~1e-4 for many small p.
        u = torch.rand(b, T, K, generator=generator, dtype=torch.float64, device=device)
        y = torch.zeros(b, T, K, dtype=torch.float64, device=device)
        prev = None
        for t in range(T):
            p = self.spike_prob(prev, dtype=torch.float64, device=device).expand(b, K)
            # tail_off[:, k] = prod_{j >= k} (1 - p_j): probability that fields k.. are all off.
            tail_off = torch.flip(torch.cumprod(torch.flip(1.0 - p, (1,)), dim=1), (1,))
            none_yet = torch.ones(b, dtype=torch.bool, device=device)
            for k in range(K):
                conditional = p[:, k] / (1.0 - tail_off[:, k]).clamp_min(1e-300)
                q = torch.where(none_yet, conditional, p[:, k])
                on = u[:, t, k] < q
                y[:, t, k] = on.double()
                none_yet = none_yet & ~on
            prev = y[:, t]
        y = y.float()
        return y[0] if batch is None else y

    def sample_single(
        self, T: int, K: int, batch: Optional[int] = None, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """Spikes with exactly one active field per step, ``(T, K)`` or ``(batch, T, K)`` float32.

        The single-transformation process used for identification accuracy (docs/maths.md 6): the field of
        step 0 is uniform; afterwards the previous field is kept with probability ``stay`` and
        otherwise replaced by one of the other ``K - 1`` fields, uniformly.
        """
        T, K = _check_sizes(T=T, K=K)
        b = 1 if batch is None else _check_sizes(batch=batch)[0]
        device = generator.device if generator is not None else torch.device("cpu")
        first = torch.randint(K, (b,), generator=generator, device=device)
        keep = torch.rand(b, T, generator=generator, device=device) < self.stay
        # a uniform non-zero offset picks one of the other K - 1 fields
        offset = torch.randint(max(K - 1, 1), (b, T), generator=generator, device=device) + 1
        which = torch.empty(b, T, dtype=torch.long, device=device)
        which[:, 0] = first
        for t in range(1, T):
            moved = (which[:, t - 1] + offset[:, t]) % K
            which[:, t] = torch.where(keep[:, t] | (K == 1), which[:, t - 1], moved)
        y = torch.nn.functional.one_hot(which, K).float()
        return y[0] if batch is None else y

    # ------------------------------------------------------------------------------------ slabs
    def sample_speeds(
        self, T: int, K: int, batch: Optional[int] = None, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """Speeds ``|Laplace(slab_loc, slab_scale)|`` for every (step, field), float32 >= 0."""
        T, K = _check_sizes(T=T, K=K)
        shape = (T, K) if batch is None else (_check_sizes(batch=batch)[0], T, K)
        device = generator.device if generator is not None else torch.device("cpu")
        loc = torch.full(shape, self.slab_loc, device=device)
        return laplace_rsample(loc, torch.full_like(loc, self.slab_scale), generator=generator).abs()

    def sample(
        self,
        T: int,
        K: int,
        batch: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        single: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Draw ``(active, speed)``, each ``(T, K)`` or ``(batch, T, K)`` float32.

        ``active`` in {0, 1} follows the Markov chain with the no-all-off rule (see
        :meth:`sample_spikes`), or exactly one field per step when ``single`` (see
        :meth:`sample_single`). ``speed >= 0`` is drawn for every pair, active or not; the
        coefficients are ``g = active * speed``.
        """
        spikes = self.sample_single if single else self.sample_spikes
        active = spikes(T, K, batch, generator)
        speed = self.sample_speeds(T, K, batch, generator)
        return active, speed


def _check_sizes(**sizes) -> tuple[int, ...]:
    out = []
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
        out.append(value)
    return tuple(out)


# ------------------------------------------------------------------------------------- KL terms
def bernoulli_kl(q: Tensor, p: Union[Tensor, float], eps: float = 1e-6) -> Tensor:
    """``KL(Bern(q) || Bern(p))`` elementwise (broadcasting), probabilities clamped to [eps, 1-eps].

    The clamp keeps the value and the gradient finite at hard 0/1 spikes.
    """
    q = q.clamp(eps, 1.0 - eps)
    p = torch.as_tensor(p, dtype=q.dtype, device=q.device).clamp(eps, 1.0 - eps)
    return q * (torch.log(q) - torch.log(p)) + (1.0 - q) * (torch.log1p(-q) - torch.log1p(-p))


def laplace_kl(m: Tensor, b: Tensor, m0: float = 1.0, b0: float = 0.1) -> Tensor:
    """Closed-form ``KL(Laplace(m, b) || Laplace(m0, b0))`` elementwise (broadcasting), b, b0 > 0.

        KL = log(b0 / b) + |m - m0| / b0 + (b / b0) exp(-|m - m0| / b) - 1
    """
    d = (m - m0).abs()
    return math.log(b0) - torch.log(b) + d / b0 + (b / b0) * torch.exp(-d / b) - 1.0


def laplace_rsample(m: Tensor, b: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Reparameterised sample of ``Laplace(m, b)`` (shape of ``m`` and ``b`` broadcast together).

    Inverse CDF: ``m - b sign(u) log(1 - |u|)`` with ``u ~ U(-1, 1)``, kept off +-1 by the dtype's
    eps so the log stays finite (as torch.distributions.Laplace does). Differentiable in m and b.
    """
    m, b = torch.broadcast_tensors(torch.as_tensor(m), torch.as_tensor(b))
    eps = torch.finfo(m.dtype).eps
    # empty_like(...).uniform_ draws what torch.rand(m.shape, ...) draws, and compiles with a dynamic batch size
    u = torch.empty_like(m).uniform_(generator=generator) * (2.0 - eps) - (1.0 - eps)
    return m - b * torch.sign(u) * torch.log1p(-u.abs())


def gaussian_laplace_cross_entropy(mean: Tensor, logvar: Tensor, scale: float) -> Tensor:
    """``E_{u ~ N(mean, exp(logvar))}[-log Laplace(u; 0, scale)]`` elementwise, in closed form:

        log(2 scale) + E|u| / scale,   E|u| = s sqrt(2/pi) exp(-mean^2 / (2 s^2)) + mean erf(mean / (s sqrt 2))

    (``E|u|`` is the mean of the folded normal, ``s = exp(logvar / 2)``). The slowvae transition
    term (Klindt et al. 2021, written with the rate ``1 / scale``). Differentiable in mean, logvar.
    """
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    s = torch.exp(0.5 * logvar)
    r = mean / s
    abs_mean = s * math.sqrt(2 / math.pi) * torch.exp(-0.5 * r * r) + mean * torch.erf(r / math.sqrt(2))
    return math.log(2 * scale) + abs_mean / scale


def gumbel_sigmoid(
    logits: Tensor, temperature: float, hard: bool = False, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Relaxed Bernoulli (binary Concrete) sample of ``Bern(sigmoid(logits))``, same shape as logits.

    ``sigmoid((logits + log u - log(1 - u)) / temperature)`` with ``u ~ U(0, 1)``. With ``hard``,
    the forward value is the {0, 1} threshold at 0.5 and the gradient is that of the relaxed sample
    (straight-through).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    tiny = torch.finfo(logits.dtype).tiny
    u = torch.empty_like(logits).uniform_(generator=generator)  # = torch.rand(logits.shape, ...), see laplace_rsample
    u = u.clamp(tiny, 1.0 - torch.finfo(logits.dtype).eps)
    noise = torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid((logits + noise) / temperature)
    if not hard:
        return soft
    hard_value = (soft > 0.5).to(soft.dtype)
    return hard_value + (soft - soft.detach())


#: Annealing of the Gumbel-sigmoid temperature (the authors' schedule, docs/maths.md 4.2).
TEMPERATURE_RATE = 3e-5
TEMPERATURE_MIN = 0.05


def temperature_schedule(iteration: int) -> float:
    """``max(0.05, exp(-3e-5 * iteration))``: 1 at the start, the floor 0.05 after ~100k iterations."""
    return max(TEMPERATURE_MIN, math.exp(-TEMPERATURE_RATE * iteration))
