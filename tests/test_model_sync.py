"""model.elbo never synchronises with the host: no .item()/bool()/int()/float()/tolist() of a tensor.

A host synchronisation inside the training step stalls a GPU at every transition and makes the step
impossible to capture in a CUDA graph; on the CPU it is harmless, so only this test can catch one.
"""
import pytest
import torch

from sta.model import ModelConfig, STAModel
from sta.models.registry import KINDS

SYNCS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist")


@pytest.fixture
def no_host_sync(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("host synchronisation (Tensor.item/bool/int/float/tolist) inside elbo")

    def install():
        for name in SYNCS:
            monkeypatch.setattr(torch.Tensor, name, refuse)

    return install


CONFIGS = [dict(model=kind) for kind in sorted(KINDS)] + [
    dict(model="sta", rotational="mlp"), dict(model="sta", control="double"), dict(model="sta", prior="potential"),
    dict(model="sta", backend="torch"),
]


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_elbo_forward_and_backward_without_host_sync(overrides, no_host_sync, one_thread):
    config = ModelConfig(latent=6, num_fields=2, hidden=5, conv=4, transitions=3, image_size=8, **overrides)
    model = STAModel(config)
    x = torch.rand(2, 4, 3, 8, 8)
    no_host_sync()
    terms = model.elbo(x, temperature=0.5)
    terms.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, "no parameter received a gradient"
