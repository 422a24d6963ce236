"""Backends of grid_transport (sta.grid.transport, sta.backends): parity with the torch reference, dispatch, the op contract.

triton runs under the interpreter on CPU-only machines (tests/conftest.py sets TRITON_INTERPRET=1);
cpu needs the C++ extension (built just in time by sta._extension); cuda needs a GPU. A backend
that cannot run here is skipped with its own reasons.
"""
from __future__ import annotations

import pytest
import torch

import sta
from sta.backends import BackendUnavailableError, Request, get_backend, select
from sta.grid import LIMITERS, cfl_number
from tests.tolerances import assert_close

FAST = ("cpu", "triton", "cuda")


def _device_for(backend):
    """cuda: the GPU; triton: the GPU when there is one, else the CPU interpreter; cpu: the CPU."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _request(device=torch.device("cpu"), requires_grad=False):
    return Request("grid_transport", device, torch.float32, requires_grad)


def _require(backend, device):
    reasons = get_backend(backend, "grid_transport").why_not(_request(device))
    if reasons:
        pytest.skip(f"{backend} unavailable: " + "; ".join(reasons))


def _case(shape, periodic, dtype, device, scale=1.0):
    rho = (torch.rand(shape, dtype=torch.float64) ** 2).to(dtype)
    faces = []
    for a in range(len(shape)):
        fshape = shape[:a] + (shape[a] + 1,) + shape[a + 1:]
        u = scale * torch.randn(fshape, dtype=torch.float64)
        if periodic:
            u.narrow(a, shape[a], 1).copy_(u.narrow(a, 0, 1))
        faces.append(u.to(dtype))
    return rho.to(device), tuple(f.to(device) for f in faces)


def _params(backend, slow_under_interpreter=False):
    marks = [pytest.mark.gpu] if backend == "cuda" else []
    if slow_under_interpreter and backend == "triton" and not torch.cuda.is_available():
        marks.append(pytest.mark.slow)  # 100 interpreted launches: 4-5 s
    return pytest.param(backend, marks=marks, id=backend)


# Odd sizes; 37 * 29 = 1073 cells crosses the Triton block of 1024; (1, 5) and (4, 1, 3) are degenerate axes.
SHAPES = [(37, 29), (1, 5), (7, 6, 5), (4, 1, 3)]


@pytest.mark.parametrize("backend", [_params(b) for b in FAST])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("boundary", ["zero_flux", "periodic"])
@pytest.mark.parametrize("limiter", tuple(LIMITERS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity_with_the_reference(backend, dtype, boundary, limiter, shape):
    device = _device_for(backend)
    _require(backend, device)
    rho, faces = _case(shape, boundary == "periodic", dtype, device)
    dx = tuple(0.3 + 0.1 * a for a in range(len(shape)))
    dt = 0.9 / cfl_number(faces, dx, 1.0, boundary=boundary, limiter=limiter)
    kwargs = dict(boundary=boundary, limiter=limiter)
    expected = sta.grid_transport(rho, faces, dx, dt, backend="torch", **kwargs)
    got = sta.grid_transport(rho, faces, dx, dt, backend=backend, **kwargs)
    assert got.dtype == dtype and got.device.type == device.type and got.shape == rho.shape
    assert_close(got, expected, dtype, what=f"{backend} grid_transport")


@pytest.mark.parametrize("backend", [_params(b, slow_under_interpreter=True) for b in FAST])
@pytest.mark.parametrize("boundary", ["zero_flux", "periodic"])
def test_mass_conserved_over_100_steps(backend, boundary):
    device = _device_for(backend)
    _require(backend, device)
    rho, faces = _case((24, 20), boundary == "periodic", torch.float64, device)
    dt = 0.95 / cfl_number(faces, 0.5, 1.0, boundary=boundary)
    mass = rho.sum()
    for _ in range(100):
        rho = sta.grid_transport(rho, faces, 0.5, dt, boundary=boundary, backend=backend)
    assert rho.min() >= 0
    assert abs((rho.sum() - mass) / mass).item() <= 1e-12


@pytest.mark.parametrize("backend", [_params(b) for b in FAST])
def test_non_contiguous_inputs(backend):
    device = _device_for(backend)
    _require(backend, device)
    rho, faces = _case((9, 8), False, torch.float32, device)
    rho_t = rho.T.contiguous().T  # same values, column-major
    faces_t = tuple(u.T.contiguous().T for u in faces)
    assert not rho_t.is_contiguous()
    expected = sta.grid_transport(rho, faces, 0.5, 0.01, backend="torch")
    assert_close(sta.grid_transport(rho_t, faces_t, 0.5, 0.01, backend=backend), expected, torch.float32)


def test_auto_picks_the_compiled_cpu_op_never_the_interpreter():
    chosen = select(_request(), "auto")
    expected = "cpu" if not get_backend("cpu", "grid_transport").why_not(_request()) else "torch"
    assert chosen.name == expected and chosen.op == "grid_transport"


def test_forced_unavailable_backend_lists_its_reasons():
    rho, faces = _case((5, 4), False, torch.float32, torch.device("cpu"), scale=0.1)
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run grid_transport: device cpu: the cuda backend takes CUDA tensors only"):
        sta.grid_transport(rho, faces, 1.0, 0.1, backend="cuda")


def test_sta_backend_environment_variable(monkeypatch):
    monkeypatch.setenv("STA_BACKEND", "torch")
    assert select(_request()).name == "torch"


def test_opcheck_of_the_compiled_op():
    rho, faces = _case((6, 5), False, torch.float64, torch.device("cpu"))
    _require("cpu", rho.device)
    op = torch.ops.sta.grid_transport.default
    torch.library.opcheck(op, (rho, faces[0], faces[1], rho.new_empty(0), 0.01, 0.02, 0.0, False, 2),
                          test_utils=("test_schema", "test_faketensor"))
    rho3, faces3 = _case((4, 3, 5), True, torch.float32, torch.device("cpu"))
    torch.library.opcheck(op, (rho3, *faces3, 0.01, 0.02, 0.03, True, 1), test_utils=("test_schema", "test_faketensor"))


def test_opcheck_of_the_triton_op():
    _require("triton", _device_for("triton"))
    rho, faces = _case((6, 5), False, torch.float32, _device_for("triton"))
    op = torch.ops.sta.triton_grid_transport.default
    torch.library.opcheck(op, (rho, faces[0], faces[1], None, [0.01, 0.02], False, 2),
                          test_utils=("test_schema", "test_faketensor"))
    rho3, faces3 = _case((4, 3, 5), True, torch.float64, _device_for("triton"))
    torch.library.opcheck(op, (rho3, *faces3, [0.01, 0.02, 0.03], True, 1), test_utils=("test_schema", "test_faketensor"))


def test_compiled_op_traces_under_torch_compile():
    _require("cpu", torch.device("cpu"))
    rho, faces = _case((8, 7), False, torch.float32, torch.device("cpu"))

    def step(r, u1, u2):
        return torch.ops.sta.grid_transport(r, u1, u2, r.new_empty(0), 0.01, 0.01, 0.0, False, 2)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    assert_close(compiled(rho, *faces), step(rho, *faces), torch.float32)


def test_auto_takes_the_differentiable_reference_when_a_gradient_is_needed():
    rho, faces = _case((6, 5), False, torch.float64, torch.device("cpu"), scale=0.1)
    faces = (faces[0].requires_grad_(), faces[1])
    out = sta.grid_transport(rho, faces, 1.0, 0.1)  # auto
    (grad,) = torch.autograd.grad(out.square().sum(), faces[0])
    assert grad.abs().sum() > 0
    if not get_backend("cpu", "grid_transport").why_not(_request()):
        with pytest.raises(BackendUnavailableError, match="not differentiable"):
            sta.grid_transport(rho, faces, 1.0, 0.1, backend="cpu")
        assert select(_request(requires_grad=True), "auto").name == "torch"
        assert select(_request(requires_grad=False), "auto").name == "cpu"


def test_latent_grid_is_detached_unless_asked():
    bank = sta.FieldBank(dim=2, num_potential=1, num_rotational=1, hidden=4).double()
    g = sta.latent_grid(bank, [0.0, 0.0], shape=(4, 4), g_pot=1.0, g_rot=1.0)
    assert not any(u.requires_grad for u in g.faces) and not g.div.requires_grad
    g = sta.latent_grid(bank, [0.0, 0.0], shape=(4, 4), g_pot=1.0, g_rot=1.0, differentiable=True)
    rho = torch.ones(4, 4, dtype=torch.float64)
    out = sta.grid_transport(rho, g.faces, g.dx, 0.01)
    grads = torch.autograd.grad(out.square().sum() + g.div.sum(), [bank.potential.a, bank.rotational.a])
    assert all(gr.abs().sum() > 0 for gr in grads)


# ----------------------------------------------------------------------------------------------
# Non-finite policy (grid_transport docstring): the same on every backend, checked before dispatch.
# Issue 15: a NaN face velocity gave NaN cells on torch and zero flux on cpu/triton; the CFL check
# let it through; an Inf in transport_for raised OverflowError; torch turned a NaN on an ignored
# zero-flux boundary face into a NaN cell.
# ----------------------------------------------------------------------------------------------

EVERY = [_params(b) for b in ("torch",) + FAST]
NONFINITE = pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])


@pytest.mark.parametrize("backend", EVERY)
@NONFINITE
@pytest.mark.parametrize("boundary", ["zero_flux", "periodic"])
def test_nonfinite_face_velocity_that_carries_flux_is_refused(backend, value, boundary):
    device = _device_for(backend)
    _require(backend, device)
    rho, faces = _case((6, 5), boundary == "periodic", torch.float32, device, scale=0.1)
    bad = faces[1].clone()
    bad[2, 3] = value  # an interior face
    calls = [lambda: sta.grid_transport(rho, (faces[0], bad), 1.0, 0.1, boundary=boundary, backend=backend),
             lambda: sta.transport_for(rho, (faces[0], bad), 1.0, time=1.0, boundary=boundary, backend=backend),
             lambda: cfl_number((faces[0], bad), 1.0, 0.1, boundary=boundary)]
    for call in calls:
        with pytest.raises(ValueError, match=r"^velocity_faces\[1\]: expected finite .*first at index \(2, 3\)"):
            call()


@pytest.mark.parametrize("backend", EVERY)
@NONFINITE
def test_nonfinite_density_is_refused(backend, value):
    device = _device_for(backend)
    _require(backend, device)
    rho, faces = _case((6, 5), False, torch.float32, device, scale=0.1)
    rho[4, 0] = value
    for call in (sta.grid_transport, sta.transport_for):
        with pytest.raises(ValueError, match=r"^rho: expected finite densities"):
            call(rho, faces, 1.0, 0.1, backend=backend)


@pytest.mark.parametrize("backend", EVERY)
@NONFINITE
def test_zero_flux_boundary_faces_are_ignored_whatever_they_hold(backend, value):
    device = _device_for(backend)
    _require(backend, device)
    rho, faces = _case((6, 5), False, torch.float32, device, scale=0.1)
    dirty = [u.clone() for u in faces]
    dirty[0][0, 1] = value
    dirty[0][6, 4] = value
    dirty[1][3, 5] = value
    clean = [u.clone() for u in faces]
    for a, u in enumerate(clean):
        u.narrow(a, 0, 1).zero_()
        u.narrow(a, u.shape[a] - 1, 1).zero_()
    want = sta.grid_transport(rho, tuple(clean), 1.0, 0.1, backend="torch")
    assert_close(sta.grid_transport(rho, tuple(dirty), 1.0, 0.1, backend=backend), want, torch.float32)
    assert_close(sta.grid_transport(rho, faces, 1.0, 0.1, backend=backend), want, torch.float32)
    want = sta.transport_for(rho, tuple(clean), 1.0, time=2.0, backend="torch")
    assert_close(sta.transport_for(rho, tuple(dirty), 1.0, time=2.0, backend=backend), want, torch.float32)
    assert cfl_number(tuple(dirty), 1.0, 0.1) == cfl_number(tuple(clean), 1.0, 0.1)


def test_cfl_overflow_is_a_clean_error():
    """u / dx beyond float32 gives an Inf CFL number: grid_transport and transport_for refuse it."""
    rho, faces = _case((6, 5), False, torch.float32, torch.device("cpu"))
    huge = (faces[0] * 1e38, faces[1])
    with pytest.raises(ValueError, match="^dt: the CFL number is"):
        sta.grid_transport(rho, huge, 1e-3, 1e-3)
    with pytest.raises(ValueError, match="^time:.*sub-steps"):
        sta.transport_for(rho, huge, 1e-3, time=1.0)
