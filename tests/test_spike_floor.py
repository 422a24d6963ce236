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


@pytest.mark.slow  # trains a tiny run
def test_spike_floor_gradient_script_reports_every_checkpoint(tmp_path):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import spike_floor_gradient

    out = tmp_path / "report.md"
    assert spike_floor_gradient.main(["--preset", "tiny", "--floor", "0.3", "--steps", "6", "--every", "3",
                                      "--batches", "2", "--run", str(tmp_path / "run"), "--out", str(out)]) == 0
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ") and "step" not in line]
    assert [int(r[0]) for r in rows] == [0, 3, 6]  # the step-0 checkpoint and every periodic one
    for step, skipped, lost, lost_max, lost_posterior, lost_fields, cosine in ([float(v) for v in r] for r in rows):
        assert 0.0 < skipped <= 1.0  # a floor of 0.3 skips pairs of an untrained tiny model
        assert 0.0 < lost <= lost_max and 0.0 < lost_posterior and 0.0 <= lost_fields  # dropped: not zero
        assert -1.0 <= cosine < 1.0
