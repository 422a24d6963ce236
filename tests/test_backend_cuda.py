"""The ``cuda`` backend (sta/backends/cuda.py, csrc/cuda): parity with the reference, opcheck, CUDA graphs.

The ``gpu`` tests need a CUDA GPU and an extension built with CUDA; elsewhere only the
availability reporting is checked (the kernels are compile-checked by tests/test_cuda_compile.py).
Sparsity patterns, B = 0, odd D and float64 are in the cross-backend matrix (tests/test_parity.py).
"""
import pytest
import torch

from sta import FieldBank
from sta.backends import BackendUnavailableError, get_backend
from sta.ops import flow_step
from tests.parity import Case, check_parity, coefficients
from tests.tolerances import assert_close

OUTPUTS = ("z", "div", "hj", "div_rot", "curl", "u")


def test_cuda_backend_registers_and_explains():
    backend = get_backend("cuda")
    assert backend.name == "cuda" and type(backend).__name__ == "CompiledFlowStep"
    z = torch.randn(4, 6)
    fields = FieldBank(6, 2, 2, 8)
    if not torch.cuda.is_available():
        assert backend.unavailable(), "no GPU visible: the backend must say why it is unavailable"
        with pytest.raises(BackendUnavailableError, match="cuda"):
            flow_step(z, 0.0, torch.ones(4, 2), torch.ones(4, 2), fields, backend="cuda")
    else:  # CPU tensors are refused with the device named
        with pytest.raises(BackendUnavailableError, match="CUDA tensors only"):
            flow_step(z, 0.0, torch.ones(4, 2), torch.ones(4, 2), fields, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("rotational", ["hamiltonian", "mlp"])
@pytest.mark.parametrize("shape", [(37, 13, 3, 3, 24, 2), (128, 226, 5, 5, 226, 2), (5, 7, 2, 0, 9, 1)])
def test_parity_fp32_larger_shapes(rotational, shape):
    """Shapes above the matrix's (tests/test_parity.py), exactly `active` fields per sample."""
    B, D, Kp, Kr, H, active = shape
    check_parity("cuda", "flow_step", torch.float32, rotational, Case(B, D, H, Kp, Kr, active))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_declined_with_reason(dtype):
    dev = torch.device("cuda")
    fields = FieldBank(8, 2, 2, 16).to(dev, dtype)
    z = torch.randn(4, 8, device=dev, dtype=dtype)
    g = torch.ones(4, 2, device=dev, dtype=dtype)
    with pytest.raises(BackendUnavailableError, match="not supported"):
        flow_step(z, 0.3, g, g, fields, dt=0.5, outputs=OUTPUTS, backend="cuda")


@pytest.mark.gpu
def test_opcheck():
    from torch.library import opcheck

    get_backend("cuda").unavailable()  # loads the extension and registers fakes/autograd
    dev = torch.device("cuda")
    B, D, K, H = 9, 5, 3, 7
    z = torch.randn(B, D, device=dev, requires_grad=True)
    g = coefficients((B, K), 2).to(dev).requires_grad_()
    W = torch.randn(K, H, D, device=dev, requires_grad=True)
    c, a, de = (torch.randn(K, H, device=dev, requires_grad=True) for _ in range(3))
    M = torch.randn(K, D, H, device=dev, requires_grad=True)
    C = torch.randn(K, H, H, device=dev, requires_grad=True)
    W2 = torch.randn(K, D, H, device=dev, requires_grad=True)
    b2 = torch.randn(K, D, device=dev, requires_grad=True)
    P = torch.randn(K, D, H, device=dev, requires_grad=True)
    opcheck(torch.ops.sta.potential_fwd.default, (z, g, W, c, a, de))
    opcheck(torch.ops.sta.hamiltonian_fwd.default, (z, g, W, c, a, M, C))
    opcheck(torch.ops.sta.mlp_fwd.default, (z, g, W, c, W2, b2, P))


@pytest.mark.gpu
def test_cuda_graph_16_steps_matches_eager():
    dev = torch.device("cuda")
    B, D, K, H = 128, 32, 5, 48
    fields = FieldBank(D, K, K, H).to(dev)
    z0 = torch.randn(B, D, device=dev)
    gs = [(coefficients((B, K), 2).to(dev), coefficients((B, K), 2).to(dev)) for _ in range(16)]
    ts = [torch.tensor(float(t), device=dev) for t in range(16)]  # no host-to-device copy while capturing

    def run(z):
        logq = torch.zeros(B, device=dev)
        for t, (gp, gr) in enumerate(gs):
            out = flow_step(z, ts[t], gp, gr, fields, dt=0.1, backend="cuda")
            z, logq = out.z, logq - 0.1 * out.div
        return z, logq

    with torch.no_grad():
        eager = run(z0)
        static_z = z0.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the capture (allocator, lazy init)
            run(static_z)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run(static_z)
        static_z.copy_(z0)
        graph.replay()
        torch.cuda.synchronize()
    assert_close(captured[0], eager[0], torch.float32, what="z after 16 graph steps")
    assert_close(captured[1], eager[1], torch.float32, what="logq after 16 graph steps")
