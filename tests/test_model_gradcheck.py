"""Float64 gradcheck of a whole training loss through the fast path (one flow_path call per
sequence, backend cpu, spike_floor 0) on a tiny model: every field parameter's gradient in the
ELBO matches finite differences."""
import pytest
import torch
from torch.nn.utils.stateless import _reparametrize_module

from sta.model import ModelConfig, STAModel

FIELD_PARAMETERS = {
    "hamiltonian": ["fields.potential.W", "fields.potential.a", "fields.potential.time.weight",
                    "fields.rotational.W", "fields.rotational.P", "log_sigma"],
    "mlp": ["fields.potential.W", "fields.rotational.W1", "fields.rotational.W2", "fields.rotational.b2"],
}


@pytest.mark.parametrize("rotational", ["hamiltonian", "mlp"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_elbo_gradcheck_float64_through_flow_path(rotational, backend, one_thread):
    torch.manual_seed(0)
    model = STAModel(ModelConfig(latent=3, num_fields=2, hidden=3, conv=2, transitions=2, image_size=8,
                                 rotational=rotational, backend=backend, spike_floor=0.0)).double()
    x = torch.rand(2, 3, 3, 8, 8, dtype=torch.float64)
    names = FIELD_PARAMETERS[rotational]
    params = dict(model.named_parameters())

    def loss(*values):
        with _reparametrize_module(model, dict(zip(names, values))):
            noise = torch.Generator().manual_seed(3)  # the same Gumbel, Laplace and z0 noise every call
            return model.elbo(x, temperature=0.5, generator=noise).loss

    inputs = tuple(params[n].detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
