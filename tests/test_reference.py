"""The reference closed forms (sta.reference) against the torch.func oracle (tests/oracle.py), float64."""
import pytest
import torch

import sta
from sta import reference
from tests import oracle
from tests.tolerances import IDENTITY_ATOL, ORACLE, assert_close

DIMS = [1, 3, 17, 64]
HIDDENS = [1, 5, 32]
T = 0.7


def _bank(D, H, Kp=3, Kr=3, rotational="hamiltonian", rank=None):
    torch.manual_seed(D * 100 + H)
    bank = sta.FieldBank(D, Kp, Kr, H, rotational=rotational, rank=rank).double()
    with torch.no_grad():  # make the time embedding matter, so du/dt is far from 0
        bank.potential.time.weight.normal_(0, 0.5)
        bank.rotational.time.weight.normal_(0, 0.5)
        if rotational == "mlp":
            bank.rotational.b2.normal_(0, 0.1)
    return bank


@pytest.mark.parametrize("H", HIDDENS)
@pytest.mark.parametrize("D", DIMS)
def test_potential_rows_match_oracle(D, H):
    """grad u, lap u, du/dt, hj and u of each potential field, at 3 points."""
    bank = _bank(D, H)
    z = torch.randn(3, D, dtype=torch.float64)
    p = bank.potential.prepare(T)
    for k in range(3):
        got = reference.potential_rows(z, p.W[k], p.c[k], p.a[k], p.de[k])
        for b in range(3):
            want = oracle.potential_quantities(bank.potential, k, z[b], T)
            for name in ("u", "v", "lap", "dudt", "hj"):
                assert_close(got[name][b], want[name], tol=ORACLE, what=f"{name} field {k} sample {b}")


@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("H", HIDDENS)
@pytest.mark.parametrize("D", DIMS)
def test_hamiltonian_rows_match_oracle(D, H, rank):
    """r = A grad psi, and its curl energy d^T G d - d^T (N o N^T) d."""
    bank = _bank(D, H, rank=rank)
    rot = bank.rotational
    z = torch.randn(2, D, dtype=torch.float64)
    p = rot.prepare(T)
    G, N = reference.hamiltonian_curl_matrices(p)
    for k in range(3):
        got = reference.hamiltonian_rows(z, p.W[k], p.c[k], p.a[k], p.M[k], G[k], N[k])
        for b in range(2):
            want = oracle.rotational_quantities(rot, k, z[b], T)
            assert_close(got["v"][b], want["v"], tol=ORACLE, what=f"r field {k}")
            assert_close(got["curl"][b], want["curl"], tol=ORACLE, what=f"curl field {k}")


@pytest.mark.parametrize("H", HIDDENS)
@pytest.mark.parametrize("D", DIMS)
def test_mlp_rows_match_oracle(D, H):
    """r = tanh(W2 tanh(W1 z + c1) + b2), its exact divergence and curl energy."""
    bank = _bank(D, H, rotational="mlp")
    rot = bank.rotational
    z = torch.randn(2, D, dtype=torch.float64)
    p = rot.prepare(T)
    for k in range(3):
        got = reference.mlp_rows(z, p.W1[k], p.c1[k], p.W2[k], p.b2[k], curl=True)
        for b in range(2):
            want = oracle.rotational_quantities(rot, k, z[b], T)
            for name in ("v", "div", "curl"):
                assert_close(got[name][b], want[name], tol=ORACLE, what=f"{name} field {k}")


@pytest.mark.parametrize("D", [1, 3, 17])
def test_potential_jacobians_are_symmetric(D):
    bank = _bank(D, 5)
    z = torch.randn(D, dtype=torch.float64)
    for k in range(3):
        J = torch.func.jacrev(lambda x: bank.potential.velocity(x[None], T)[0, k])(z)
        assert (J - J.T).abs().max().item() <= IDENTITY_ATOL


@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("D", [1, 3, 17])
def test_hamiltonian_jacobians_are_trace_free(D, rank):
    bank = _bank(D, 5, rank=rank)
    z = torch.randn(D, dtype=torch.float64)
    for k in range(3):
        J = torch.func.jacrev(lambda x: bank.rotational.velocity(x[None], T)[0, k])(z)
        assert abs(torch.trace(J).item()) <= IDENTITY_ATOL
        if D > 1:  # and the field really rotates: not a trivially zero Jacobian
            assert J.abs().max().item() > 1e-6


@pytest.mark.parametrize("rotational", ["hamiltonian", "mlp"])
@pytest.mark.parametrize("Kr", [0, 1, 3])
@pytest.mark.parametrize("Kp", [0, 1, 3])
def test_flow_step_matches_oracle(Kp, Kr, rotational):
    """z_next and div of the sparse mixed step, with some pairs inactive."""
    D, H, B, dt = 5, 7, 4, 0.3
    bank = _bank(D, H, Kp, Kr, rotational)
    z = torch.randn(B, D, dtype=torch.float64)
    g_pot = torch.randn(B, Kp, dtype=torch.float64) * (torch.rand(B, Kp) < 0.6)
    g_rot = torch.randn(B, Kr, dtype=torch.float64) * (torch.rand(B, Kr) < 0.6)
    out = sta.flow_step(z, T, g_pot, g_rot, bank, dt=dt, backend="torch")
    z_want, div_want = oracle.flow_step_oracle(bank, z, T, g_pot, g_rot, dt)
    assert_close(out.z, z_want, tol=ORACLE, what="z_next")
    assert_close(out.div, div_want, tol=ORACLE, what="div")


@pytest.mark.parametrize("D,H", [(17, 32), (64, 5)])
def test_flow_step_per_pair_outputs_match_oracle(D, H):
    """hj, u (potential), div_rot, curl (rotational) per active pair; 0 at inactive pairs."""
    for rotational in ("hamiltonian", "mlp"):
        bank = _bank(D, H, 2, 2, rotational)
        z = torch.randn(3, D, dtype=torch.float64)
        g = torch.tensor([[1.0, 0.0], [0.0, -2.0], [0.5, 0.5]], dtype=torch.float64)
        out = sta.flow_step(z, T, g, g, bank, outputs=sta.OUTPUT_NAMES, backend="torch")
        for b in range(3):
            for k in range(2):
                on = g[b, k] != 0
                pq = oracle.potential_quantities(bank.potential, k, z[b], T)
                rq = oracle.rotational_quantities(bank.rotational, k, z[b], T)
                for got, want in ((out.hj[b, k], pq["hj"]), (out.u[b, k], pq["u"]),
                                  (out.div_rot[b, k], rq["div"]), (out.curl[b, 2 + k], rq["curl"])):
                    assert_close(got, want if on else torch.zeros_like(want), tol=ORACLE, what=f"pair {b},{k}")
                assert out.curl[b, k].item() == 0.0  # potential fields are curl-free


@pytest.mark.parametrize("rotational", ["hamiltonian", "mlp"])
def test_logdet_oracle_agrees_with_divergence(rotational):
    """log|det(I + dt J)| = dt div + O(dt^2): the particle update matches the exact Jacobian."""
    D, B = 6, 3
    bank = _bank(D, 8, 2, 2, rotational)
    z = torch.randn(B, D, dtype=torch.float64)
    g = torch.rand(B, 2, dtype=torch.float64) + 0.5
    div = sta.flow_step(z, T, g, g, bank, backend="torch").div

    def velocity(x, b):
        return oracle.mixed_velocity(bank, x, T, g[b], g[b])

    for dt in (1e-2, 1e-3):
        logdet = reference.exact_logdet(z, velocity, dt)
        gap = (logdet - dt * div).abs().max().item()
        assert gap <= 5 * dt * dt * (1 + div.abs().max().item()) ** 2, (dt, gap)
    with pytest.raises(ValueError, match="^z:"):
        reference.exact_logdet(torch.zeros(1, 65, dtype=torch.float64), velocity)


def test_dense_evaluations_have_documented_shapes():
    bank = _bank(4, 3, 2, 3)
    z = torch.randn(5, 4, dtype=torch.float64)
    assert bank.potential.potential(z, 0.0).shape == (5, 2)
    assert bank.potential.velocity(z, 0.0).shape == (5, 2, 4)
    assert bank.rotational.velocity(z, 0.0).shape == (5, 3, 4)
    empty = sta.FieldBank(4, 0, 0, 3).double()
    assert empty.potential.velocity(z, 0.0).shape == (5, 0, 4)
    assert empty.rotational.velocity(z, 0.0).shape == (5, 0, 4)
