"""An independent oracle for the field maths: the definitions of docs/maths.md section 1 written directly from
the module parameters, differentiated by torch.func (jacrev, hessian). Nothing here imports
sta.reference, so a broken closed form there cannot also break its check.
"""
from __future__ import annotations

import torch
from torch.func import hessian, jacrev


def time_bias(bank, t):
    """e(t): (K, H), from the bank's time embedding (an input of the fields, not a closed form)."""
    return bank.time(torch.as_tensor(t, dtype=bank.time.weight.dtype))[0]


def potential_u(fields, k, x, t):
    """u_k(x, t) = a_k . tanh(W_k x + b_k + e_k(t)); x: (D,), t: 0-dim tensor -> scalar."""
    e = time_bias(fields, t)
    return (fields.a[k] * torch.tanh(fields.W[k] @ x + fields.b[k] + e[k])).sum()


def skew(rot, k):
    """A_k from the raw parameters: P - P^T, or U V^T - V U^T."""
    if rot.rank is None:
        return rot.P[k] - rot.P[k].T
    uv = rot.U[k] @ rot.V[k].T
    return uv - uv.T


def rotational_r(rot, k, x, t):
    """r_k(x, t): (D,) for either construction, from the definitions."""
    e = time_bias(rot, t)
    if rot.construction == "hamiltonian":
        psi = lambda y: (rot.a[k] * torch.tanh(rot.W[k] @ y + rot.b[k] + e[k])).sum()  # noqa: E731
        return skew(rot, k) @ jacrev(psi)(x)
    return torch.tanh(rot.W2[k] @ torch.tanh(rot.W1[k] @ x + rot.b1[k] + e[k]) + rot.b2[k])


def potential_quantities(fields, k, x, t):
    """Oracle of every potential-field quantity at one point: dict of u, v, lap, dudt, hj, jac."""
    t = torch.as_tensor(t, dtype=x.dtype)
    u = lambda y: potential_u(fields, k, y, t)  # noqa: E731
    v = jacrev(u)(x)
    H = hessian(u)(x)
    dudt = jacrev(lambda s: potential_u(fields, k, x, s))(t)
    return {"u": u(x), "v": v, "lap": torch.trace(H), "dudt": dudt, "hj": dudt + 0.5 * v.dot(v), "jac": H}


def rotational_quantities(rot, k, x, t):
    """Oracle of a rotational field at one point: dict of v, div, curl (0.5 |J - J^T|_F^2), jac."""
    t = torch.as_tensor(t, dtype=x.dtype)
    J = jacrev(lambda y: rotational_r(rot, k, y, t))(x)
    return {"v": rotational_r(rot, k, x, t), "div": torch.trace(J), "curl": 0.5 * ((J - J.T) ** 2).sum(), "jac": J}


def mixed_velocity(bank, x, t, gp, gr):
    """sum_k gp[k] grad u_k(x) + sum_k gr[k] r_k(x): (D,), for one sample."""
    t = torch.as_tensor(t, dtype=x.dtype)
    out = torch.zeros_like(x)
    for k in range(bank.num_potential):
        out = out + gp[k] * jacrev(lambda y: potential_u(bank.potential, k, y, t))(x)
    for k in range(bank.num_rotational):
        out = out + gr[k] * rotational_r(bank.rotational, k, x, t)
    return out


def flow_step_oracle(bank, z, t, g_pot, g_rot, dt):
    """z_next: (B, D) and div: (B,) of the mixed flow, sample by sample."""
    zs, divs = [], []
    for b in range(z.shape[0]):
        f = lambda y: mixed_velocity(bank, y, t, g_pot[b], g_rot[b])  # noqa: E731
        zs.append(z[b] + dt * f(z[b]))
        divs.append(torch.trace(jacrev(f)(z[b])))
    return torch.stack(zs), torch.stack(divs)
