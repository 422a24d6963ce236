"""The ``cpu`` backend (C++ in csrc/cpu, ``torch.ops.sta.*``) against the reference.

Parity in float32 and float64 (tests/tolerances.py), forward and every gradient, for the three
field kinds at term level (shapes, output subsets, all-off and all-on, D = 255, B = 0) and for
``sta.flow_step`` end to end at more shapes than the cross-backend matrix of tests/test_parity.py
(which also has this backend's sparsity patterns, B = 0, odd D and non-contiguous inputs and grad
outputs); ``opcheck`` on every op; ``torch.compile(fullgraph=True)``; the dispatcher's reasons.
The extension is built by ``pip install`` or compiled on first use (sta/_extension.py); if it
cannot be, these tests fail with the reason rather than skip (CI must build it).
"""
import types

import pytest
import torch

import sta
from sta import _extension, backends
from sta.backends import Request
from tests.parity import (F32, F64, TERMS_WANT, Case, assert_all_close, check_parity, check_terms, coefficients,
                          field_bank, grads, term_params)

DTYPES = [F32, F64]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cpu():
    module = _extension.load()
    assert module is not None, f"the C++ extension must build here: {_extension.error()}"
    backend = backends.get_backend("cpu")
    assert backend.unavailable() == [], backend.unavailable()
    return backend


# ----------------------------------------------------------------------------------------------
# term-level parity: the foundation shapes, sampled (flow_step and flow_path: tests/test_parity.py)
# ----------------------------------------------------------------------------------------------

def _terms_case(kind, B, D, H, K, dtype, pattern="mixed"):
    z = torch.randn(B, D, dtype=dtype, requires_grad=True)
    g = coefficients((B, K), pattern, dtype, signed=True).requires_grad_()
    return z, g, term_params(kind, K, H, D, dtype)


# (B, D, H, K): every D in {1, 3, 17, 64}, H in {1, 5, 32}, K in {0, 1, 3} appears, mixed sparsity
SHAPES = [(7, 1, 1, 1), (9, 3, 5, 3), (10, 17, 32, 3), (6, 64, 5, 0), (8, 64, 32, 1), (5, 17, 1, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("kind", ["potential", "hamiltonian", "mlp"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}D{d}H{h}K{k}" for b, d, h, k in SHAPES])
def test_terms_parity(cpu, shape, kind, dtype):
    check_terms("cpu", kind, *_terms_case(kind, *shape, dtype), TERMS_WANT[kind], dtype)


@pytest.mark.parametrize("kind", ["potential", "hamiltonian", "mlp"])
@pytest.mark.parametrize("want", [(), ("div",), ("hj",), ("curl",), ("div_rot",)])
def test_terms_output_subsets(cpu, kind, want):
    """Each optional output alone (the ops skip the branches whose outputs get no gradient)."""
    check_terms("cpu", kind, *_terms_case(kind, 9, 6, 7, 3, F64), want, F64)


@pytest.mark.parametrize("pattern", ["off", "on"])
@pytest.mark.parametrize("kind", ["potential", "hamiltonian", "mlp"])
def test_terms_all_off_all_on(cpu, kind, pattern):
    out = check_terms("cpu", kind, *_terms_case(kind, 11, 5, 8, 3, F32, pattern), TERMS_WANT[kind], F32)
    if pattern == "off":
        assert torch.equal(out.velocity, torch.zeros_like(out.velocity))


@pytest.mark.parametrize("kind", ["potential", "hamiltonian", "mlp"])
def test_terms_wide_and_empty(cpu, kind):
    """D = 255 (not a multiple of any vector width) and B = 0."""
    check_terms("cpu", kind, *_terms_case(kind, 6, 255, 20, 3, F32), TERMS_WANT[kind], F32)
    check_terms("cpu", kind, *_terms_case(kind, 0, 4, 3, 2, F32), TERMS_WANT[kind], F32)


# ----------------------------------------------------------------------------------------------
# flow_step end to end at more shapes than the matrix (cheap here): gradients in every parameter
# ----------------------------------------------------------------------------------------------

FLOW_CASES = [  # (D, H, Kp, Kr, rotational)
    (3, 5, 3, 1, "hamiltonian"), (17, 32, 1, 3, "mlp"), (64, 5, 0, 3, "hamiltonian"),
    (1, 1, 3, 0, "mlp"), (17, 1, 1, 1, "hamiltonian"), (3, 32, 3, 3, "mlp"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", FLOW_CASES, ids=[f"D{c[0]}H{c[1]}Kp{c[2]}Kr{c[3]}{c[4]}" for c in FLOW_CASES])
def test_flow_step_shapes(cpu, case, dtype):
    D, H, Kp, Kr, rotational = case
    check_parity("cpu", "flow_step", dtype, rotational, Case(9, D, H, Kp, Kr, "mixed"))


def test_flow_step_div_hj_gradients_only(cpu):
    """Gradients through div and hj alone (the log-density and HJ losses of training)."""
    bank = field_bank(7, 9, 3, 2, "mlp", dtype=F64)
    z = torch.randn(10, 7, dtype=F64, requires_grad=True)
    g_pot = coefficients((10, 3), "mixed", F64, signed=True).requires_grad_()
    g_rot = coefficients((10, 2), "mixed", F64, signed=True).requires_grad_()
    leaves = [z, g_pot, g_rot] + list(bank.parameters())
    res = []
    for backend in ("torch", "cpu"):
        out = sta.flow_step(z, 0.2, g_pot, g_rot, bank, outputs=("div", "hj", "div_rot"), backend=backend)
        loss = out.div.square().sum() + out.hj.square().sum() + out.div_rot.sum()
        res.append(grads(loss, leaves))
    assert_all_close(res[1], res[0], range(len(leaves)), F64, what="grad via div/hj of input ")


# ----------------------------------------------------------------------------------------------
# the torch op library: opcheck, torch.compile
# ----------------------------------------------------------------------------------------------

def _op_samples(dtype=F64):
    B, D, H, K = 5, 4, 3, 3
    z = torch.randn(B, D, dtype=dtype, requires_grad=True)
    g = coefficients((B, K), "mixed", dtype, signed=True).requires_grad_()
    pp = term_params("potential", K, H, D, dtype)
    hp = term_params("hamiltonian", K, H, D, dtype)
    mp = term_params("mlp", K, H, D, dtype)[:4]  # W1, c1, W2, b2: the ops take Pdiv as an argument of its own
    C = torch.randn(K, H, H, dtype=dtype, requires_grad=True)
    P = torch.randn(K, D, H, dtype=dtype, requires_grad=True)

    def gr(*shape):
        return torch.randn(*shape, dtype=dtype)

    return {
        "potential_fwd": [(z, g, *pp), (z, g, *pp, True)],
        "potential_bwd": [(gr(B, D), gr(B), gr(B, K), gr(B, K), z, g, *pp),
                          (gr(B, D), None, None, None, z, g, *pp)],
        "hamiltonian_fwd": [(z, g, *hp, C), (z, g, *hp, None), (z, g, *hp, C, True)],
        "hamiltonian_bwd": [(gr(B, D), gr(B, K), z, g, *hp, C), (None, None, z, g, *hp, None)],
        "mlp_fwd": [(z, g, *mp, P), (z, g, *mp, None), (z, g, *mp, P, True), (z, g, *mp, None, True)],
        "mlp_bwd": [(gr(B, D), gr(B), gr(B, K), z, g, *mp, P), (gr(B, D), None, None, z, g, *mp, None)],
    }


@pytest.mark.parametrize("op", ["potential_bwd", "hamiltonian_bwd", "mlp_bwd"])
def test_unused_field_gets_exact_zero_gradients_whatever_its_parameters(cpu, op):
    """Field 1 is used by no sample and its parameters are NaN: its gradients are exactly 0 (no 0 * NaN)."""
    n_grad_outputs = {"potential_bwd": 4, "hamiltonian_bwd": 2, "mlp_bwd": 3}[op]
    for args in _op_samples()[op]:
        args = [None if a is None else a.detach().clone() for a in args]
        args[n_grad_outputs + 1][:, 1] = 0  # g
        for param in args[n_grad_outputs + 2:]:
            if param is not None:
                param[1] = float("nan")
        grads = getattr(torch.ops.sta, op)(*args)
        assert all(bool(torch.isfinite(t).all()) for t in grads), op
        for t in grads[2:]:  # per-field gradients: (K, ...), or (0,) for a matrix that was None
            assert t.numel() == 0 or bool((t[1] == 0).all()), op


@pytest.mark.parametrize("op", ["potential_fwd", "potential_bwd", "hamiltonian_fwd", "hamiltonian_bwd",
                                "mlp_fwd", "mlp_bwd"])
def test_opcheck(cpu, op):
    overload = getattr(torch.ops.sta, op).default
    for args in _op_samples()[op]:
        if op.endswith("_fwd"):
            torch.library.opcheck(overload, args)
            continue
        # A backward op runs inside backward (no grad mode); its autograd registration only
        # raises a clear error for double backward, which the autograd check below exercises.
        detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(overload, detached,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
        torch.library.opcheck(overload, args, test_utils=("test_autograd_registration",))


# ----------------------------------------------------------------------------------------------
# the mlp fields' divergence matrix Pdiv = W2 o W1^T (sta::divergence_matrix, tiled on the CPU)
# ----------------------------------------------------------------------------------------------

# (K, D, H): tile edges (64) crossed or not, D = 1, odd sizes, K = 0
DIVERGENCE_MATRIX_SHAPES = [(1, 1, 1), (3, 17, 5), (2, 65, 130), (1, 255, 3), (2, 64, 64), (0, 4, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("shape", DIVERGENCE_MATRIX_SHAPES, ids=[f"K{k}D{d}H{h}" for k, d, h in DIVERGENCE_MATRIX_SHAPES])
def test_divergence_matrix_is_the_strided_product_and_its_gradient(cpu, shape, dtype):
    """One product per element: forward and both gradients equal ATen's bit for bit."""
    K, D, H = shape
    W1 = torch.randn(K, H, D, dtype=dtype, requires_grad=True)
    W2 = torch.randn(K, D, H, dtype=dtype, requires_grad=True)
    G = torch.randn(K, D, H, dtype=dtype)
    P = torch.ops.sta.divergence_matrix(W1, W2)
    expected = W2 * W1.transpose(1, 2)
    assert torch.equal(P, expected.detach())
    assert torch.equal(torch.cat([g.flatten() for g in torch.autograd.grad(P, (W1, W2), G)]),
                       torch.cat([g.flatten() for g in torch.autograd.grad(expected, (W1, W2), G)]))


def test_divergence_matrix_takes_non_contiguous_weights(cpu):
    W1 = torch.randn(3, 9, 7, dtype=F64).transpose(1, 2)  # (3, 7, 9): K 3, H 7, D 9, strided
    W2 = torch.randn(3, 7, 9, dtype=F64).transpose(1, 2)  # (3, 9, 7)
    assert not W1.is_contiguous() and not W2.is_contiguous()
    assert torch.equal(torch.ops.sta.divergence_matrix(W1, W2), W2 * W1.transpose(1, 2))


def test_divergence_matrix_refuses_mismatched_weights(cpu):
    with pytest.raises(RuntimeError, match=r"W2 must be \(K, D, H\) = \(2, 5, 3\)"):
        torch.ops.sta.divergence_matrix(torch.randn(2, 3, 5), torch.randn(2, 3, 5))
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.sta.divergence_matrix(torch.randn(2, 3, 5), torch.randn(2, 5, 3, dtype=F64))


def test_divergence_matrix_opcheck(cpu):
    W1 = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    W2 = torch.randn(2, 5, 3, dtype=F64, requires_grad=True)
    torch.library.opcheck(torch.ops.sta.divergence_matrix.default, (W1, W2))
    detached = (torch.randn(2, 5, 3, dtype=F64), W1.detach(), W2.detach())
    torch.library.opcheck(torch.ops.sta.divergence_matrix_bwd.default, detached,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_cpu_backend_forms_the_divergence_matrix_with_its_kernel(cpu, monkeypatch):
    """A step (no prepared Pdiv) and a path both form Pdiv through sta::divergence_matrix."""
    calls = []
    kernel = torch.ops.sta.divergence_matrix

    class Spy:
        def __call__(self, *args):
            calls.append(args[0].shape)
            return kernel(*args)

    monkeypatch.setattr(torch.ops.sta, "divergence_matrix", Spy())
    fields = sta.FieldBank(6, 1, 2, 5, rotational="mlp").double()
    z = torch.randn(4, 6, dtype=F64)
    g_rot = coefficients((4, 2), "on", F64)
    sta.flow_step(z, 0.3, None, g_rot, fields, 0.1, ("z", "div"), backend="cpu")
    assert len(calls) == 1
    sta.flow_path(z, 0.3, None, g_rot[:, None].expand(4, 3, 2), fields, 0.1, ("z", "div"), backend="cpu")
    assert len(calls) == 2  # once for the three steps


# ----------------------------------------------------------------------------------------------
# saved rows: a forward with save=True hands its backward the rows it would otherwise recompute
# ----------------------------------------------------------------------------------------------

SAVED_CASES = [(9, 6, 7, 3, "mixed"), (5, 17, 4, 2, "on"), (6, 3, 5, 3, "off"), (0, 4, 3, 2, "mixed"),
               (7, 1, 1, 1, "mixed")]


@pytest.mark.parametrize("kind", ["potential", "hamiltonian", "mlp"])
@pytest.mark.parametrize("case", SAVED_CASES, ids=[f"B{c[0]}D{c[1]}H{c[2]}K{c[3]}-{c[4]}" for c in SAVED_CASES])
def test_saved_rows_give_the_recomputed_backward(cpu, kind, case):
    """save=True returns (B*K, H) / (B*K, D) rows; the backward given them equals the backward that
    recomputes them (every gradient, every optional output), and save=False returns (0,) tensors."""
    B, D, H, K, pattern = case
    z = torch.randn(B, D, dtype=F64)
    g = coefficients((B, K), pattern, F64, signed=True)
    p = [t.detach() for t in term_params(kind, K, H, D, F64) if t is not None]  # (no prepared Pdiv)
    if kind == "potential":
        *_, s, v = torch.ops.sta.potential_fwd(z, g, *p, True)
        assert s.shape == (B * K, H) and v.shape == (B * K, D)
        P = int((g != 0).sum())  # the rows past the active pairs' are zeros (a deterministic output)
        assert not s[P:].any() and not v[P:].any()
        assert [t.shape for t in torch.ops.sta.potential_fwd(z, g, *p)[4:]] == [(0,), (0,)]
        grad_outputs = [(torch.randn(B, D, dtype=F64), torch.randn(B, dtype=F64), torch.randn(B, K, dtype=F64),
                         torch.randn(B, K, dtype=F64)), (torch.randn(B, D, dtype=F64), None, None, None)]
        calls = [(lambda go, *saved: torch.ops.sta.potential_bwd(*go, z, g, *p, *saved), (s, v))]
    elif kind == "mlp":
        P = torch.randn(K, D, H, dtype=F64)
        *_, s, r, e = torch.ops.sta.mlp_fwd(z, g, *p, P, True)
        assert (s.shape, r.shape, e.shape) == ((B * K, H), (B * K, D), (B * K, D))
        *_, s0, r0, e0 = torch.ops.sta.mlp_fwd(z, g, *p, None, True)  # no divergence: e is not saved
        assert e0.shape == (0,) and r0.shape == (B * K, D)
        grad_outputs = [(torch.randn(B, D, dtype=F64), torch.randn(B, dtype=F64), torch.randn(B, K, dtype=F64)),
                        (torch.randn(B, D, dtype=F64), None, None)]
        calls = [(lambda go, *saved: torch.ops.sta.mlp_bwd(*go, z, g, *p, P, *saved), (s, r, e)),
                 (lambda go, *saved: torch.ops.sta.mlp_bwd(*go, z, g, *p, None, *saved), (s0, r0, e0))]
    else:
        C = torch.randn(K, H, H, dtype=F64)
        *_, s = torch.ops.sta.hamiltonian_fwd(z, g, *p, C, True)
        assert s.shape == (B * K, H)
        grad_outputs = [(torch.randn(B, D, dtype=F64), torch.randn(B, K, dtype=F64)),
                        (torch.randn(B, D, dtype=F64), None)]
        calls = [(lambda go, *saved: torch.ops.sta.hamiltonian_bwd(*go, z, g, *p, C, *saved), (s,))]
    for go in grad_outputs:
        for call, saved in calls:
            recomputed = call(go)
            given = call(go, *saved)
            assert_all_close(given, recomputed, range(len(given)), F64, what=f"{kind} grad ")
            again = call(go, *saved)  # the backward must not have written over the saved rows
            assert_all_close(again, recomputed, range(len(given)), F64, what=f"{kind} second grad ")


def test_saved_rows_of_the_wrong_shape_are_refused(cpu):
    z, g = torch.randn(4, 3, dtype=F64), coefficients((4, 2), "on", F64)
    p = [t.detach() for t in term_params("potential", 2, 5, 3, F64)]
    with pytest.raises(RuntimeError, match=r"s must be the rows its forward saved, \(B \* K, 5\) = \(8, 5\)"):
        torch.ops.sta.potential_bwd(torch.randn(4, 3, dtype=F64), None, None, None, z, g, *p,
                                    torch.randn(7, 5, dtype=F64))


def test_forward_saves_rows_only_when_a_backward_follows(cpu):
    """The backend asks the op to save only under grad mode with an input that requires grad."""
    z = torch.randn(4, 3, dtype=F64)
    g = coefficients((4, 2), "on", F64)
    p = term_params("potential", 2, 5, 3, F64)
    from sta.backends.compiled import _saving
    assert _saving(z, g, *p)
    with torch.no_grad():
        assert not _saving(z, g, *p)
    assert not _saving(z, g, *[t.detach() for t in p])


def test_double_backward_raises(cpu):
    z = torch.randn(4, 3, dtype=F64, requires_grad=True)
    g = coefficients((4, 2), "on", F64, signed=True)
    p = term_params("potential", 2, 5, 3, F64)
    div = cpu.potential_terms(z, g, p, ("div",)).div
    (gz,) = torch.autograd.grad(div.sum(), z, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gz.sum().backward()


@pytest.mark.parametrize("rotational", ["hamiltonian", "mlp"])
def test_torch_compile_fullgraph(cpu, rotational):
    torch._dynamo.reset()
    bank = field_bank(6, 8, 2, 2, rotational)
    z = torch.randn(7, 6, requires_grad=True)
    g_pot = coefficients((7, 2), "mixed", signed=True)
    g_rot = coefficients((7, 2), "mixed", signed=True)

    def step(z, g_pot, g_rot):
        out = sta.flow_step(z, 0.5, g_pot, g_rot, bank, outputs=("z", "div", "hj", "div_rot"), backend="cpu")
        return out.z, out.div, out.hj, out.div_rot

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager = step(z, g_pot, g_rot)
    got = compiled(z, g_pot, g_rot)
    assert_all_close(got, eager, ("z", "div", "hj", "div_rot"), F32)
    leaves = [z] + list(bank.parameters())
    assert_all_close(grads(sum(o.sum() for o in got), leaves), grads(sum(o.sum() for o in eager), leaves),
                     range(len(leaves)), F32, what="grad of input ")


# ----------------------------------------------------------------------------------------------
# dispatch: why_not reasons, auto, the build stamp
# ----------------------------------------------------------------------------------------------

def _request(device="cpu", dtype=F32):
    return Request("flow_step", torch.device(device), dtype)


def test_why_not_reasons(cpu):
    assert cpu.why_not(_request()) == []
    assert cpu.why_not(_request(dtype=F64)) == []
    (reason,) = cpu.why_not(_request(dtype=torch.bfloat16))
    assert "bfloat16" in reason and "float32" in reason
    (reason,) = cpu.why_not(_request(device="meta"))
    assert "meta" in reason and "CPU tensors" in reason


def test_why_not_when_not_built(cpu, monkeypatch):
    monkeypatch.setattr(_extension, "_module", None)
    monkeypatch.setattr(_extension, "_error", "compiling sta._C failed (boom); rebuild it: "
                        + _extension.REBUILD_COMMAND)
    (reason,) = cpu.why_not(_request())
    assert "boom" in reason and "pip install" in reason
    assert "unavailable" in _extension.status()


def test_status_says_why_the_cuda_kernels_were_not_built(cpu):
    if getattr(_extension.load(), "WITH_CUDA", 0):
        assert "with CUDA" in _extension.status()
    elif torch.version.cuda is None:  # issue 5: sta.info shows what was built and why
        assert "CPU kernels only" in _extension.status() and "has no CUDA" in _extension.status()
    else:
        assert "CPU kernels only (" in _extension.status()


def test_stale_build_is_refused():
    stale = types.SimpleNamespace(TORCH_VERSION="1.0.0")
    reason = _extension._check_version(stale, "sta._C")
    assert "1.0.0" in reason and torch.__version__ in reason and "pip install" in reason
    assert _extension._check_version(types.SimpleNamespace(TORCH_VERSION=torch.__version__.split("+")[0]),
                                     "sta._C") is None


def test_auto_picks_cpu(cpu, monkeypatch):
    monkeypatch.delenv("STA_BACKEND", raising=False)
    assert backends.select(_request(), "auto").name == "cpu"
    assert backends.select(_request(dtype=torch.float16), "auto").name == "torch"
    with pytest.raises(backends.BackendUnavailableError, match="cpu"):
        backends.select(_request(dtype=torch.float16), "cpu")
