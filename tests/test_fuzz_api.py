"""Property-based fuzz of the public API (issue 15), on every backend that runs on this machine.

flow_step, SparseFlowLayer, FieldBank, latent_grid, grid_transport, transport_for,
grid_divergence and grid_curl, with two properties:

* invalid input raises ValueError or TypeError (exactly those types: no OverflowError, no
  AttributeError from deep inside), and the message starts with the argument at fault
  (``name:`` or ``name[i]:``);
* valid input gives the torch backend's answer on every other backend -- NaN/Inf included where
  the non-finite policy propagates them (tests.tolerances.assert_same_nonfinite), forward and,
  for flow_step, backward.

Backends: torch, cpu (the C++ extension) and triton (the interpreter on CPU-only machines:
tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported); one that cannot run here
is left out by its own ``why_not``. Bounded and deterministic: derandomize=True, no example
database, a few examples per property -- the Triton interpreter (~0.5 s per flow step with its
backward) is most of the time.
"""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sta
from sta import backends
from sta.grid import cfl_number
from tests.tolerances import assert_same_nonfinite

#: hypothesis runs each property over many drawn inputs (20-30 s for the file): the thorough run
pytestmark = pytest.mark.slow

NAN, INF = float("nan"), float("inf")
#: latent_grid's velocity is z_next - z: float32 rounding of z (|z| up to ~6) against |v| ~ 0.5
LATENT_GRID_TOL = (1e-4, 1e-6)


def fuzz(examples: int):
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None, print_blob=False,
                    suppress_health_check=list(HealthCheck))


def flow_backends(dtype) -> list:
    request = backends.Request("flow_step", torch.device("cpu"), dtype, requires_grad=True)
    return [b.name for b in backends.all_backends() if not b.why_not(request)]


def grid_backends() -> list:
    request = backends.Request("grid_transport", torch.device("cpu"), torch.float32)
    return [b.name for b in backends.all_backends("grid_transport") if not b.why_not(request)]


def assert_names(call, argument: str) -> None:
    """``call()`` raises exactly ValueError or TypeError whose message starts with ``argument``."""
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    message = str(info.value)
    assert type(info.value) in (ValueError, TypeError), repr(info.value)
    assert re.match(rf"{re.escape(argument)}(\[\d\])?:", message), f"does not name {argument!r}: {message}"


def pick(draw, options: dict):
    """Draw an argument name and one of its bad values: ``(name, value)``."""
    name = draw(st.sampled_from(sorted(options)))
    return name, draw(st.sampled_from(options[name]))


def bad_reals(dtype=torch.float32) -> list:
    """Python numbers that t, dt, time, ... refuse (1e300 only where the dtype is float32)."""
    return [None, "0.5", True, NAN, INF, -INF, 10**400, [0.1], 1j] + ([1e300] if dtype == torch.float32 else [])


# ----------------------------------------------------------------------------------------------
# flow_step and SparseFlowLayer
# ----------------------------------------------------------------------------------------------

@st.composite
def flow_inputs(draw, dtype=None):
    """kwargs of a valid flow_step call: tiny sizes, any sparsity, float32 or float64."""
    dtype = dtype or draw(st.sampled_from([torch.float32, torch.float64]))
    B, D, H = draw(st.integers(0, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    Kp, Kr = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    rotational = draw(st.sampled_from(["hamiltonian", "mlp"]))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    bank = sta.FieldBank(D, Kp, Kr, H, rotational=rotational).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    density = draw(st.sampled_from([0.0, 0.5, 1.0]))

    def coefficients(K):
        values = torch.randn(B, K, generator=gen, dtype=dtype)
        return torch.where(torch.rand(B, K, generator=gen) < density, values, torch.zeros((), dtype=dtype))

    t = draw(st.floats(-3, 3))
    if draw(st.booleans()):
        t = torch.tensor(t, dtype=dtype)
    outputs = tuple(sorted(draw(st.sets(st.sampled_from(sta.OUTPUT_NAMES), min_size=1))))
    return dict(z=torch.randn(B, D, generator=gen, dtype=dtype), t=t, g_pot=coefficients(Kp),
                g_rot=coefficients(Kr), fields=bank, dt=draw(st.floats(-2, 2)), outputs=outputs)


def inject_nonfinite(draw, kw) -> str:
    """Put a NaN/Inf where the policy propagates it (or into a field no sample uses); returns where."""
    where = draw(st.sampled_from(["none", "none", "z", "g_pot", "t", "parameter", "unused field"]))
    value = draw(st.sampled_from([NAN, INF, -INF]))
    z, g = kw["z"], kw["g_pot"]
    if where == "z" and z.numel():
        z[draw(st.integers(0, z.shape[0] - 1)), draw(st.integers(0, z.shape[1] - 1))] = value
    elif where == "g_pot" and g.numel():
        g[draw(st.integers(0, g.shape[0] - 1)), draw(st.integers(0, g.shape[1] - 1))] = value
    elif where == "t":
        kw["t"] = torch.tensor(value, dtype=z.dtype)
    elif where in ("parameter", "unused field") and g.shape[1]:
        k = draw(st.integers(0, g.shape[1] - 1))
        if where == "unused field":
            g[:, k] = 0
        with torch.no_grad():
            for p in kw["fields"].potential.parameters():
                p[k] = value
    else:
        return "none"
    return where


def _loss(out) -> torch.Tensor:
    """A weighted sum of every output, the same weights on every backend."""
    total = 0
    for i, o in enumerate(x for x in out if x is not None):
        weight = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape)
        total = total + (i + 1) * (o * weight).sum()
    return total


def _run_flow(kw, backend):
    """Forward outputs and the gradients w.r.t. z, g_pot, g_rot, t and every parameter."""
    leaves = {name: kw[name].detach().clone().requires_grad_() for name in ("z", "g_pot", "g_rot")}
    t = kw["t"].detach().clone().requires_grad_() if isinstance(kw["t"], torch.Tensor) else kw["t"]
    out = sta.flow_step(leaves["z"], t, leaves["g_pot"], leaves["g_rot"], kw["fields"], dt=kw["dt"],
                        outputs=kw["outputs"], backend=backend)
    inputs = list(leaves.values()) + ([t] if isinstance(t, torch.Tensor) else []) + list(kw["fields"].parameters())
    loss = _loss(out)
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        return out, None
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return out, [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
@fuzz(10)
@given(data=st.data())
def test_flow_step_agrees_with_torch_on_every_backend(data):
    kw = data.draw(flow_inputs())
    where = inject_nonfinite(data.draw, kw)
    dtype = kw["z"].dtype
    want, want_grads = _run_flow(kw, "torch")
    for backend in flow_backends(dtype):
        if backend == "torch":
            continue
        got, got_grads = _run_flow(kw, backend)
        for name in kw["outputs"]:
            assert_same_nonfinite(getattr(got, name), getattr(want, name), dtype, what=f"{backend} {name} ({where})")
        if want_grads is not None and where in ("none", "unused field"):  # 0 * NaN patterns are torch's business
            for i, (a, e) in enumerate(zip(got_grads, want_grads)):
                assert_same_nonfinite(a, e, dtype, what=f"{backend} gradient {i} ({where})")
    if where == "unused field" and want_grads is not None:  # inactive: exactly zero, and nothing non-finite
        assert all(bool(torch.isfinite(g).all()) for g in want_grads)


@pytest.mark.slow
@fuzz(40)
@given(data=st.data())
def test_flow_step_invalid_input_names_the_argument(data):
    kw = data.draw(flow_inputs(torch.float32))
    z, bank = kw["z"], kw["fields"]
    B, D = z.shape
    Kp = bank.num_potential
    bad = {
        "z": [None, z.tolist(), z.long(), z[..., None], torch.zeros(B, D + 1), z.to(torch.complex64), z.bool(), "z"],
        "t": bad_reals() + [torch.zeros(2), torch.tensor(1), torch.zeros((), dtype=torch.complex64)],
        "g_pot": [torch.ones(B + 1, Kp), torch.ones(B, Kp + 1), torch.ones(B, Kp, dtype=torch.float64),
                  torch.ones(B, Kp).tolist(), "g", torch.ones(B, Kp, 1)],
        "g_rot": [torch.ones(B, bank.num_rotational + 1), torch.ones(B, bank.num_rotational, dtype=torch.int32)],
        "dt": bad_reals(),
        "outputs": [None, 3, ["jacobian"], [["z"]], 3.5, "nope", [None]],
        "fields": [None, "bank", torch.nn.Linear(2, 2), "float64 bank"],
        "backend": ["fortran", ["torch"], 3],
    }
    name, value = pick(data.draw, bad)
    if value == "float64 bank":  # parameters of another dtype than z (.double() would change kw's bank)
        value = sta.FieldBank(D, Kp, bank.num_rotational, bank.hidden).double()
    for backend in flow_backends(torch.float32) if name != "backend" else [value]:
        call = dict(kw, backend=backend)
        call[name] = value
        assert_names(lambda: sta.flow_step(**call), name)


@fuzz(4)
@given(data=st.data())
def test_sparse_flow_layer_agrees_with_torch_on_every_backend(data):
    kw = data.draw(flow_inputs(torch.float32))
    bank = kw["fields"]
    layer = sta.nn.SparseFlowLayer(bank.dim, bank.num_potential, bank.num_rotational, bank.hidden,
                                   rotational=bank.construction, dt=kw["dt"])
    layer.fields = bank
    logq = torch.randn(kw["z"].shape[0]) if data.draw(st.booleans()) else None
    layer.backend = "torch"
    want = layer(kw["z"], kw["t"], kw["g_pot"], kw["g_rot"], logq)
    for backend in flow_backends(torch.float32):
        layer.backend = backend
        got = layer(kw["z"], kw["t"], kw["g_pot"], kw["g_rot"], logq)
        for a, e in zip(got, want):
            assert_same_nonfinite(a, e, torch.float32, what=backend)


@fuzz(25)
@given(data=st.data())
def test_sparse_flow_layer_invalid_input_names_the_argument(data):
    kw = data.draw(flow_inputs(torch.float32))
    bank, z = kw["fields"], kw["z"]
    B = z.shape[0]
    args = dict(dim=bank.dim, num_potential=bank.num_potential, num_rotational=bank.num_rotational, hidden=bank.hidden)
    construction = {"dt": bad_reals()[:-1], "backend": ["fortran", ["cpu"], 3], "hidden": [0, "4", None],
                    "num_potential": [-1, 1.5, True]}  # no 1e300: the layer's dtype is not known yet
    forward = {"logq": [[0.0] * B, torch.zeros(B, dtype=torch.int64), torch.zeros(B + 1), torch.zeros(B, 1), "0"],
               "z": [None, z.tolist(), torch.zeros(B, bank.dim + 1)], "t": bad_reals()}
    name, value = pick(data.draw, {**construction, **forward})
    if name in construction:
        assert_names(lambda: sta.nn.SparseFlowLayer(**dict(args, **{name: value})), name)
        return
    layer = sta.nn.SparseFlowLayer(**args)
    layer.fields = bank
    call = dict(z=z, t=kw["t"], g_pot=kw["g_pot"], g_rot=kw["g_rot"], logq=torch.zeros(B))
    call[name] = value
    for backend in flow_backends(torch.float32):
        layer.backend = backend
        assert_names(lambda: layer(**call), name)


# ----------------------------------------------------------------------------------------------
# FieldBank
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@fuzz(40)
@given(data=st.data())
def test_field_bank_invalid_arguments_name_the_argument(data):
    bad = {
        "dim": [0, -1, 1.5, "3", True, None],
        "num_potential": [-1, -2, 1.5, "1", True, None],
        "num_rotational": [-1, -2, 1.5, "1", True, None],
        "hidden": [0, -3, 2.0, None],
        "rotational": ["curl", ["mlp"], None, 3],
        "rank": [0, -1, True, "2", 1.5],
        "weight_scale": [0, -1.0, NAN, INF, "1", True, None],
    }
    name, value = pick(data.draw, bad)
    args = dict(dim=data.draw(st.integers(1, 4)), num_potential=data.draw(st.integers(0, 2)),
                num_rotational=data.draw(st.integers(0, 2)), hidden=data.draw(st.integers(1, 3)))
    args[name] = value
    assert_names(lambda: sta.FieldBank(**args), name)
    # a rank with the mlp construction is refused whatever it is
    assert_names(lambda: sta.FieldBank(2, 1, 1, 2, rotational="mlp", rank=data.draw(st.integers(1, 3))), "rank")


# ----------------------------------------------------------------------------------------------
# latent_grid
# ----------------------------------------------------------------------------------------------

@st.composite
def latent_grid_inputs(draw):
    D = draw(st.integers(2, 4))
    d = draw(st.sampled_from([2, 3] if D >= 3 else [2]))
    dims = tuple(draw(st.permutations(range(D)))[:d])
    Kp, Kr = draw(st.integers(0, 3)), draw(st.integers(0, 2))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    bank = sta.FieldBank(D, Kp, Kr, draw(st.integers(1, 3)), rotational=draw(st.sampled_from(["hamiltonian", "mlp"])))

    def coefficients(K):  # None, one float, a list (as in the README) or a tensor
        kind = draw(st.sampled_from(["none", "float", "list", "tensor"]))
        values = [draw(st.sampled_from([0, 1, -0.5, 2.0])) for _ in range(K)]
        return {"none": None, "float": draw(st.floats(-2, 2)), "list": values, "tensor": torch.tensor(values)}[kind]

    center = [draw(st.floats(-2, 2)) for _ in range(D)]
    extent = draw(st.one_of(st.floats(0.1, 3), st.lists(st.tuples(st.floats(-3, 0), st.floats(0.1, 3)),
                                                        min_size=d, max_size=d)))
    return dict(fields=bank, center=center if draw(st.booleans()) else torch.tensor(center), dims=dims,
                extent=extent, shape=tuple(draw(st.integers(1, 4)) for _ in range(d)),
                g_pot=coefficients(Kp), g_rot=coefficients(Kr), t=draw(st.floats(-3, 3)))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@fuzz(5)
@given(kw=latent_grid_inputs())
def test_latent_grid_agrees_with_torch_on_every_backend(kw):
    want = sta.latent_grid(**kw, backend="torch")
    for backend in flow_backends(torch.float32):
        got = sta.latent_grid(**kw, backend=backend)
        for a, e in zip(got.faces + (got.velocity, got.div), want.faces + (want.velocity, want.div)):
            assert_same_nonfinite(a, e, tol=LATENT_GRID_TOL, what=backend)


@fuzz(40)
@given(kw=latent_grid_inputs(), data=st.data())
def test_latent_grid_invalid_input_names_the_argument(kw, data):
    bank = kw["fields"]
    D, d = bank.dim, len(kw["dims"])
    bad = {
        "fields": [None, "bank", torch.nn.Linear(2, 2)],
        "center": [None, "origin", [0.0] * (D + 1), [NAN] * D, [INF] + [0.0] * (D - 1), torch.zeros(D, dtype=torch.complex64),
                   [None] * D, torch.zeros(D, 1)],
        "dims": [None, (0,), (0, 0), (0, D), (0, 1.0), "01", (0, 1, 2, 3)],
        "extent": [0.0, -1.0, NAN, INF, 10**400, 1e300, "3", [(1.0, 0.0)] * d, [(0.0, 1.0)] * (d + 1), None],
        "shape": [None, (4,) * (d + 1), (0,) * d, (2.5,) * d, "44"],
        "g_pot": [[1.0] * (bank.num_potential + 1), "1", [None] * bank.num_potential + [None], torch.ones(2, 2, 2)],
        "g_rot": [[1.0] * (bank.num_rotational + 1), torch.ones(bank.num_rotational, dtype=torch.complex64)
                  if bank.num_rotational else "x"],
        "t": bad_reals(),
        "backend": ["fortran", ["torch"]],
    }
    name, value = pick(data.draw, bad)
    assert_names(lambda: sta.latent_grid(**dict(kw, **{name: value})), name)


# ----------------------------------------------------------------------------------------------
# grid_transport, transport_for, cfl_number
# ----------------------------------------------------------------------------------------------

@st.composite
def transport_inputs(draw):
    d = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.integers(1, 5)) for _ in range(d))
    boundary = draw(st.sampled_from(["zero_flux", "periodic"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    rho = (torch.rand(shape, generator=gen, dtype=torch.float64) * draw(st.sampled_from([1.0, 1e3]))).to(dtype)
    faces = []
    for a in range(d):
        u = 0.3 * torch.randn(shape[:a] + (shape[a] + 1,) + shape[a + 1:], generator=gen, dtype=torch.float64)
        if boundary == "periodic":
            u.narrow(a, shape[a], 1).copy_(u.narrow(a, 0, 1))
        elif draw(st.booleans()):  # ignored boundary faces may hold anything
            u.narrow(a, 0, 1).fill_(draw(st.sampled_from([NAN, INF, -INF, 1e30])))
        faces.append(u.to(dtype))
    # |u| ~ 0.3 and dx >= 0.5 keep transport_for to a few sub-steps (the Triton interpreter: ~0.1 s each)
    dx = draw(st.one_of(st.floats(0.5, 2), st.tuples(*[st.floats(0.5, 2)] * d)))
    limiter = draw(st.sampled_from(["upwind", "minmod", "van_leer"]))
    nu = cfl_number(tuple(faces), dx, 1.0, boundary=boundary, limiter=limiter)
    dt = draw(st.floats(0, 1)) / nu if nu > 0 else draw(st.floats(0, 10))
    return dict(rho=rho, velocity_faces=tuple(faces), dx=dx, dt=dt, boundary=boundary, limiter=limiter)


@fuzz(15)
@given(kw=transport_inputs(), data=st.data())
def test_grid_transport_and_transport_for_agree_with_torch_on_every_backend(kw, data):
    dtype = kw["rho"].dtype
    want = sta.grid_transport(**kw, backend="torch")
    assert torch.isfinite(want).all()
    options = dict(time=data.draw(st.floats(0, 1)), time_order=data.draw(st.sampled_from([1, 2])),
                   cfl=data.draw(st.floats(0.5, 1)))
    plain = {k: v for k, v in kw.items() if k != "dt"}
    want_for = sta.transport_for(**plain, **options, backend="torch")
    for backend in grid_backends():
        assert_same_nonfinite(sta.grid_transport(**kw, backend=backend), want, dtype, what=backend)
        assert_same_nonfinite(sta.transport_for(**plain, **options, backend=backend), want_for, dtype, what=backend)


def _bad_transport(kw) -> dict:
    rho, faces = kw["rho"], kw["velocity_faces"]
    d = rho.dim()
    nan_rho = rho.clone()
    nan_rho.view(-1)[0] = NAN
    interior = list(faces)
    if kw["boundary"] == "periodic" or rho.shape[0] > 1:  # a face that carries flux
        interior[0] = faces[0].clone()
        interior[0][1 if kw["boundary"] == "zero_flux" else 0] = INF
    else:
        interior[0] = faces[0].to(torch.complex128)
    return {
        "rho": [None, rho.tolist(), rho.long(), rho.flatten(), rho[None, None] if d == 2 else rho[0, 0], nan_rho,
                rho.new_zeros((0,) * d)],
        "velocity_faces": [None, faces[0], faces[:1], faces + faces[:1], tuple(interior),
                           (faces[0].transpose(0, 1),) + faces[1:], tuple(u.to(torch.complex128) for u in faces),
                           tuple(u.bool() for u in faces), (faces[0].half(),) + faces[1:]],
        "dx": [0.0, -1.0, NAN, INF, "1", [1.0] * (d + 1), 10**400, None],
        "boundary": ["reflect", ["periodic"], None],
        "limiter": ["superbee", ["minmod"], None, 1],
        "backend": ["fortran", ["cpu"]],
    }


@fuzz(40)
@given(kw=transport_inputs(), data=st.data())
def test_grid_transport_invalid_input_names_the_argument(kw, data):
    bad = _bad_transport(kw)
    bad["dt"] = [-1.0, NAN, INF, "0.1", 10**400, None, True]
    name, value = pick(data.draw, bad)
    call = dict(kw, **{name: value})
    for backend in grid_backends() if name != "backend" else [value]:
        assert_names(lambda: sta.grid_transport(**dict(call, backend=backend)), name)


@fuzz(30)
@given(kw=transport_inputs(), data=st.data())
def test_transport_for_invalid_input_names_the_argument(kw, data):
    kw = {k: v for k, v in kw.items() if k != "dt"}
    bad = _bad_transport(kw)
    bad.update(time=[-1, NAN, INF, "1.0", 10**400, None], cfl=[0, 1.5, NAN, "0.5", None],
               time_order=[3, 0, "2", None])
    name, value = pick(data.draw, bad)
    call = dict(kw, **{name: value})
    for backend in grid_backends() if name != "backend" else [value]:
        assert_names(lambda: sta.transport_for(**dict(call, backend=backend)), name)


# ----------------------------------------------------------------------------------------------
# grid_divergence and grid_curl (plain torch: exact on linear fields, errors name the argument)
# ----------------------------------------------------------------------------------------------

@st.composite
def linear_field(draw):
    """A linear velocity v(x) = A x + b on a grid: centre form, face form, the matrix A, dx."""
    d = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.integers(3, 6)) for _ in range(d))
    dx = tuple(draw(st.floats(0.1, 2)) for _ in range(d))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    A = torch.tensor([[draw(st.floats(-2, 2)) for _ in range(d)] for _ in range(d)], dtype=torch.float64)
    b = torch.tensor([draw(st.floats(-1, 1)) for _ in range(d)], dtype=torch.float64)

    def velocity(axes):
        x = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
        return x @ A.T + b

    centres = [(torch.arange(n, dtype=torch.float64) + 0.5) * h for n, h in zip(shape, dx)]
    edges = [torch.arange(n + 1, dtype=torch.float64) * h for n, h in zip(shape, dx)]
    faces = tuple(velocity(centres[:a] + [edges[a]] + centres[a + 1:])[..., a].to(dtype) for a in range(d))
    return velocity(centres).to(dtype), faces, A, dx


@fuzz(30)
@given(field=linear_field())
def test_grid_divergence_and_curl_are_exact_on_linear_fields(field):
    centre, faces, A, dx = field
    d, dtype = centre.shape[-1], centre.dtype
    tol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-10, 1e-12)
    trace = torch.full(centre.shape[:-1], float(A.trace()), dtype=torch.float64)
    assert_same_nonfinite(sta.grid_divergence(centre, dx), trace, tol=tol, what="centre form")
    assert_same_nonfinite(sta.grid_divergence(faces, dx), trace, tol=tol, what="face form")
    curl = sta.grid_curl(centre, dx)
    if d == 2:
        want = torch.full(centre.shape[:-1], float(A[1, 0] - A[0, 1]), dtype=torch.float64)
    else:
        vec = torch.stack([A[2, 1] - A[1, 2], A[0, 2] - A[2, 0], A[1, 0] - A[0, 1]])
        want = vec.expand(*centre.shape[:-1], 3)
    assert_same_nonfinite(curl, want, tol=(tol[0], tol[1] + tol[0] * float(A.abs().max())), what="curl")


@fuzz(40)
@given(field=linear_field(), data=st.data())
def test_grid_divergence_and_curl_invalid_input_names_the_argument(field, data):
    centre, faces, _, dx = field
    d = centre.shape[-1]
    bad = {
        "velocity": [None, centre.tolist(), centre.long(), centre.to(torch.complex64), centre.bool(),
                     centre[..., :1], centre[:2], "v",
                     (torch.zeros(0, 3), torch.zeros(0, 4)), faces[:1], faces + faces[:1],
                     tuple(u.to(torch.complex64) for u in faces), tuple(u.bool() for u in faces),
                     (faces[0],) + tuple(u[:-1] for u in faces[1:]), (faces[0], None) + faces[2:]],
        "dx": [0.0, -1.0, NAN, "1", [1.0] * (d + 1), 10**400, None],
    }
    name, value = pick(data.draw, bad)
    args = dict(velocity=centre, dx=dx)
    args[name] = value
    assert_names(lambda: sta.grid_divergence(**args), name)
    if name == "dx" or isinstance(value, torch.Tensor) or value is None:  # grid_curl has the centre form only
        assert_names(lambda: sta.grid_curl(**args), name)
