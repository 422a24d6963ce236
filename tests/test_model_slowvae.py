"""The slowvae baseline (sta/models/slowvae.py): every frame encoded, a Laplace prior on latent steps.

The closed-form Gaussian-Laplace cross-entropy against quadrature; the ELBO's path term by hand;
the principal step directions it is rolled forward with; a tiny model overfits one batch; train /
evaluate / plot through the CLI with every metric reported.
"""
import math

import pytest
import torch

from sta.model import STAModel
from sta.models.base import LOG_2PI
from sta.models.slowvae import principal_steps
from sta.priors import gaussian_laplace_cross_entropy
from tests.test_model import assert_overfits, cli_train_evaluate_plot, tiny_batch, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gaussian_laplace_cross_entropy_matches_quadrature():
    mean = torch.tensor([-2.0, -0.3, 0.0, 0.1, 1.5], dtype=torch.float64)
    logvar = torch.tensor([0.5, -2.0, 0.0, -6.0, 1.0], dtype=torch.float64)
    scale = 0.25
    u = torch.linspace(-40, 40, 400001, dtype=torch.float64)
    for m, lv, got in zip(mean, logvar, gaussian_laplace_cross_entropy(mean, logvar, scale)):
        s = math.exp(0.5 * lv)
        density = torch.exp(-0.5 * ((u - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))
        want = torch.trapezoid(density * (math.log(2 * scale) + u.abs() / scale), u)
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        gaussian_laplace_cross_entropy(mean, logvar, 0.0)


def test_elbo_path_term_by_hand_and_gradients():
    """kl_path = sum_t [E log q(z_t|x_t) + E -log Laplace(z_t; z_{t-1}, 1/rate)], z_{t-1} the sample."""
    config = tiny_config(model="slowvae", slow_rate=4.0)
    net = STAModel(config).eval()  # eval: no step tracking
    x = tiny_batch(config)
    terms = net.elbo(x, generator=torch.Generator().manual_seed(2))
    assert all(math.isfinite(v) for v in terms.scalars().values())
    assert terms.kl_spike == 0 and terms.kl_slab == 0 and terms.hj == 0 and terms.div == 0

    gen = torch.Generator().manual_seed(2)  # the same draws, in the same order
    B, T1 = x.shape[:2]
    mu, logvar = net.encode(x.flatten(0, 1))
    mu, logvar = mu.view(B, T1, -1), logvar.view(B, T1, -1)
    z0 = mu[:, 0] + torch.exp(0.5 * logvar[:, 0]) * torch.randn(mu[:, 0].shape, generator=gen)
    rest = mu[:, 1:] + torch.exp(0.5 * logvar[:, 1:]) * torch.randn(mu[:, 1:].shape, generator=gen)
    z = torch.cat([z0[:, None], rest], 1)
    entropy = 0.5 * (logvar[:, 1:] + LOG_2PI + 1).sum(-1)
    cross = gaussian_laplace_cross_entropy(mu[:, 1:] - z[:, :-1], logvar[:, 1:], 0.25).sum(-1)
    assert terms.kl_path.item() == pytest.approx((cross - entropy).sum(1).mean().item(), rel=1e-5)
    assert torch.allclose(terms.loss, terms.nelbo)  # the unweighted bound is what is minimised

    terms.loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient"


def test_principal_steps_are_the_scaled_signed_leading_directions():
    """Second moment with rms 2 along (e0 + e1) / sqrt 2, rms 1 along e3, mean step pointing to -e0:
    d_0 = -2 (e0 + e1) / sqrt 2 (the sign of the mean), d_1 = +-e3; the rest is dropped."""
    u0 = torch.tensor([1.0, 1.0, 0.0, 0.0]) / math.sqrt(2)
    e3 = torch.tensor([0.0, 0.0, 0.0, 1.0])
    moment = 4.0 * torch.outer(u0, u0) + torch.outer(e3, e3) + 0.01 * torch.eye(4)
    mean = torch.tensor([-1.5, -1.0, 0.0, 0.0])
    d = principal_steps(moment, mean, 2)
    assert d.shape == (2, 4)
    assert torch.allclose(d[0], -math.sqrt(4.01) * u0, atol=1e-6)
    assert torch.allclose(d[1].abs(), math.sqrt(1.01) * e3, atol=1e-6)


def test_training_tracks_steps_and_evaluation_rolls_forward_along_them():
    """elbo in train mode updates the directions (eval mode does not); the evaluation rollout moves
    mu(x_0) by the projection of the encoded steps on them: z_t = mu_0 + P (mu_t - mu_0)."""
    config = tiny_config(model="slowvae")
    net = STAModel(config)
    x = tiny_batch(config, batch=8)
    zero_g, _ = net.infer_coefficients(x)
    assert torch.equal(zero_g, torch.zeros(8, 3, 2))  # no step seen yet: no direction
    for _ in range(3):
        net.elbo(x)
    assert int(net.step_count) == 3
    d = net.directions.clone()
    assert d.shape == (2, config.latent) and (d.norm(dim=1) > 0).all()
    assert torch.allclose(d @ d.T, torch.diag(d.norm(dim=1) ** 2), atol=1e-6)  # orthogonal
    net.eval()
    net.elbo(x)
    assert int(net.step_count) == 3 and torch.equal(net.directions, d)

    g, score = net.infer_coefficients(x)
    assert g.shape == (8, 3, 2) and torch.equal(score, g.abs())
    with torch.no_grad():
        mu = net.encode(x.flatten(0, 1))[0].view(8, 4, -1)
        z = net.rollout(mu[:, 0], g)
    u = d / d.norm(dim=1, keepdim=True)
    want = mu[:, :1] + (mu - mu[:, :1]) @ u.T @ u
    assert torch.allclose(z, want, atol=1e-5)


def test_slowvae_needs_no_more_directions_than_latents():
    with pytest.raises(ValueError, match=r"num_fields: slowvae rolls forward along K <= latent = 2"):
        STAModel(tiny_config(model="slowvae", latent=2, num_fields=3))


@pytest.mark.slow  # trains (~1 s)
def test_tiny_slowvae_overfits_one_batch():
    assert_overfits(model="slowvae")


@pytest.mark.slow  # trains, evaluates and plots through the CLI
def test_train_evaluate_plot_through_the_cli(tmp_path):
    result, plots = cli_train_evaluate_plot("slowvae", tmp_path)
    assert result["model"] == "slowvae" and result["step"] == 3
    for key in ("nelbo_per_sequence", "nll_x0_iw", "equivariance_error", "equivariance_error_single"):
        assert math.isfinite(result[key]), key
    # every metric applies: it is rolled forward and scored along its step directions
    assert 0.0 <= result["identification_accuracy"] <= 1.0 and 0.0 <= result["identification_f1"] <= 1.0
    assert len(result["field_assignment"]) == 3
    assert {"loss_curves.png", "reconstructions.png", "latent_flows.png", "traversal_field0.png"} <= plots
    assert "grid_transport_field0.png" not in plots  # no learned fields to transport a density with
