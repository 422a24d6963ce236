"""The pure-PyTorch reference of every fused op (docs/maths.md sections 1-2). Also the CPU fallback.

The formulas live here once. Every kernel backend reproduces :func:`potential_terms`,
:func:`hamiltonian_terms` and :func:`mlp_terms` exactly (same inputs, same outputs), and the
tests compare each backend against them and them against a torch.func oracle in float64.

Notation (docs/maths.md 1.1): for one field and rows ``z: (N, D)``

    h = z W^T + c          c = b + e(t): the time-shifted hidden bias, (H,)
    s = tanh(h),  s1 = 1 - s^2,  s2 = -2 s s1
    u = a . s,  grad u = (a s1) W,  lap u = sum_j a_j s2_j |W_j|^2,  du/dt = sum_j a_j s1_j de_j
    hj = du/dt + 0.5 |grad u|^2

Gradients come from autograd over these closed forms (the third derivative of tanh appears when
``div`` is differentiated); they are the reference the fused backward kernels are checked against.

Sparsity contract: a (sample, field) pair is active iff its coefficient is non-zero. Only active
pairs are evaluated, so outputs and gradients of an inactive pair are exactly zero, including
the gradient with respect to its (zero) coefficient: the op treats the zero pattern of ``g`` as
routing, like a mixture-of-experts gate.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = [
    "PotentialParams",
    "HamiltonianParams",
    "MLPParams",
    "FieldTerms",
    "potential_value",
    "potential_gradient",
    "hamiltonian_velocity",
    "mlp_velocity",
    "potential_rows",
    "hamiltonian_rows",
    "mlp_rows",
    "hamiltonian_curl_matrices",
    "mlp_divergence_matrix",
    "potential_terms",
    "hamiltonian_terms",
    "mlp_terms",
    "active_rows",
    "exact_logdet",
]


class PotentialParams(NamedTuple):
    """Per-step parameters of K potential fields (output of ``PotentialFields.prepare(t)``).

    W: (K, H, D) hidden weights; c: (K, H) hidden bias b + e(t); a: (K, H) output weights;
    de: (K, H) time derivative of the bias, de/dt.
    """

    W: Tensor
    c: Tensor
    a: Tensor
    de: Tensor


class HamiltonianParams(NamedTuple):
    """Per-step parameters of K hamiltonian rotational fields ``r_k = A_k grad psi_k``.

    W: (K, H, D), c: (K, H), a: (K, H) -- the potential psi_k; M: (K, D, H) = A_k W_k^T, so that
    ``r_k = M_k (a_k * s')``.
    """

    W: Tensor
    c: Tensor
    a: Tensor
    M: Tensor


class MLPParams(NamedTuple):
    """Per-step parameters of K mlp rotational fields ``r_k = tanh(W2_k tanh(W1_k z + c1_k) + b2_k)``.

    W1: (K, H, D); c1: (K, H) = b1 + e(t); W2: (K, D, H); b2: (K, D).
    Pdiv: (K, D, H) = W2 o W1^T, the divergence matrix of the compiled and Triton kernels, when it
    was prepared (:func:`sta.flow_path` forms it once per path); None: they form it per call
    (:func:`mlp_divergence_matrix`). The reference's own functions do not read it.
    """

    W1: Tensor
    c1: Tensor
    W2: Tensor
    b2: Tensor
    Pdiv: Optional[Tensor] = None


class FieldTerms(NamedTuple):
    """What one bank of fields contributes to a flow step.

    velocity: (B, D)  sum_k g[b,k] v_k(z_b)
    div:      (B,)    sum_k g[b,k] div v_k(z_b)   (None if not requested)
    hj:       (B, K)  Hamilton-Jacobi residual per active pair, 0 where inactive (potential only)
    u:        (B, K)  potential value per active pair, 0 where inactive (potential only)
    div_rot:  (B, K)  divergence per active pair, 0 where inactive (rotational only)
    curl:     (B, K)  curl energy 0.5 |J - J^T|_F^2 per active pair, 0 where inactive
    """

    velocity: Tensor
    div: Optional[Tensor] = None
    hj: Optional[Tensor] = None
    u: Optional[Tensor] = None
    div_rot: Optional[Tensor] = None
    curl: Optional[Tensor] = None


# ----------------------------------------------------------------------------------------------
# Per-field maths on a block of rows: the single source of the closed forms.
# ----------------------------------------------------------------------------------------------

def potential_rows(z: Tensor, W: Tensor, c: Tensor, a: Tensor, de: Tensor) -> dict:
    """One potential field on rows ``z: (N, D)``; ``W: (H, D)``, ``c, a, de: (H,)``.

    Returns a dict of (N,)-shaped ``u, lap, dudt, hj`` and the (N, D) gradient ``v``. Leading
    field dimensions broadcast: ``W: (K, H, D)``, ``c, a, de: (K, H)`` evaluate K fields on the
    same rows, every result gaining a leading ``K`` (the dense evaluations below).
    """
    s = torch.tanh(z @ W.mT + c[..., None, :])
    s1 = 1 - s * s
    s2 = -2 * s * s1
    v = (a[..., None, :] * s1) @ W
    lap = ((a[..., None, :] * s2) @ (W * W).sum(-1)[..., None])[..., 0]
    dudt = ((a[..., None, :] * s1) @ de[..., None])[..., 0]
    u = (s @ a[..., None])[..., 0]
    return {"u": u, "v": v, "lap": lap, "dudt": dudt, "hj": dudt + 0.5 * (v * v).sum(-1)}


def hamiltonian_rows(z: Tensor, W: Tensor, c: Tensor, a: Tensor, M: Tensor,
                     G: Optional[Tensor] = None, N: Optional[Tensor] = None) -> dict:
    """One hamiltonian field on rows ``z: (N, D)``; ``M: (D, H)``; curl needs ``G, N: (H, H)``.

    Returns ``v: (N, D)`` and, given G and N (see :func:`hamiltonian_curl_matrices`),
    ``curl: (N,)`` = d^T G d - d^T (N o N^T) d with d = a * s''. Leading field dimensions
    broadcast as in :func:`potential_rows`.
    """
    s = torch.tanh(z @ W.mT + c[..., None, :])
    s1 = 1 - s * s
    out = {"v": (a[..., None, :] * s1) @ M.mT}
    if G is not None:
        d = a[..., None, :] * (-2 * s * s1)
        out["curl"] = ((d @ G) * d).sum(-1) - ((d @ (N * N.mT)) * d).sum(-1)
    return out


def mlp_divergence_matrix(p: MLPParams) -> Tensor:
    """``Pdiv = W2 o W1^T: (K, D, H)``, with ``div r_k = sum_i s2'_i [Pdiv_k s1']_i`` (docs/ops.md 7):
    ``p.Pdiv`` when prepared, else formed (a strided elementwise product: 102 ms of a 170 ms forward
    at K = 16, D = H = 1024 on one CPU thread, so a path forms it once)."""
    return p.Pdiv if p.Pdiv is not None else p.W2 * p.W1.transpose(1, 2)


def hamiltonian_curl_matrices(p: HamiltonianParams) -> tuple[Tensor, Tensor]:
    """Per-step matrices of the curl energy (docs/maths.md 1.3): ``G = (M^T M) o (W W^T)``, ``N = W M``.

    Returns G, N: (K, H, H).
    """
    WWt = p.W @ p.W.transpose(1, 2)
    MtM = p.M.transpose(1, 2) @ p.M
    return MtM * WWt, p.W @ p.M


def mlp_rows(z: Tensor, W1: Tensor, c1: Tensor, W2: Tensor, b2: Tensor, curl: bool = False) -> dict:
    """One mlp rotational field on rows ``z: (N, D)``; ``W1: (H, D)``, ``W2: (D, H)``.

    Returns ``v: (N, D)``, its exact divergence ``div: (N,)`` =
    sum_i s2'_i [(W2 o W1^T) s1']_i, and, if asked, ``curl: (N,)`` from the explicit Jacobian
    (O(D^2 H) per row: a diagnostic). Leading field dimensions broadcast as in :func:`potential_rows`.
    """
    s1 = torch.tanh(z @ W1.mT + c1[..., None, :])
    ds1 = 1 - s1 * s1
    r = torch.tanh(s1 @ W2.mT + b2[..., None, :])
    ds2 = 1 - r * r
    out = {"v": r, "div": (ds2 * (ds1 @ (W2 * W1.mT).mT)).sum(-1)}
    if curl:
        # (..., N, D, D)
        J = ds2[..., :, :, None] * ((W2[..., None, :, :] * ds1[..., :, None, :]) @ W1[..., None, :, :])
        out["curl"] = (J * J).sum((-2, -1)) - (J * J.mT).sum((-2, -1))
    return out


# ----------------------------------------------------------------------------------------------
# Dense, plain evaluations (every field at every sample): for users, plots and tests.
# ----------------------------------------------------------------------------------------------

# Every field at once: the row functions above with the fields as a leading batch dimension, so one
# batched product replaces a loop over fields (whose per-field parameter slices each cost a
# zero-filled (K, H, D) gradient in the backward: 32 fills of 128 MB, ~1.8 s of a 15 s training
# iteration at D = H = 1024, K = 32, before this was batched).

def potential_value(z: Tensor, p: PotentialParams) -> Tensor:
    """``u_k(z)`` for every field: z: (B, D) -> (B, K)."""
    return potential_rows(z, p.W, p.c, p.a, p.de)["u"].mT


def potential_gradient(z: Tensor, p: PotentialParams) -> Tensor:
    """``grad u_k(z)`` for every field: z: (B, D) -> (B, K, D)."""
    return potential_rows(z, p.W, p.c, p.a, p.de)["v"].transpose(0, 1)


def hamiltonian_velocity(z: Tensor, p: HamiltonianParams) -> Tensor:
    """``r_k(z) = M_k (a_k * s')`` for every field: z: (B, D) -> (B, K, D)."""
    return hamiltonian_rows(z, p.W, p.c, p.a, p.M)["v"].transpose(0, 1)


def mlp_velocity(z: Tensor, p: MLPParams) -> Tensor:
    """``r_k(z) = tanh(W2 tanh(W1 z + c1) + b2)`` for every field: z: (B, D) -> (B, K, D)."""
    return mlp_rows(z, p.W1, p.c1, p.W2, p.b2)["v"].transpose(0, 1)


# ----------------------------------------------------------------------------------------------
# Sparse terms: the kernel contract. Loop over fields, gather the active rows, compute, scatter.
# ----------------------------------------------------------------------------------------------

try:  # torch >= 2.7: False for an expression that cannot be decided without data (an unbacked size)
    from torch.fx.experimental.symbolic_shapes import guard_or_false as _known_true
except ImportError:  # pragma: no cover - older torch traces with concrete sizes only
    _known_true = bool


def active_rows(g: Tensor) -> list[Tensor]:
    """For each field k, the int64 indices of the samples with ``g[:, k] != 0``. g: (B, K)."""
    return [torch.nonzero(g[:, k]).squeeze(1) for k in range(g.shape[1])]


def _scatter(B: int, K: int, z: Tensor, want, per_field) -> FieldTerms:
    """Accumulate per-field row results into FieldTerms.

    per_field yields (k, idx, weight, res): res has "v" (N, D) and optional (N,) per-row scalars;
    the g-weighted sums go into velocity/div, the unweighted per-pair values into (B, K) outputs
    at column k (zero for pairs that were not evaluated).
    """
    velocity = z.new_zeros(B, z.shape[1])
    div = z.new_zeros(B) if "div" in want else None
    pair = {name: [z.new_zeros(B)] * K for name in ("hj", "u", "div_rot", "curl") if name in want}
    for k, idx, weight, res in per_field:
        velocity = velocity.index_add(0, idx, weight[:, None] * res["v"])
        if div is not None and "div" in res:
            div = div.index_add(0, idx, weight * res["div"])
        for name, cols in pair.items():
            if name in res:
                cols[k] = z.new_zeros(B).index_add(0, idx, res[name])
    outs = {name: (torch.stack(cols, 1) if K else z.new_zeros(B, 0)) for name, cols in pair.items()}
    return FieldTerms(velocity=velocity, div=div, **outs)


def _per_field(z: Tensor, g: Tensor, rows):
    for k, idx in enumerate(active_rows(g)):
        # A field without active rows is skipped when that is known; while tracing (torch.compile,
        # opcheck) the count is symbolic and the general code runs (it is right for 0 rows too).
        if _known_true(idx.numel() == 0):
            continue
        yield k, idx, g[idx, k], rows(z[idx], k)


def potential_terms(z: Tensor, g: Tensor, p: PotentialParams, want=("div",)) -> FieldTerms:
    """Sparse sum of potential fields.

    z: (B, D); g: (B, K); p: PotentialParams. ``want`` names the optional outputs among
    ``div, hj, u, curl`` (curl of a potential field is exactly zero).
    Returns FieldTerms(velocity (B, D), div (B,), hj (B, K), u (B, K), curl (B, K)).
    """
    B, K = g.shape

    def rows(x, k):
        r = potential_rows(x, p.W[k], p.c[k], p.a[k], p.de[k])
        r["div"] = r["lap"]
        return r

    terms = _scatter(B, K, z, want, _per_field(z, g, rows))
    if "curl" in want:  # the Hessian is symmetric: no curl, by construction
        terms = terms._replace(curl=z.new_zeros(B, K))
    return terms


def hamiltonian_terms(z: Tensor, g: Tensor, p: HamiltonianParams, want=("div",)) -> FieldTerms:
    """Sparse sum of hamiltonian rotational fields (exactly divergence-free).

    z: (B, D); g: (B, K). ``want`` among ``div, div_rot, curl``; div and div_rot are exact zeros.
    Returns FieldTerms(velocity (B, D), div (B,), div_rot (B, K), curl (B, K)).
    """
    B, K = g.shape
    G = N = None
    if "curl" in want and K:
        G, N = hamiltonian_curl_matrices(p)

    def rows(x, k):
        return hamiltonian_rows(x, p.W[k], p.c[k], p.a[k], p.M[k],
                                None if G is None else G[k], None if N is None else N[k])

    terms = _scatter(B, K, z, tuple(w for w in want if w != "div_rot"), _per_field(z, g, rows))
    if "div_rot" in want:
        terms = terms._replace(div_rot=z.new_zeros(B, K))
    return terms


def mlp_terms(z: Tensor, g: Tensor, p: MLPParams, want=("div",)) -> FieldTerms:
    """Sparse sum of mlp rotational fields, with their exact divergence.

    z: (B, D); g: (B, K). ``want`` among ``div, div_rot, curl``.
    Returns FieldTerms(velocity (B, D), div (B,), div_rot (B, K), curl (B, K)).
    """
    B, K = g.shape
    curl = "curl" in want

    def rows(x, k):
        r = mlp_rows(x, p.W1[k], p.c1[k], p.W2[k], p.b2[k], curl=curl)
        r["div_rot"] = r["div"]
        return r

    return _scatter(B, K, z, want, _per_field(z, g, rows))


# ----------------------------------------------------------------------------------------------
# Oracle for the log-density update.
# ----------------------------------------------------------------------------------------------

def exact_logdet(z: Tensor, velocity_fn, dt: float = 1.0, max_dim: int = 64) -> Tensor:
    """Exact ``log|det(I + dt J_b)|`` per sample, J_b the Jacobian of the summed velocity at z_b.

    z: (B, D) with D <= max_dim; ``velocity_fn(z_row: (D,), b: int) -> (D,)``.
    Uses torch.func.jacrev, one sample at a time: an oracle for tests, not a fast path.
    Returns (B,).
    """
    B, D = z.shape
    if D > max_dim:
        raise ValueError(f"z: exact_logdet is an oracle for D <= {max_dim}, got D={D}")
    eye = torch.eye(D, dtype=z.dtype, device=z.device)
    out = []
    for b in range(B):
        J = torch.func.jacrev(lambda x: velocity_fn(x, b))(z[b])
        out.append(torch.linalg.slogdet(eye + dt * J)[1])
    return torch.stack(out) if out else z.new_zeros(0)
