"""The STA model and its baselines (sta/model.py): the ELBO of docs/maths.md 4.3 is finite with every term
reported, its gradient reaches every parameter, and a tiny model overfits one batch.

Sizes are tiny (D=6, H=8, 8-channel convs, 8x8 frames, T=3) so the whole file runs in seconds.
"""
import itertools
import math

import pytest
import torch

from sta.model import MODELS, ELBOTerms, ModelConfig, STAModel

# (model, rotational, control): every combination the issue names. "static" and "linear" have no
# fields, so rotational/control change nothing for them; they are still built and checked (the
# config must accept the options and the parameters must all be trained).
COMBOS = list(itertools.product(MODELS, ("hamiltonian", "mlp"), ("single", "double")))


# Tiny ops: one thread (fixture in conftest.py) avoids OpenMP spin contention on a shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides) -> ModelConfig:
    kwargs = dict(channels=1, image_size=8, transitions=3, latent=6, num_fields=2, hidden=8, conv=8)
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def tiny_batch(config: ModelConfig, batch: int = 4, seed: int = 0) -> torch.Tensor:
    """Random frames in [0, 1]: ``(batch, T+1, C, S, S)``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, config.transitions + 1, config.channels, config.image_size, config.image_size,
                      generator=gen)


@pytest.mark.parametrize("model,rotational,control", COMBOS)
def test_elbo_finite_terms_and_gradient_reaches_every_parameter(model, rotational, control):
    config = tiny_config(model=model, rotational=rotational, control=control)
    net = STAModel(config)
    x = tiny_batch(config)
    terms = net.elbo(x, temperature=0.5, slab=True)

    assert isinstance(terms, ELBOTerms)
    scalars = terms.scalars()
    assert set(scalars) == {"recon", "kl_z0", "kl_path", "kl_spike", "kl_slab", "hj", "div", "nelbo", "loss"}
    for name, value in terms._asdict().items():
        assert value.dim() == 0, f"{name}: expected a 0-dim tensor, got shape {tuple(value.shape)}"
        assert math.isfinite(scalars[name]), f"{name} = {scalars[name]}"
    # the totals are the documented sums of the reported terms
    nelbo = terms.recon + terms.kl_z0 + terms.kl_path + terms.kl_spike + terms.kl_slab
    assert torch.allclose(terms.nelbo, nelbo) and torch.allclose(terms.loss, nelbo + terms.hj + terms.div)
    assert scalars["recon"] > 0 and scalars["kl_z0"] >= 0  # Bernoulli NLL of [0,1] pixels, Gaussian KL
    assert scalars["kl_spike"] >= 0 and scalars["kl_slab"] >= 0 and scalars["hj"] >= 0 and scalars["div"] >= 0
    # terms that must be active (non-zero) for each model, so that "reported" is not "always 0"
    if model in ("sta", "linear"):
        assert scalars["kl_spike"] > 0 and scalars["kl_slab"] > 0
    if model == "dense":
        assert scalars["kl_spike"] == 0 and scalars["kl_slab"] > 0
    if model == "static":
        assert scalars["kl_spike"] == scalars["kl_slab"] == scalars["hj"] == 0
    if model in ("sta", "dense"):
        assert scalars["hj"] > 0
        assert (scalars["div"] > 0) == (rotational == "mlp"), "the divergence penalty is for mlp fields only"

    terms.loss.backward()
    names = [name for name, p in net.named_parameters()]
    assert names, "the model has no parameters"
    for name, p in net.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: gradient is identically zero"


def test_kl_weight_scales_only_the_kl_terms_of_the_loss():
    """KL warm-up: loss = recon + w * (kl_z0 + kl_path + kl_spike + kl_slab) + hj + div; nelbo and
    every reported term are the unweighted ones (same noise, so the same sample for both w)."""
    config = tiny_config()
    net = STAModel(config)
    x = tiny_batch(config)
    full = net.elbo(x, temperature=0.5, generator=torch.Generator().manual_seed(3))
    warm = net.elbo(x, temperature=0.5, generator=torch.Generator().manual_seed(3), kl_weight=0.25)
    for name in ("recon", "kl_z0", "kl_path", "kl_spike", "kl_slab", "hj", "div", "nelbo"):
        assert torch.equal(getattr(full, name), getattr(warm, name)), name
    kl = warm.kl_z0 + warm.kl_path + warm.kl_spike + warm.kl_slab
    assert kl > 1.0  # otherwise the check below could not tell the weights apart
    assert torch.allclose(warm.loss, warm.recon + 0.25 * kl + warm.hj + warm.div)
    assert torch.allclose(full.loss, full.nelbo + full.hj + full.div)


def test_structure_of_each_model():
    """Which parameters each model owns: double control doubles the coefficients of sta/dense only."""
    for model in MODELS:
        single = STAModel(tiny_config(model=model))
        double = STAModel(tiny_config(model=model, control="double"))
        names = {n.split(".")[0] for n, _ in single.named_parameters()}
        assert {"encoder", "decoder"} <= names
        assert ("fields" in names) == (model in ("sta", "dense"))
        assert ("directions" in names) == (model == "linear")
        assert ("posterior" in names) == (model != "static")
        K = single.config.num_fields
        assert single.config.num_coefficients == K
        assert double.config.num_coefficients == (2 * K if model in ("sta", "dense") else K)


def test_potential_prior_and_hard_spikes_train_every_parameter():
    """The other options of docs/maths.md 4.1/4.3: prior flow bank instead of learned diffusion scales, and
    straight-through hard spikes (every field switched on by sampling in a larger batch)."""
    config = tiny_config(prior="potential", hard=True, pi0=0.5)
    net = STAModel(config)
    terms = net.elbo(tiny_batch(config, batch=16), temperature=1.0)
    assert all(math.isfinite(v) for v in terms.scalars().values())
    terms.loss.backward()
    for name, p in net.named_parameters():
        if p.numel() == 0:  # the prior bank's empty rotational half (K_r = 0)
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient"


def test_spike_only_phase_has_no_slab_kl_and_unit_speeds():
    config = tiny_config()
    net = STAModel(config)
    terms = net.elbo(tiny_batch(config), temperature=0.5, slab=False)
    assert terms.kl_slab.item() == 0.0 and terms.kl_spike.item() > 0


def test_elbo_rejects_wrong_shapes():
    net = STAModel(tiny_config())
    with pytest.raises(ValueError, match=r"x: expected shape"):
        net.elbo(torch.rand(2, 3, 1, 8, 8))  # T+1 = 3, not 4
    with pytest.raises(ValueError, match=r"model: expected one of"):
        tiny_config(model="transformer")
    with pytest.raises(ValueError, match=r"latent: expected a positive int"):
        tiny_config(latent=0)
    with pytest.raises(ValueError, match=r"field_weight_scale: expected > 0"):
        tiny_config(field_weight_scale=0.0)
    assert STAModel(tiny_config(field_weight_scale=0.5)).fields.potential.W.std() > \
        3 * STAModel(tiny_config(field_weight_scale=0.1)).fields.potential.W.std()  # the option reaches the fields


def test_linear_model_translates_and_static_model_stands_still():
    """The baselines' dynamics: linear adds sum_k g_k d_k; static never moves."""
    lin = STAModel(tiny_config(model="linear"))
    z0, g = torch.randn(3, 6), torch.randn(3, 3, 2)
    path = lin.rollout(z0, g)
    expected = z0[:, None] + torch.cumsum(g @ lin.directions, 1)
    assert torch.allclose(path[:, 1:], expected, atol=1e-6)
    static = STAModel(tiny_config(model="static"))
    assert torch.equal(static.rollout(z0, g), z0[:, None].expand(3, 4, 6))


def test_tiny_model_overfits_one_batch():
    """One batch of 4 binarised digit sequences, 300 Adam steps: the loss falls by more than 4x and
    the reconstruction is < 0.6 x that of the best decoder ignoring z (the per-pixel mean image), so
    the latent path is really used (not only the decoder bias)."""
    from sta.data import make_dataset

    ds = make_dataset("digits", split="train", num_sequences=4, T=3, image_size=8, seed=0)
    x = (ds.tensors()["x"] > 0.5).float()  # binary frames: the Bernoulli NLL can approach 0
    config = tiny_config(channels=ds.channels)
    torch.manual_seed(0)
    net = STAModel(config)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses, recons = [], []
    for _ in range(300):
        terms = net.elbo(x, temperature=0.5, generator=gen)
        opt.zero_grad()
        terms.loss.backward()
        opt.step()
        losses.append(terms.loss.item())
        recons.append(terms.recon.item())
    p = x.mean((0, 1)).clamp(1e-6, 1 - 1e-6)  # per-pixel mean over every frame
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).sum().item()
    z_free = (config.transitions + 1) * entropy  # recon of the best z-independent decoder, per sequence
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    recon = sum(recons[-10:]) / 10
    assert last < first / 4, f"loss {first:.1f} -> {last:.1f}: expected a 4x drop on one batch"
    assert recon < 0.6 * z_free, f"recon {recon:.1f} vs {z_free:.1f} for the best decoder ignoring z"
