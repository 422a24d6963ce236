"""ModelConfig.spike_floor: relaxed spikes below the floor are exact zeros in the flow's coefficients."""
import pytest
import torch

from sta.model import ModelConfig, STAModel


def _model(floor):
    torch.manual_seed(0)
    return STAModel(ModelConfig(latent=6, num_fields=3, hidden=5, conv=4, transitions=3, image_size=8,
                                spike_floor=floor))


@pytest.mark.parametrize("floor", [0.0, 0.3])
def test_pairs_below_the_floor_are_not_handed_to_the_flow(floor, monkeypatch, one_thread):
    model = _model(floor)
    seen = {}
    original = type(model).transport

    def spy(self, z0, g):
        seen["g"] = g.detach().clone()
        return original(self, z0, g)

    monkeypatch.setattr(type(model), "transport", spy)
    spikes_seen = {}
    original_sample = type(model).sample_spikes

    def spy_spikes(self, logits, temperature, generator):
        spikes, kl = original_sample(self, logits, temperature, generator)
        spikes_seen["s"] = spikes.detach().clone()
        return spikes, kl

    monkeypatch.setattr(type(model), "sample_spikes", spy_spikes)
    x = torch.rand(4, 4, 3, 8, 8)
    terms = model.elbo(x, temperature=0.5)
    terms.loss.backward()
    spikes, g = spikes_seen["s"], seen["g"]
    below = spikes < floor
    assert torch.all(g[below] == 0)
    assert torch.all(g[~below] != 0)  # the slab speeds are positive
    assert terms.evaluated.item() == pytest.approx((~below).float().mean().item())  # the logged diagnostic
    if floor > 0:
        assert below.any() and (~below).any(), "the test needs pairs on both sides of the floor"


@pytest.mark.parametrize("bad", [-0.1, 1.0, "0.1", True, float("nan")])
def test_bad_spike_floor_names_the_argument(bad):
    with pytest.raises(ValueError, match="spike_floor"):
        ModelConfig(spike_floor=bad)
