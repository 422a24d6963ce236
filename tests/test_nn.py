"""sta.nn.SparseFlowLayer: the module over flow_step, with the log-density update."""
import pytest
import torch

import sta
from sta.nn import SparseFlowLayer
from tests.tolerances import assert_close


def test_layer_matches_flow_step_and_carries_logq():
    layer = SparseFlowLayer(8, 3, 2, 16, dt=0.5).double()
    z = torch.randn(4, 8, dtype=torch.float64)
    g_pot = torch.rand(4, 3, dtype=torch.float64)
    g_rot = torch.rand(4, 2, dtype=torch.float64)
    logq = torch.randn(4, dtype=torch.float64)
    ref = sta.flow_step(z, 0.1, g_pot, g_rot, layer.fields, dt=0.5)
    z_next, logq_next = layer(z, 0.1, g_pot, g_rot, logq)
    assert_close(z_next, ref.z)
    assert_close(logq_next, logq - 0.5 * ref.div)
    z_next2, dlogq = layer(z, 0.1, g_pot, g_rot)
    assert_close(z_next2, ref.z)
    assert_close(dlogq, -0.5 * ref.div)
    with pytest.raises(ValueError, match="^logq:"):
        layer(z, 0.1, g_pot, g_rot, torch.zeros(3, dtype=torch.float64))


@pytest.mark.slow
def test_layer_trains_in_a_loop():
    """The README quickstart in miniature: the loss goes down and every parameter gets a gradient."""
    torch.manual_seed(0)
    layer = SparseFlowLayer(dim=6, num_potential=2, num_rotational=2, hidden=16)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    z = torch.randn(64, 6)
    target = z + 0.3 * torch.tanh(z.flip(1))
    g = torch.ones(64, 2)
    losses = []
    for _ in range(60):
        z_next, dlogq = layer(z, 0.0, g, g)
        loss = (z_next - target).square().mean() + 1e-3 * dlogq.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for name, p in layer.named_parameters():
        assert p.grad is not None, name


@pytest.mark.parametrize("logq, exc", [
    ([0.0] * 4, TypeError),  # issue 15: "'list' object has no attribute 'shape'"
    (torch.zeros(4, dtype=torch.int64), TypeError),
    (torch.zeros(4, 1), ValueError),
])
def test_bad_logq_names_the_argument(logq, exc):
    layer = SparseFlowLayer(3, 1, 1, 4)
    z, g = torch.randn(4, 3), torch.ones(4, 1)
    with pytest.raises(exc, match="^logq:") as info:
        layer(z, 0.0, g, g, logq=logq)
    assert type(info.value) is exc


@pytest.mark.parametrize("kwargs, exc, argument", [
    (dict(dt="0.5"), TypeError, "dt"),
    (dict(dt=float("nan")), ValueError, "dt"),
    (dict(dt=10**400), ValueError, "dt"),
    (dict(backend="fortran"), ValueError, "backend"),
    (dict(num_rotational=-1), ValueError, "num_rotational"),
])
def test_bad_construction_names_the_argument(kwargs, exc, argument):
    args = dict(dim=3, num_potential=1, num_rotational=1, hidden=4)
    args.update(kwargs)
    with pytest.raises(exc, match=f"^{argument}:") as info:
        SparseFlowLayer(**args)
    assert type(info.value) is exc
