"""Flow ops inside a user's torch.autocast, and under torch.compile with changing t, dt and batch."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import sta
from sta.nn import SparseFlowLayer
from tests.tolerances import PARITY, assert_close

CPU_BACKENDS = ["torch", "cpu", "triton"]  # triton runs under the interpreter on a CPU-only machine
BF16 = PARITY[torch.bfloat16]


def _bank(construction="hamiltonian"):
    torch.manual_seed(0)
    return sta.FieldBank(12, 3, 2, 8, construction)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("construction", ["hamiltonian", "mlp"])
def test_flow_ops_under_cpu_bf16_autocast_match_float32(backend, construction, one_thread):
    fields = _bank(construction)
    z, g_pot, g_rot = torch.randn(5, 12), torch.rand(5, 3), torch.rand(5, 2) * (torch.rand(5, 2) > 0.5)
    encoder = torch.nn.Linear(12, 12)
    with torch.no_grad():
        encoder.weight.copy_(torch.eye(12))
        encoder.bias.zero_()
    # bf16-representable inputs, so the float32 computation inside autocast sees the same numbers
    z, g_pot, g_rot = (x.bfloat16().float() for x in (z, g_pot, g_rot))
    want_step = sta.flow_step(z, 0.3, g_pot, g_rot, fields, outputs=("z", "div"), backend=backend)
    want_path = sta.flow_path(z, 0.3, g_pot[:, None], g_rot[:, None], fields, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_lowp = encoder(z)  # what an autocast encoder hands the flow: bf16 activations
        assert z_lowp.dtype == torch.bfloat16
        step = sta.flow_step(z_lowp, 0.3, g_pot.bfloat16(), g_rot, fields, outputs=("z", "div"), backend=backend)
        path = sta.flow_path(z_lowp, 0.3, g_pot[:, None], g_rot[:, None].bfloat16(), fields, backend=backend)
        layer_z, layer_logq = SparseFlowLayer(12, 3, 2, 8, construction, backend=backend)(z_lowp, 0.3, g_pot, g_rot)
    for out in (step.z, step.div, path.z, path.div, layer_z, layer_logq):
        assert out.dtype == torch.float32  # fields and divergences are computed in float32
    assert_close(step.z, want_step.z, tol=BF16, what="z")  # identity encoder: exact bf16 inputs
    assert_close(step.div, want_step.div, tol=BF16, what="div")
    assert_close(path.z, want_path.z, tol=BF16, what="path z")
    assert_close(path.div, want_path.div, tol=BF16, what="path div")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grid_ops_under_cpu_bf16_autocast(backend, one_thread):
    fields = _bank()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grid = sta.latent_grid(fields, [0.0] * 12, shape=(8, 8), g_pot=[1.0, 0.0, 0.0], backend=backend)
        rho = torch.ones(8, 8) / 64
        moved = sta.transport_for(rho, grid.faces, grid.dx, 0.1, backend=backend)
    assert moved.dtype == torch.float32 and abs(float(moved.sum()) - 1.0) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["inductor", "aot_eager"])
def test_compiled_layer_matches_eager_for_changing_t_dt_and_batch(compiler, one_thread):
    """backend "cpu" (a registered op; the pure-PyTorch reference gathers data-dependent row sets,
    which fullgraph capture cannot hold)."""
    torch._dynamo.reset()  # a fresh recompilation budget: other tests compiled the same forward
    torch.manual_seed(0)
    layer = SparseFlowLayer(dim=8, num_potential=3, num_rotational=2, hidden=8, backend="cpu")
    compiled = torch.compile(layer, fullgraph=True, backend=compiler)
    for B in (4, 7):
        for t, dt in ((0.0, 1.0), (0.5, 0.3), (1.7, 2.0)):
            layer.dt = dt
            z, g_pot, g_rot = torch.randn(B, 8), torch.rand(B, 3), torch.rand(B, 2)
            z_eager, logq_eager = layer(z, t, g_pot, g_rot)
            z_comp, logq_comp = compiled(z, t, g_pot, g_rot)
            assert_close(z_comp, z_eager, tol=PARITY[torch.float32], what=f"z B={B} t={t} dt={dt}")
            assert_close(logq_comp, logq_eager, tol=PARITY[torch.float32], what=f"logq B={B} t={t} dt={dt}")


@pytest.mark.slow
def test_compiled_layer_does_not_recompile_per_time_or_batch(one_thread):
    """A float t that changes at every call, and changing batch sizes: one graph specialised on the
    first call, then symbolic t, then symbolic batch size -- no recompilation per value."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = SparseFlowLayer(dim=8, num_potential=3, num_rotational=2, hidden=8, backend="cpu")
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    for B in (4, 7, 9):
        for t in (0.0, 0.5, 1.7, 2.25):
            z, g_pot, g_rot = torch.randn(B, 8), torch.rand(B, 3), torch.rand(B, 2)
            z_comp, _ = compiled(z, t, g_pot, g_rot)
            assert_close(z_comp, layer(z, t, g_pot, g_rot)[0], tol=PARITY[torch.float32], what=f"B={B} t={t}")
    assert counter.frame_count <= 3, f"{counter.frame_count} compilations for 12 calls"
