"""Latent grid transport (sta.grid, docs/maths.md section 3) with the torch reference backend.

Conservation, positivity, the CFL check, a divergence-free field keeping a constant density,
convergence of the grid divergence / curl to the analytic ones, and agreement of the Eulerian
(grid) and Lagrangian (particles + flow_step's log-density) pictures as the grid is refined.
Backend parity is in tests/test_grid_backends.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sta
from sta.grid import FACE_BOUND, LIMITERS, cfl_number, latent_grid

BOUNDARIES = ("zero_flux", "periodic")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def random_faces(shape, periodic, dtype=torch.float64, scale=1.0):
    """Random face velocities in the layout of sta.grid (face N_a equal to face 0 when periodic)."""
    faces = []
    for a in range(len(shape)):
        fshape = shape[:a] + (shape[a] + 1,) + shape[a + 1:]
        u = scale * torch.randn(fshape, dtype=dtype)
        if periodic:
            u.narrow(a, shape[a], 1).copy_(u.narrow(a, 0, 1))
        faces.append(u)
    return tuple(faces)


def stream_function_faces(n1, n2, L=1.0, dtype=torch.float64):
    """Periodic face velocities u1 = d psi/dy, u2 = -d psi/dx differenced from a stream function on the
    cell corners: the compact discrete divergence is zero up to rounding."""
    h1, h2 = L / n1, L / n2
    x = torch.arange(n1 + 1, dtype=dtype) * h1
    y = torch.arange(n2 + 1, dtype=dtype) * h2
    X, Y = torch.meshgrid(x, y, indexing="ij")
    psi = torch.sin(2 * math.pi * X / L) * torch.cos(2 * math.pi * Y / L) + 0.3 * torch.sin(4 * math.pi * (X + Y) / L)
    # psi on the corners (n1 + 1, n2 + 1), periodic by construction (corner n equals corner 0 exactly)
    psi[-1, :] = psi[0, :]
    psi[:, -1] = psi[:, 0]
    u1 = (psi[:, 1:] - psi[:, :-1]) / h2   # (n1 + 1, n2): faces normal to axis 1
    u2 = -(psi[1:, :] - psi[:-1, :]) / h1  # (n1, n2 + 1): faces normal to axis 2
    return (u1, u2), (h1, h2)


def fit_order(hs, errors):
    """Slope of log(error) against log(h)."""
    return float(np.polyfit(np.log(hs), np.log(errors), 1)[0])


def frozen(bank):
    return bank.double().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# the finite-volume step
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("limiter", tuple(LIMITERS))
@pytest.mark.parametrize("shape", [(24, 17), (9, 8, 7)], ids=["2d", "3d"])
def test_mass_conserved_and_positive_over_100_steps(shape, limiter, boundary):
    periodic = boundary == "periodic"
    rho = torch.rand(shape, dtype=torch.float64) ** 4  # rough, with near-zero cells
    rho[tuple(slice(0, 3) for _ in shape)] = 0.0        # exact zeros too
    faces = random_faces(shape, periodic)
    dx = tuple(0.5 + 0.25 * a for a in range(len(shape)))
    dt = 0.95 / cfl_number(faces, dx, 1.0, boundary=boundary, limiter=limiter)
    mass = rho.sum()
    for _ in range(100):
        rho = sta.grid_transport(rho, faces, dx, dt, boundary=boundary, limiter=limiter, backend="torch")
        assert rho.min() >= 0, f"negative density {rho.min().item():.3e}"
    rel = abs((rho.sum() - mass) / mass).item()
    assert rel <= 1e-12, f"mass changed by {rel:.3e} (relative) over 100 steps"


@pytest.mark.parametrize("limiter", tuple(LIMITERS))
def test_positive_at_cfl_exactly_one(limiter):
    """The documented condition is sufficient: at CFL == 1 a cell can empty, never go below 0."""
    shape = (20, 20)
    rho = torch.rand(shape, dtype=torch.float64) ** 3
    faces = random_faces(shape, False)
    dt = 1.0 / cfl_number(faces, 0.1, 1.0, limiter=limiter)
    for _ in range(20):
        rho = sta.grid_transport(rho, faces, 0.1, dt, limiter=limiter, backend="torch")
        assert rho.min() >= -4 * torch.finfo(rho.dtype).eps * rho.max()


def test_cfl_number_matches_its_definition():
    """kappa * dt * max over cells of the summed outgoing Courant numbers (zero-flux: boundary faces excluded)."""
    u1 = torch.zeros(4, 3, dtype=torch.float64)
    u2 = torch.zeros(3, 4, dtype=torch.float64)
    u1[1, 1] = -2.0  # leaves cell (1, 1) through its low face along axis 1, and enters cell (0, 1)
    u2[1, 2] = 3.0   # leaves cell (1, 1) through its high face along axis 2
    u1[3, 0] = 50.0  # a boundary face: carries no flux with zero-flux boundaries
    dx = (0.5, 1.0)
    got = cfl_number((u1, u2), dx, 0.1, limiter="minmod")
    assert got == pytest.approx(FACE_BOUND["minmod"] * 0.1 * (2.0 / 0.5 + 3.0 / 1.0))


def test_constant_density_stays_constant_in_divergence_free_field():
    (u1, u2), dx = stream_function_faces(32, 24)
    div = sta.grid_divergence((u1, u2), dx)
    assert div.abs().max() <= 1e-10 * max(u1.abs().max(), u2.abs().max()) / min(dx)
    rho = torch.full((32, 24), 2.5, dtype=torch.float64)
    rho = sta.transport_for(rho, (u1, u2), dx, time=0.5, boundary="periodic", backend="torch")
    assert (rho - 2.5).abs().max() <= 1e-12


def test_divergence_free_field_moves_a_bump_without_changing_mass_or_max_beyond_start():
    (u1, u2), dx = stream_function_faces(40, 40)
    x = (torch.arange(40, dtype=torch.float64) + 0.5) / 40
    X, Y = torch.meshgrid(x, x, indexing="ij")
    rho = torch.exp(-((X - 0.4) ** 2 + (Y - 0.5) ** 2) / 0.01)
    out = sta.transport_for(rho, (u1, u2), dx, time=0.05, boundary="periodic", backend="torch")
    assert (out - rho).abs().max() > 1e-2           # it moved
    assert out.max() <= rho.max() * (1 + 1e-12)     # the limiter creates no new maximum
    assert out.min() >= 0
    assert abs(out.sum() - rho.sum()) <= 1e-12 * rho.sum()


def test_convergence_orders_on_smooth_advection():
    """Periodic advection of a smooth profile by a constant velocity at a fixed CFL (dt ~ h):
    upwind is first order; van Leer with forward Euler (time_order=1) is first order too (the time
    step limits it) but far more accurate; van Leer with the SSP Heun steps is second order."""
    runs = {("upwind", 1): [], ("van_leer", 1): [], ("van_leer", 2): []}
    hs = []
    for n in (32, 64, 128):
        x = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        X, Y = torch.meshgrid(x, x, indexing="ij")
        rho0 = 1 + torch.sin(2 * math.pi * X) * torch.cos(2 * math.pi * Y)
        u1 = torch.full((n + 1, n), 1.0, dtype=torch.float64)
        u2 = torch.full((n, n + 1), 0.5, dtype=torch.float64)
        exact = 1 + torch.sin(2 * math.pi * (X - 0.25)) * torch.cos(2 * math.pi * (Y - 0.125))
        hs.append(1 / n)
        for (limiter, order), errors in runs.items():
            rho = sta.transport_for(rho0, (u1, u2), 1 / n, time=0.25, boundary="periodic", limiter=limiter,
                                    cfl=0.5, time_order=order, backend="torch")
            errors.append((rho - exact).abs().mean().item())
    orders = {key: fit_order(hs, errors) for key, errors in runs.items()}
    assert 0.8 <= orders[("upwind", 1)] <= 1.2, runs
    assert orders[("van_leer", 1)] >= 0.9 and runs[("van_leer", 1)][-1] < 0.35 * runs[("upwind", 1)][-1], runs
    assert orders[("van_leer", 2)] >= 1.7, runs


def test_transport_for_substeps_under_the_cfl_limit():
    shape = (12, 10)
    faces = random_faces(shape, False)
    rho = torch.rand(shape, dtype=torch.float64)
    dx, time = 0.2, 3.0
    nu = cfl_number(faces, dx, time)
    steps = math.ceil(nu / 0.9)
    manual = rho
    for _ in range(steps):
        manual = sta.grid_transport(manual, faces, dx, time / steps, backend="torch")
    got = sta.transport_for(rho, faces, dx, time=time, time_order=1, backend="torch")
    torch.testing.assert_close(got, manual, rtol=0, atol=0)
    assert cfl_number(faces, dx, time / steps) <= 0.9
    assert cfl_number(faces, dx, time / (steps - 1)) > 0.9
    torch.testing.assert_close(sta.transport_for(rho, faces, dx, time=0.0, backend="torch"), rho)
    heun = sta.transport_for(rho, faces, dx, time=time, backend="torch")  # time_order=2
    assert heun.min() >= 0 and abs(heun.sum() - rho.sum()) <= 1e-12 * rho.sum()
    with pytest.raises(ValueError, match="time_order"):
        sta.transport_for(rho, faces, dx, time=time, time_order=3)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

def _good():
    rho = torch.rand(6, 5, dtype=torch.float64)
    return rho, random_faces((6, 5), False, scale=0.1)


@pytest.mark.parametrize("mutate, exc, needle", [
    (lambda r, f: dict(dx=0.0), ValueError, "dx"),
    (lambda r, f: dict(dx=-1.0), ValueError, "dx"),
    (lambda r, f: dict(dx=(1.0, 1.0, 1.0)), ValueError, "dx"),
    (lambda r, f: dict(dx=float("nan")), ValueError, "dx"),
    (lambda r, f: dict(rho=r[0]), ValueError, "rho"),
    (lambda r, f: dict(rho=r[None, None]), ValueError, "rho"),
    (lambda r, f: dict(rho=r.long()), TypeError, "rho"),
    (lambda r, f: dict(rho=r.numpy()), TypeError, "rho"),
    (lambda r, f: dict(velocity_faces=(f[0],)), ValueError, "velocity_faces"),
    (lambda r, f: dict(velocity_faces=f[0]), TypeError, "velocity_faces"),
    (lambda r, f: dict(velocity_faces=(f[0], f[1][:, :-1])), ValueError, "velocity_faces[1]"),
    (lambda r, f: dict(velocity_faces=(f[0].T, f[1])), ValueError, "velocity_faces[0]"),
    (lambda r, f: dict(velocity_faces=(f[0].float(), f[1])), TypeError, "velocity_faces[0]"),
    (lambda r, f: dict(dt=-0.1), ValueError, "dt"),
    (lambda r, f: dict(dt=float("inf")), ValueError, "dt"),
    (lambda r, f: dict(boundary="reflect"), ValueError, "boundary"),
    (lambda r, f: dict(limiter="superbee"), ValueError, "limiter"),
    (lambda r, f: dict(limiter=["minmod"]), ValueError, "limiter"),  # issue 15: was "unhashable type"
    (lambda r, f: dict(boundary=["periodic"]), ValueError, "boundary"),
    (lambda r, f: dict(dt=10**400), ValueError, "dt"),
    (lambda r, f: dict(dt="0.1"), TypeError, "dt"),
    (lambda r, f: dict(dx=10**400), ValueError, "dx"),
    (lambda r, f: dict(velocity_faces=(f[0].to(torch.complex128), f[1])), TypeError, "velocity_faces[0]"),
    (lambda r, f: dict(boundary="periodic"), ValueError, "velocity_faces[0]"),  # faces 0 and N differ
    (lambda r, f: dict(backend="fortran"), ValueError, "backend"),
])
def test_bad_input_raises_naming_the_argument(mutate, exc, needle):
    rho, faces = _good()
    kwargs = dict(rho=rho, velocity_faces=faces, dx=1.0, dt=0.1)
    kwargs.update(mutate(rho, faces))
    with pytest.raises(exc, match=None) as info:
        sta.grid_transport(kwargs.pop("rho"), kwargs.pop("velocity_faces"), kwargs.pop("dx"), kwargs.pop("dt"), **kwargs)
    assert type(info.value) is exc and str(info.value).startswith(f"{needle}:"), str(info.value)


@pytest.mark.parametrize("time, exc", [(-1, ValueError), (float("nan"), ValueError), ("1.0", TypeError),
                                       (10**400, ValueError)])
def test_transport_for_blames_time(time, exc):
    """Issue 15: a bad time was reported as a bad dt."""
    rho, faces = _good()
    with pytest.raises(exc, match="^time:") as info:
        sta.transport_for(rho, faces, 1.0, time=time)
    assert type(info.value) is exc


def test_transport_for_refuses_an_endless_run_naming_time():
    rho, faces = _good()
    with pytest.raises(ValueError, match=r"^time:.*sub-steps"):
        sta.transport_for(rho, (faces[0] * 1e30, faces[1]), 1.0, time=1.0)


@pytest.mark.parametrize("velocity, exc, needle", [
    ((torch.zeros(0, 3), torch.zeros(0, 4)), ValueError, "velocity[0]"),  # issue 15: "negative dimension -1"
    ((torch.zeros(4, 3, dtype=torch.complex64), torch.zeros(3, 4, dtype=torch.complex64)), TypeError, "velocity[0]"),
    ((torch.zeros(4, 3, dtype=torch.bool), torch.zeros(3, 4, dtype=torch.bool)), TypeError, "velocity[0]"),
    ((torch.zeros(4, 3), torch.zeros(3, 4, dtype=torch.int64)), TypeError, "velocity[1]"),
    ((torch.zeros(4, 3), torch.zeros(3, 5)), ValueError, "velocity[1]"),
    ((torch.zeros(4, 3),), ValueError, "velocity"),
    ((torch.zeros(4, 3), None), TypeError, "velocity[1]"),
    (torch.zeros(4, 4, 2, dtype=torch.complex64), TypeError, "velocity"),  # the centre form, for comparison
    (torch.zeros(4, 4, 2, dtype=torch.bool), TypeError, "velocity"),
])
def test_grid_divergence_rejects_bad_velocities_in_both_forms(velocity, exc, needle):
    with pytest.raises(exc) as info:
        sta.grid_divergence(velocity, 0.5)
    assert type(info.value) is exc and str(info.value).startswith(f"{needle}:"), str(info.value)


def test_cfl_above_one_raises_with_the_largest_stable_dt():
    rho, faces = _good()
    nu = cfl_number(faces, 0.5, 1.0)
    with pytest.raises(ValueError, match=r"CFL number is .* > 1") as info:
        sta.grid_transport(rho, faces, 0.5, 2.0 / nu, backend="torch")
    dt_max = float(str(info.value).split("largest stable dt is ")[1].split(",")[0])
    assert dt_max == pytest.approx(1.0 / nu, rel=1e-5)
    sta.grid_transport(rho, faces, 0.5, dt_max * (1 - 1e-6), backend="torch")  # accepted


# ----------------------------------------------------------------------------------------------
# latent_grid: sampling the field mix through flow_step
# ----------------------------------------------------------------------------------------------

def test_latent_grid_samples_the_field_mix():
    bank = frozen(sta.FieldBank(dim=4, num_potential=2, num_rotational=1, hidden=8))
    center = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=torch.float64)
    g_pot, g_rot = torch.tensor([1.5, -0.5], dtype=torch.float64), 0.8
    g = latent_grid(bank, center, dims=(2, 0), extent=[(-1.0, 2.0), (-2.0, 1.0)], shape=(7, 5),
                    g_pot=g_pot, g_rot=g_rot)
    assert g.points.shape == (7, 5, 4) and g.velocity.shape == (7, 5, 4) and g.plane.shape == (7, 5, 2)
    assert [tuple(u.shape) for u in g.faces] == [(8, 5), (7, 6)]
    assert g.div.shape == (7, 5)
    assert g.dx == pytest.approx((3 / 7, 3 / 5))
    torch.testing.assert_close(g.edges[0], torch.linspace(-1, 2, 8, dtype=torch.float64))
    # other coordinates fixed at the center; grid axes on dims (2, 0)
    torch.testing.assert_close(g.points[..., 1], torch.full((7, 5), -0.2, dtype=torch.float64))
    torch.testing.assert_close(g.points[3, :, 2], torch.full((5,), g.coords[0][3].item(), dtype=torch.float64))
    # velocities: the plain (dense) evaluation of the mix
    def mix(z):
        v = torch.einsum("bkd,k->bd", bank.potential.velocity(z, 0.0), g_pot)
        return v + g_rot * bank.rotational.velocity(z, 0.0)[:, 0]
    torch.testing.assert_close(g.velocity, mix(g.points.reshape(-1, 4)).reshape(7, 5, 4), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(g.plane, g.velocity[..., [2, 0]])
    # faces: the in-plane normal component at the face centres
    face_pts = g.points[:1].clone().expand(1, 5, 4).clone()
    face_pts[..., 2] = g.edges[0][0]
    torch.testing.assert_close(g.faces[0][0], mix(face_pts.reshape(-1, 4))[:, 2], rtol=1e-12, atol=1e-13)
    out = sta.flow_step(g.points.reshape(-1, 4), 0.0, g_pot.expand(35, 2), torch.full((35, 1), 0.8, dtype=torch.float64),
                        bank, outputs=("div",))
    torch.testing.assert_close(g.div.reshape(-1), out.div)


def test_latent_grid_3d_and_bad_arguments():
    bank = frozen(sta.FieldBank(dim=3, num_potential=1, num_rotational=0, hidden=4))
    g = latent_grid(bank, [0.0, 0.0, 0.0], dims=(0, 1, 2), extent=1.0, shape=(4, 3, 2), g_pot=1.0)
    assert [tuple(u.shape) for u in g.faces] == [(5, 3, 2), (4, 4, 2), (4, 3, 3)]
    with pytest.raises(ValueError, match="dims"):
        latent_grid(bank, [0.0] * 3, dims=(0, 0), shape=(4, 4))
    with pytest.raises(ValueError, match="dims"):
        latent_grid(bank, [0.0] * 3, dims=(0, 3), shape=(4, 4))
    with pytest.raises(ValueError, match="center"):
        latent_grid(bank, [0.0] * 2, dims=(0, 1), shape=(4, 4))
    with pytest.raises(ValueError, match="shape"):
        latent_grid(bank, [0.0] * 3, dims=(0, 1), shape=(4, 0))
    with pytest.raises(ValueError, match="extent"):
        latent_grid(bank, [0.0] * 3, dims=(0, 1), extent=-1.0, shape=(4, 4))
    with pytest.raises(ValueError, match="g_pot"):
        latent_grid(bank, [0.0] * 3, dims=(0, 1), shape=(4, 4), g_pot=torch.ones(3))


@pytest.mark.parametrize("kwargs, exc, argument", [
    (dict(center=None), TypeError, "center"),  # issue 15: "must be real number, not NoneType"
    (dict(center="origin"), TypeError, "center"),  # issue 15: "new(): invalid data type 'str'"
    (dict(center=[0.0, float("nan"), 0.0]), ValueError, "center"),
    (dict(center=torch.zeros(3, dtype=torch.complex64)), TypeError, "center"),
    (dict(dims=None), TypeError, "dims"),
    (dict(shape=None), TypeError, "shape"),
    (dict(shape=(4, 4.5)), ValueError, "shape"),
    (dict(extent=10**400), ValueError, "extent"),
    (dict(extent=1e300), ValueError, "extent"),  # grid coordinates beyond float32
    (dict(g_pot=[1, 0, 0]), ValueError, "g_pot"),  # the bank has 2 potential fields
    (dict(g_pot="1"), TypeError, "g_pot"),
    (dict(g_rot=[None]), TypeError, "g_rot"),
    (dict(t=None), TypeError, "t"),
    (dict(fields=None), TypeError, "fields"),
])
def test_latent_grid_bad_arguments_name_the_argument(kwargs, exc, argument):
    args = dict(fields=sta.FieldBank(dim=3, num_potential=2, num_rotational=1, hidden=4), center=[0.0] * 3,
                shape=(4, 4))
    args.update(kwargs)
    with pytest.raises(exc) as info:
        latent_grid(args.pop("fields"), args.pop("center"), **args)
    assert type(info.value) is exc and str(info.value).startswith(f"{argument}:"), str(info.value)


def test_latent_grid_takes_python_sequences():
    """Issue 15: the README passed g_pot=[1, 0, 0] and it was rejected; a sequence (or numpy array)
    is the same as the tensor."""
    bank = frozen(sta.FieldBank(dim=3, num_potential=3, num_rotational=1, hidden=4))
    as_list = latent_grid(bank, [0, 0, 0], shape=(4, 4), g_pot=[1, 0, 0], g_rot=(0.5,))
    as_tensor = latent_grid(bank, torch.zeros(3), shape=(4, 4), g_pot=torch.tensor([1.0, 0, 0]),
                            g_rot=torch.tensor([0.5]))
    for a, b in zip(as_list.faces + (as_list.div,), as_tensor.faces + (as_tensor.div,)):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# convergence of the grid divergence and curl to the analytic ones (docs/maths.md sections 1, 3)
# ----------------------------------------------------------------------------------------------

REFINE = (16, 32, 64)


def test_grid_divergence_converges_to_flow_step_div_d2():
    """D = 2: the slice is the whole space, so flow_step's analytic div is the in-plane divergence."""
    bank = frozen(sta.FieldBank(dim=2, num_potential=2, num_rotational=0, hidden=8))
    hs, err_faces, err_centres = [], [], []
    for n in REFINE:
        g = latent_grid(bank, [0.2, -0.1], dims=(0, 1), extent=2.0, shape=(n, n), g_pot=torch.tensor([2.0, -1.0]))
        scale = g.div.abs().max().item()
        hs.append(g.dx[0])
        err_faces.append((sta.grid_divergence(g.faces, g.dx) - g.div).abs().max().item() / scale)
        err_centres.append((sta.grid_divergence(g.plane, g.dx) - g.div).abs().max().item() / scale)
    assert fit_order(hs, err_faces) >= 1.7, err_faces
    assert fit_order(hs, err_centres) >= 1.7, err_centres
    assert err_faces[-1] < 1e-2 and err_centres[-1] < 1e-2


def test_grid_divergence_converges_to_the_in_plane_divergence_d4():
    """D = 4: the grid sees only the in-plane part tr(J[dims, dims]) (from autograd), which differs
    from flow_step's full divergence."""
    bank = frozen(sta.FieldBank(dim=4, num_potential=2, num_rotational=1, hidden=8))
    g_pot = torch.tensor([1.5, 1.0], dtype=torch.float64)
    dims = (1, 3)

    def mix(z):  # (D,) -> (D,)
        z = z[None]
        v = torch.einsum("bkd,k->bd", bank.potential.velocity(z, 0.0), g_pot) + bank.rotational.velocity(z, 0.0)[:, 0]
        return v[0]

    hs, errs = [], []
    for n in REFINE:
        g = latent_grid(bank, [0.1, 0.2, -0.3, 0.0], dims=dims, extent=2.0, shape=(n, n), g_pot=g_pot, g_rot=1.0)
        J = torch.vmap(torch.func.jacrev(mix))(g.points.reshape(-1, 4)).reshape(n, n, 4, 4)
        in_plane = J[..., dims[0], dims[0]] + J[..., dims[1], dims[1]]
        hs.append(g.dx[0])
        errs.append((sta.grid_divergence(g.faces, g.dx) - in_plane).abs().max().item() / in_plane.abs().max().item())
    assert fit_order(hs, errs) >= 1.7, errs
    assert (g.div - in_plane).abs().max() > 10 * errs[-1] * in_plane.abs().max(), "test needs out-of-plane divergence"


def test_grid_curl_converges_to_the_analytic_vorticity_d2_hamiltonian():
    """D = 2 hamiltonian field (divergence-free): vorticity dv2/dx1 - dv1/dx2 from the Jacobian, whose
    square is flow_step's curl energy 0.5 |J - J^T|^2 (docs/maths.md 1.3) times g^2."""
    bank = frozen(sta.FieldBank(dim=2, num_potential=0, num_rotational=1, hidden=8))
    g_rot = 1.7

    def mix(z):
        return g_rot * bank.rotational.velocity(z[None], 0.0)[0, 0]

    hs, errs = [], []
    for n in REFINE:
        g = latent_grid(bank, [0.0, 0.0], dims=(0, 1), extent=2.0, shape=(n, n), g_rot=g_rot)
        pts = g.points.reshape(-1, 2)
        J = torch.vmap(torch.func.jacrev(mix))(pts).reshape(n, n, 2, 2)
        omega = J[..., 1, 0] - J[..., 0, 1]
        energy = sta.flow_step(pts, 0.0, None, torch.full((n * n, 1), g_rot, dtype=torch.float64), bank,
                               outputs=("curl",)).curl[:, 0].reshape(n, n)
        torch.testing.assert_close(omega ** 2, g_rot ** 2 * energy, rtol=1e-9, atol=1e-12)
        assert g.div.abs().max() <= 1e-12  # exactly divergence-free
        hs.append(g.dx[0])
        errs.append((sta.grid_curl(g.plane, g.dx) - omega).abs().max().item() / omega.abs().max().item())
    assert fit_order(hs, errs) >= 1.7, errs
    assert errs[-1] < 1e-2


def test_grid_curl_3d_of_a_linear_field_is_exact():
    """v = A x with A constant: curl = (A32 - A23, A13 - A31, A21 - A12) everywhere (central differences are exact)."""
    A = torch.randn(3, 3, dtype=torch.float64)
    x = torch.linspace(-1, 1, 6, dtype=torch.float64)
    X = torch.stack(torch.meshgrid(x, x, x, indexing="ij"), -1)
    v = X @ A.T
    dx = 2 / 5
    curl = sta.grid_curl(v, dx)
    expected = torch.stack([A[2, 1] - A[1, 2], A[0, 2] - A[2, 0], A[1, 0] - A[0, 1]])
    torch.testing.assert_close(curl, expected.expand(6, 6, 6, 3), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sta.grid_divergence(v, dx), torch.trace(A).expand(6, 6, 6), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="velocity"):
        sta.grid_curl(v[..., :2], dx)
    with pytest.raises(ValueError, match="dx"):
        sta.grid_curl(v, 0.0)


# ----------------------------------------------------------------------------------------------
# Eulerian vs Lagrangian: grid transport against particles + flow_step's log-density
# ----------------------------------------------------------------------------------------------

def _bilinear(rho, coords, z):
    """rho (N1, N2) with cell-centre coordinates at z: (B, 2); returns values and an in-range mask."""
    lo = torch.stack([coords[0][0], coords[1][0]])
    h = torch.stack([coords[0][1] - coords[0][0], coords[1][1] - coords[1][0]])
    idx = (z - lo) / h
    i = idx.floor().long()
    w = idx - i
    ok = ((i >= 0) & (i < torch.tensor(rho.shape) - 1)).all(1)
    i, w = i.clamp(min=0), w
    i0 = torch.minimum(i[:, 0], torch.tensor(rho.shape[0] - 2))
    i1 = torch.minimum(i[:, 1], torch.tensor(rho.shape[1] - 2))
    val = (rho[i0, i1] * (1 - w[:, 0]) * (1 - w[:, 1]) + rho[i0 + 1, i1] * w[:, 0] * (1 - w[:, 1])
           + rho[i0, i1 + 1] * (1 - w[:, 0]) * w[:, 1] + rho[i0 + 1, i1 + 1] * w[:, 0] * w[:, 1])
    return val, ok


def test_grid_and_particles_agree_and_converge_d2():
    bank = frozen(sta.FieldBank(dim=2, num_potential=1, num_rotational=1, hidden=8))
    g_pot, g_rot, time = 2.0, 2.0, 1.0
    mean, sigma = torch.tensor([0.3, -0.2], dtype=torch.float64), 0.5

    def rho0(z):
        return torch.exp(-((z - mean) ** 2).sum(-1) / (2 * sigma ** 2))

    errors = []
    for n in (24, 48, 96):
        g = latent_grid(bank, [0.0, 0.0], dims=(0, 1), extent=2.5, shape=(n, n), g_pot=g_pot, g_rot=g_rot)
        rho = sta.transport_for(rho0(g.points), g.faces, g.dx, time=time, backend="torch")
        z = g.points.reshape(-1, 2)
        zT, logqT = sta.grid.advect_particles(bank, z, torch.log(rho0(z)), time, steps=n // 2, g_pot=g_pot,
                                              g_rot=g_rot, backend="torch")
        grid_val, ok = _bilinear(rho, g.coords, zT)
        ok &= logqT.exp() > 1e-2  # where the bump is
        errors.append((grid_val[ok] - logqT[ok].exp()).abs().max().item())
        assert ok.sum() > 0.1 * n * n
        assert abs(rho.sum() - rho0(g.points).sum()) <= 1e-12 * rho.sum()
    assert errors[-1] < 0.01, errors
    assert errors[0] > errors[1] > errors[2], errors
    assert fit_order([1, 0.5, 0.25], errors) >= 1.0, errors


@pytest.mark.slow  # matplotlib figure (~2 s)
def test_plot_grid_transport_writes_a_png(tmp_path):
    from sta.plots import plot_grid_transport

    bank = sta.FieldBank(dim=3, num_potential=1, num_rotational=1, hidden=4)
    path = plot_grid_transport(bank, str(tmp_path / "transport.png"), dims=(0, 2), extent=2.0, shape=(24, 20),
                               g_pot=2.0, g_rot=2.0, time=0.5, frames=3, particles=200)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
