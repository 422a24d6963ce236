"""The authors' MNIST networks (sta/models/nets_authors.py) and ``ModelConfig.arch = "authors"``:
the sizes quoted in the issue and the docs, shapes, the two posterior stacks kept apart, bad sizes,
and a tiny model of every kind that trains on them."""
import pytest
import torch

from sta.models import MODELS, ModelConfig, STAModel
from sta.models.nets_authors import AuthorsDecoder, AuthorsEncoder, AuthorsPosterior, parameter_counts
from sta.train import preset


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_at_the_papers_sizes():
    """D = 324, 3x28x28, K = 3: 70.9M in the VAE, 6.7M in the posterior (built on the meta device:
    no memory, no time)."""
    with torch.device("meta"):
        encoder, decoder = AuthorsEncoder(3, 324, 28), AuthorsDecoder(324, 3, 28)
        posterior = AuthorsPosterior(6, 9, 6, 28, width=100)
    # the 7x7 convolution 648 -> 972 dominates: 648 * 972 * 49 weights
    assert encoder.conv[4].weight.shape == (972, 648, 7, 7)
    assert decoder.conv[5].weight.shape == (972, 648, 7, 7)  # ConvTranspose2d: (in, out, k, k)
    assert _count(encoder) + _count(decoder) == 70_896_711
    assert _count(posterior) == 6_702_809


@pytest.mark.parametrize("size", [16, 28, 32])
def test_shapes(size):
    D, C = 6, 3
    x = torch.rand(5, C, size, size)
    assert AuthorsEncoder(C, D, size)(x).shape == (5, 2 * D)
    logits = AuthorsDecoder(D, C, size)(torch.randn(5, D))
    assert logits.shape == (5, C, size, size) and torch.isfinite(logits).all()
    assert AuthorsPosterior(2 * C, 9, 6, size, width=4)(torch.rand(5, 2 * C, size, size)).shape == (5, 9)


def test_posterior_spike_and_slab_outputs_come_from_their_own_stack():
    posterior = AuthorsPosterior(6, 9, 6, 16, width=4)
    out = posterior(torch.rand(3, 6, 16, 16))
    spike_grad = torch.autograd.grad(out[:, :3].sum(), list(posterior.slab.parameters()), allow_unused=True,
                                     retain_graph=True)
    slab_grad = torch.autograd.grad(out[:, 3:].sum(), list(posterior.spike.parameters()), allow_unused=True,
                                    retain_graph=True)
    assert all(g is None or not g.any() for g in spike_grad), "spike logits read the slab stack"
    assert all(g is None or not g.any() for g in slab_grad), "slab outputs read the spike stack"
    # and each output does depend on its own stack
    own = torch.autograd.grad(out[:, :3].sum(), list(posterior.spike.parameters()))
    assert any(g.abs().sum() > 0 for g in own)
    assert AuthorsPosterior(6, 6, 6, 16, width=4).spike is None  # dense: no spikes, one stack


def test_bad_sizes_name_the_argument():
    with pytest.raises(ValueError, match="image_size"):
        AuthorsEncoder(3, 8, 30)
    with pytest.raises(ValueError, match="image_size"):
        AuthorsDecoder(8, 3, 18)
    with pytest.raises(ValueError, match="slab_features"):
        AuthorsPosterior(6, 4, 6, 16)
    with pytest.raises(ValueError, match="arch"):
        ModelConfig(arch="huge")


def test_paper_preset_selects_the_authors_networks_on_mnist():
    config = preset("paper")
    assert config.model.arch == "authors" and config.dataset == "mnist" and config.model.latent == 324
    assert preset("quick").model.arch == "small" and ModelConfig().arch == "small"


@pytest.mark.parametrize("kind", MODELS)
def test_every_kind_trains_on_the_authors_networks(kind):
    torch.manual_seed(0)
    model = STAModel(ModelConfig(model=kind, image_size=16, transitions=2, latent=4, hidden=8, conv=4,
                                 arch="authors"))
    assert isinstance(model.encoder, AuthorsEncoder) and isinstance(model.decoder, AuthorsDecoder)
    counts = parameter_counts(model)
    assert counts["total"] == sum(counts[k] for k in ("encoder", "decoder", "posterior", "other"))
    x = torch.rand(2, 3, 3, 16, 16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):  # one batch, overfitted: the loss must fall
        terms = model.elbo(x, temperature=1.0, generator=torch.Generator().manual_seed(1))
        assert all(torch.isfinite(v) for v in terms)
        optimizer.zero_grad()
        terms.loss.backward()
        optimizer.step()
        losses.append(terms.loss.item())
    assert losses[-1] < losses[0], losses
