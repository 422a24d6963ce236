"""The spike-and-slab Markov prior (sta/priors.py): statistics against exact oracles, KLs against
Monte Carlo, the Gumbel-sigmoid relaxation and the temperature schedule."""
import itertools
import math

import pytest
import torch

from sta.priors import (
    SpikeSlabPrior,
    bernoulli_kl,
    gumbel_sigmoid,
    laplace_kl,
    laplace_rsample,
    temperature_schedule,
)


def _exact_chain_statistics(prior: SpikeSlabPrior, T: int, K: int):
    """Exact P(y_t^k = 1) and P(y_t^k = y_{t-1}^k) under the no-all-off rule, by enumerating the
    2^K - 1 allowed joint states (an oracle independent of the sequential sampler)."""
    states = [s for s in itertools.product((0, 1), repeat=K) if any(s)]

    def factor(prev, cur):
        out = 1.0
        for k in range(K):
            p = prior.pi0 if prev is None else (prior.stay if prev[k] else 1.0 - prior.stay)
            out *= p if cur[k] else 1.0 - p
        return out

    def step(prev):
        w = [factor(prev, s) for s in states]
        z = sum(w)
        return [x / z for x in w]

    dist = step(None)
    marginal = [[sum(d for d, s in zip(dist, states) if s[k]) for k in range(K)]]
    stay = []
    for _ in range(1, T):
        new = [0.0] * len(states)
        same = [0.0] * K
        for d_prev, s_prev in zip(dist, states):
            for j, (w, s) in enumerate(zip(step(s_prev), states)):
                new[j] += d_prev * w
                for k in range(K):
                    same[k] += d_prev * w * (s[k] == s_prev[k])
        dist = new
        marginal.append([sum(d for d, s in zip(dist, states) if s[k]) for k in range(K)])
        stay.append(same)
    return torch.tensor(marginal, dtype=torch.float64), torch.tensor(stay, dtype=torch.float64)


def _within_binomial(observed, expected, n, z=4.5):
    """|observed - expected| <= z standard errors of a binomial proportion, elementwise."""
    se = torch.sqrt(expected * (1 - expected) / n)
    err = (observed - expected).abs()
    assert (err <= z * se + 1e-12).all(), f"observed {observed}, expected {expected}, se {se}"


def test_spikes_shapes_and_values():
    prior = SpikeSlabPrior()
    g = torch.Generator().manual_seed(0)
    active, speed = prior.sample(5, 3, generator=g)
    assert active.shape == speed.shape == (5, 3)
    active, speed = prior.sample(5, 3, batch=7, generator=g)
    assert active.shape == speed.shape == (7, 5, 3)
    assert active.dtype == speed.dtype == torch.float32
    assert set(active.unique().tolist()) <= {0.0, 1.0}
    assert (speed >= 0).all()


def test_no_all_off_step_ever():
    # pi0 = 0.1, K = 2: an unconstrained first step is all-off 81% of the time.
    prior = SpikeSlabPrior(pi0=0.1, stay=0.9)
    for K in (1, 2, 5):
        active = prior.sample_spikes(12, K, batch=4000, generator=torch.Generator().manual_seed(K))
        assert (active.sum(-1) >= 1).all()
    # K = 1: the only field must be on at every step
    assert (prior.sample_spikes(6, 1, batch=100, generator=torch.Generator().manual_seed(1)) == 1).all()


@pytest.mark.parametrize("pi0,stay", [(0.1, 0.9), (0.3, 0.7)])
def test_spike_statistics_match_exact_chain(pi0, stay):
    T, K, n = 6, 3, 40000
    prior = SpikeSlabPrior(pi0=pi0, stay=stay)
    y = prior.sample_spikes(T, K, batch=n, generator=torch.Generator().manual_seed(123)).double()
    marginal, same = _exact_chain_statistics(prior, T, K)
    _within_binomial(y.mean(0), marginal, n)
    _within_binomial((y[:, 1:] == y[:, :-1]).double().mean(0), same, n)
    # the rule shifts the marginal away from the unconstrained pi0 (so the oracle above matters)
    assert marginal[0, 0] > pi0 + 0.05


def test_first_step_pattern_law_equals_rejection():
    """The sequential sampler gives each joint pattern of step 0 the rejection-sampling law
    prod_k p^y (1-p)^(1-y) / (1 - (1-p)^K), exactly up to sampling error."""
    K, n, pi0 = 3, 60000, 0.2
    prior = SpikeSlabPrior(pi0=pi0)
    y = prior.sample_spikes(1, K, batch=n, generator=torch.Generator().manual_seed(5))[:, 0]
    codes = (y * torch.tensor([4.0, 2.0, 1.0])).sum(-1).long()
    counts = torch.bincount(codes, minlength=8).double() / n
    z = 1 - (1 - pi0) ** K
    expected = torch.tensor(
        [0.0] + [pi0 ** sum(s) * (1 - pi0) ** (K - sum(s)) / z for s in itertools.product((0, 1), repeat=K)][1:],
        dtype=torch.float64,
    )
    assert counts[0] == 0
    _within_binomial(counts[1:], expected[1:], n)


def test_sampling_is_seeded():
    prior = SpikeSlabPrior()
    a1, s1 = prior.sample(8, 4, batch=50, generator=torch.Generator().manual_seed(3))
    a2, s2 = prior.sample(8, 4, batch=50, generator=torch.Generator().manual_seed(3))
    a3, s3 = prior.sample(8, 4, batch=50, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a1, a2) and torch.equal(s1, s2)
    assert not torch.equal(s1, s3)


def test_single_has_exactly_one_field_and_stays():
    prior = SpikeSlabPrior(stay=0.9)
    n, T, K = 20000, 6, 4
    y = prior.sample_single(T, K, batch=n, generator=torch.Generator().manual_seed(0))
    assert (y.sum(-1) == 1).all()
    which = y.argmax(-1)
    kept = (which[:, 1:] == which[:, :-1]).double().mean()
    _within_binomial(kept, torch.tensor(0.9, dtype=torch.float64), n * (T - 1))
    _within_binomial(torch.bincount(which[:, 0], minlength=K).double() / n, torch.full((K,), 0.25).double(), n)
    active, _ = prior.sample(T, K, batch=3, single=True, generator=torch.Generator().manual_seed(0))
    assert (active.sum(-1) == 1).all()


def test_speed_distribution_is_folded_laplace():
    prior = SpikeSlabPrior(slab_loc=1.0, slab_scale=0.1)
    s = prior.sample_speeds(50, 40, batch=50, generator=torch.Generator().manual_seed(0)).double()
    n = s.numel()  # 100000
    # Laplace(1, 0.1): mean 1 (std 0.1*sqrt(2)), median 1, mean |s - 1| = 0.1
    assert abs(s.mean().item() - 1.0) < 4.5 * 0.1 * math.sqrt(2) / math.sqrt(n)
    # se of the median = 1 / (2 f(1) sqrt n), with density f(1) = 1 / (2 * 0.1) at the mode
    assert abs(s.median().item() - 1.0) < 4.5 * 0.1 / math.sqrt(n)
    assert abs((s - 1).abs().mean().item() - 0.1) < 4.5 * 0.1 / math.sqrt(n)


def test_spike_prob():
    prior = SpikeSlabPrior(pi0=0.1, stay=0.9)
    assert prior.spike_prob(None).item() == pytest.approx(0.1)
    prev = torch.tensor([0.0, 1.0, 0.25])
    torch.testing.assert_close(prior.spike_prob(prev), torch.tensor([0.1, 0.9, 0.25 * 0.9 + 0.75 * 0.1]))


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="pi0"):
        SpikeSlabPrior(pi0=0.0)
    with pytest.raises(ValueError, match="stay"):
        SpikeSlabPrior(stay=1.5)
    with pytest.raises(ValueError, match="slab_scale"):
        SpikeSlabPrior(slab_scale=0.0)
    with pytest.raises(ValueError, match="T"):
        SpikeSlabPrior().sample(0, 3)
    with pytest.raises(ValueError, match="temperature"):
        gumbel_sigmoid(torch.zeros(3), 0.0)


def test_bernoulli_kl_closed_form_and_monte_carlo():
    q = torch.tensor([0.3, 0.9, 0.5], dtype=torch.float64)
    p = torch.tensor([0.1, 0.9, 0.2], dtype=torch.float64)
    kl = bernoulli_kl(q, p)
    assert kl[1].abs() < 1e-12 and (kl >= 0).all()
    g = torch.Generator().manual_seed(0)
    n = 400000
    y = (torch.rand(n, 3, generator=g, dtype=torch.float64) < q).double()
    log_ratio = y * torch.log(q / p) + (1 - y) * torch.log((1 - q) / (1 - p))
    se = log_ratio.std(0) / math.sqrt(n)
    assert ((log_ratio.mean(0) - kl).abs() <= 4.5 * se + 1e-12).all()
    # finite at hard spikes
    assert torch.isfinite(bernoulli_kl(torch.tensor([0.0, 1.0]), torch.tensor([0.1, 0.1]))).all()


@pytest.mark.parametrize("m,b", [(1.0, 0.1), (1.3, 0.05), (0.4, 0.5), (2.0, 0.2)])
def test_laplace_kl_matches_monte_carlo(m, b):
    n = 400000
    mt = torch.full((n,), m, dtype=torch.float64)
    bt = torch.full((n,), b, dtype=torch.float64)
    x = laplace_rsample(mt, bt, generator=torch.Generator().manual_seed(1))
    q = torch.distributions.Laplace(m, b)
    p = torch.distributions.Laplace(1.0, 0.1)
    log_ratio = q.log_prob(x) - p.log_prob(x)
    kl = laplace_kl(torch.tensor(m, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    se = log_ratio.std() / math.sqrt(n)
    assert abs(log_ratio.mean() - kl) <= 4.5 * se + 1e-9, (log_ratio.mean().item(), kl.item(), se.item())
    if m == 1.0 and b == 0.1:
        assert kl.abs() < 1e-12


def test_laplace_rsample_moments_and_gradient():
    m = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    n = 200000
    x = laplace_rsample(m.expand(n), b.expand(n), generator=torch.Generator().manual_seed(2))
    assert abs(x.mean().item() - 0.5) < 4.5 * 0.3 * math.sqrt(2) / math.sqrt(n)
    assert abs((x - 0.5).abs().mean().item() - 0.3) < 4.5 * 0.3 / math.sqrt(n)
    x.mean().backward()
    # d x / d m = 1; d E|x - m| / d b = 1, and x - m = b * eps so d mean(x)/db = mean(eps) ~ 0
    assert m.grad.item() == pytest.approx(1.0)
    assert abs(b.grad.item()) < 4.5 * math.sqrt(2) / math.sqrt(n)


def test_gumbel_sigmoid_soft_and_hard():
    logits = torch.tensor([-2.0, 0.0, 1.5]).repeat(100000, 1).requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    hard = gumbel_sigmoid(logits, 0.5, hard=True, generator=g)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    # P(hard = 1) = sigmoid(logits), for any temperature
    _within_binomial(hard.detach().double().mean(0), torch.sigmoid(logits[0].detach()).double(), 100000)
    hard.sum().backward()
    assert logits.grad is not None and (logits.grad.abs().sum(0) > 0).all()
    soft = gumbel_sigmoid(logits.detach(), 1.0, generator=torch.Generator().manual_seed(0))
    assert ((soft > 0) & (soft < 1)).all()
    # low temperature approaches the hard sample drawn with the same noise
    cold = gumbel_sigmoid(logits.detach(), 1e-3, generator=torch.Generator().manual_seed(0))
    same = gumbel_sigmoid(logits.detach(), 0.5, hard=True, generator=torch.Generator().manual_seed(0))
    assert ((cold - same).abs() > 0.5).double().mean() == 0


def test_temperature_schedule():
    assert temperature_schedule(0) == 1.0
    assert temperature_schedule(10000) == pytest.approx(math.exp(-0.3))
    assert temperature_schedule(100000) == 0.05  # exp(-3) = 0.0498 -> clamped
    assert temperature_schedule(10**7) == 0.05
    values = [temperature_schedule(i) for i in range(0, 200000, 5000)]
    assert all(a >= b for a, b in zip(values, values[1:]))
