"""The ``cuda`` backend (sta/backends/cuda.py, csrc/cuda): parity with the reference, opcheck, CUDA graphs.

The ``gpu`` tests need a CUDA GPU and an extension built with CUDA; elsewhere only the
availability reporting is checked (the kernels are compile-checked by tests/test_cuda_compile.py).
"""
import pytest
import torch

from sta import FieldBank
from sta.backends import BackendUnavailableError, get_backend
from sta.ops import flow_step
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


def _sparse(B, K, active, device, dtype):
    """(B, K) coefficients with exactly `active` non-zeros per row."""
    idx = torch.rand(B, K, device=device).argsort(1)[:, :active]
    g = torch.zeros(B, K, device=device, dtype=dtype)
    return g.scatter(1, idx, torch.rand(B, active, device=device, dtype=dtype) + 0.5)


def _step(z, g_pot, g_rot, fields, backend, outputs=OUTPUTS):
    return flow_step(z, 0.3, g_pot, g_rot, fields, dt=0.5, outputs=outputs, backend=backend)


def _loss(out):
    return sum((t * torch.linspace(0.5, 1.5, t.numel(), device=t.device, dtype=t.dtype).view(t.shape)).sum()
               for t in out if t is not None and t.numel())


@pytest.mark.gpu
@pytest.mark.parametrize("rotational", ["hamiltonian", "mlp"])
@pytest.mark.parametrize("shape", [(37, 13, 3, 3, 24, 2), (128, 226, 5, 5, 226, 2), (5, 7, 2, 0, 9, 1)])
def test_parity_fp32_forward_backward(rotational, shape):
    B, D, Kp, Kr, H, active = shape
    dev = torch.device("cuda")
    fields = FieldBank(D, Kp, Kr, H, rotational=rotational).to(dev)
    z = torch.randn(B, D, device=dev, requires_grad=True)
    g_pot = _sparse(B, Kp, min(active, Kp), dev, torch.float32).requires_grad_()
    g_rot = _sparse(B, Kr, min(active, Kr), dev, torch.float32).requires_grad_() if Kr else None
    inputs = [z, g_pot] + ([g_rot] if Kr else []) + list(fields.parameters())
    results = {}
    for backend in ("torch", "cuda"):
        out = _step(z, g_pot, g_rot, fields, backend)
        grads = torch.autograd.grad(_loss(out), inputs, allow_unused=True)
        results[backend] = (out, grads)
    (ref, ref_g), (got, got_g) = results["torch"], results["cuda"]
    for name, r, c in zip(OUTPUTS, ref, got):
        assert_close(c, r, torch.float32, what=f"forward {name}")
    for i, (r, c) in enumerate(zip(ref_g, got_g)):
        if r is None:
            assert c is None or not c.abs().any(), f"gradient {i}"
        else:
            assert_close(c, r, torch.float32, what=f"gradient of input {i}")


@pytest.mark.gpu
def test_all_off_and_zero_batch():
    dev = torch.device("cuda")
    fields = FieldBank(8, 3, 3, 16).to(dev)
    z = torch.randn(6, 8, device=dev)
    out = _step(z, torch.zeros(6, 3, device=dev), torch.zeros(6, 3, device=dev), fields, "cuda")
    assert torch.equal(out.z, z) and not out.div.any() and not out.hj.any()
    out = _step(z[:0], torch.zeros(0, 3, device=dev), torch.zeros(0, 3, device=dev), fields, "cuda")
    assert out.z.shape == (0, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_declined_with_reason(dtype):
    dev = torch.device("cuda")
    fields = FieldBank(8, 2, 2, 16).to(dev, dtype)
    z = torch.randn(4, 8, device=dev, dtype=dtype)
    with pytest.raises(BackendUnavailableError, match="not supported"):
        _step(z, torch.ones(4, 2, device=dev, dtype=dtype), torch.ones(4, 2, device=dev, dtype=dtype), fields, "cuda")


@pytest.mark.gpu
def test_opcheck():
    from torch.library import opcheck

    get_backend("cuda").unavailable()  # loads the extension and registers fakes/autograd
    dev = torch.device("cuda")
    B, D, K, H = 9, 5, 3, 7
    z = torch.randn(B, D, device=dev, requires_grad=True)
    g = _sparse(B, K, 2, dev, torch.float32).requires_grad_()
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
    gs = [(_sparse(B, K, 2, dev, torch.float32), _sparse(B, K, 2, dev, torch.float32)) for _ in range(16)]
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
