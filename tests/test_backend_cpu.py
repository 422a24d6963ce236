"""The ``cpu`` backend (C++ in csrc/cpu, ``torch.ops.sta.*``) against the reference.

Parity in float32 and float64 (tests/tolerances.py), forward and every gradient, for the three
field kinds at term level and for ``sta.flow_step`` end to end (z, t, g_pot, g_rot and every
field parameter); odd shapes, B = 0, non-contiguous inputs and grad outputs, all-off and all-on
coefficients; ``opcheck`` on every op; ``torch.compile(fullgraph=True)``; the dispatcher's reasons.
The extension is built by ``pip install`` or compiled on first use (sta/_extension.py); if it
cannot be, these tests fail with the reason rather than skip (CI must build it).
"""
import types

import pytest
import torch

import sta
from sta import _extension, backends, reference
from sta.backends import Request
from tests.tolerances import assert_close

F32, F64 = torch.float32, torch.float64
DTYPES = [F32, F64]
ALL = sta.OUTPUT_NAMES


@pytest.fixture(scope="module")
def cpu():
    module = _extension.load()
    assert module is not None, f"the C++ extension must build here: {_extension.error()}"
    backend = backends.get_backend("cpu")
    assert backend.unavailable() == [], backend.unavailable()
    return backend


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _coefficients(B, K, pattern, dtype):
    g = (torch.rand(B, K, dtype=dtype) + 0.5) * torch.where(torch.rand(B, K) < 0.5, -1.0, 1.0).to(dtype)
    if pattern == "mixed":
        g = g * (torch.rand(B, K) < 0.5)
    elif pattern == "inactive":
        g = g * 0
    return g


def _params(kind, K, H, D, dtype):
    """Random per-step parameters with the scales of a trained model (|W z| ~ 1)."""
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_()
    if kind == "potential":
        return reference.PotentialParams(r(K, H, D, scale=D ** -0.5), r(K, H, scale=0.5), r(K, H), r(K, H))
    if kind == "hamiltonian":
        return reference.HamiltonianParams(r(K, H, D, scale=D ** -0.5), r(K, H, scale=0.5), r(K, H),
                                           r(K, D, H, scale=H ** -0.5))
    return reference.MLPParams(r(K, H, D, scale=D ** -0.5), r(K, H, scale=0.5), r(K, D, H, scale=H ** -0.5),
                               r(K, D, scale=0.5))


WANT = {"potential": ("curl", "div", "hj", "u"), "hamiltonian": ("curl", "div", "div_rot"),
        "mlp": ("curl", "div", "div_rot")}


def _terms(impl, kind, z, g, p, want):
    return getattr(impl, f"{kind}_terms")(z, g, p, want)


def _weighted_sum(outs, seed=1234):
    """A scalar touching every output with fixed random weights (same weights for both sides)."""
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for o in outs:
        if o is not None and o.requires_grad:
            total = total + (o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)).sum()
    return total


def _grads(loss, leaves):
    if not isinstance(loss, torch.Tensor):
        return [torch.zeros_like(x) for x in leaves]
    gs = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, leaves)]


def _check_terms(cpu, kind, z, g, p, want, dtype, grad_outputs=None):
    leaves = [z, g] + list(p)
    expected = _terms(backends.get_backend("torch"), kind, z, g, p, want)
    actual = _terms(cpu, kind, z, g, p, want)
    for name in expected._fields:
        assert_close(getattr(actual, name), getattr(expected, name), dtype, what=f"{kind}.{name}")
    if grad_outputs is None:
        loss_e, loss_a = _weighted_sum(expected), _weighted_sum(actual)
    else:
        loss_e = sum((o * w).sum() for o, w in zip(expected, grad_outputs) if o is not None and o.requires_grad)
        loss_a = sum((o * w).sum() for o, w in zip(actual, grad_outputs) if o is not None and o.requires_grad)
    names = ["z", "g"] + list(type(p)._fields)
    for name, ge, ga in zip(names, _grads(loss_e, leaves), _grads(loss_a, leaves)):
        assert_close(ga, ge, dtype, what=f"{kind} grad {name}")
    return actual


# ----------------------------------------------------------------------------------------------
# term-level parity: the foundation shapes, sampled
# ----------------------------------------------------------------------------------------------

# (B, D, H, K): every D in {1, 3, 17, 64}, H in {1, 5, 32}, K in {0, 1, 3} appears, mixed sparsity
SHAPES = [(7, 1, 1, 1), (9, 3, 5, 3), (10, 17, 32, 3), (6, 64, 5, 0), (8, 64, 32, 1), (5, 17, 1, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("kind", ["potential", "hamiltonian", "mlp"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}D{d}H{h}K{k}" for b, d, h, k in SHAPES])
def test_terms_parity(cpu, shape, kind, dtype):
    B, D, H, K = shape
    z = torch.randn(B, D, dtype=dtype, requires_grad=True)
    g = _coefficients(B, K, "mixed", dtype).requires_grad_()
    _check_terms(cpu, kind, z, g, _params(kind, K, H, D, dtype), WANT[kind], dtype)


@pytest.mark.parametrize("kind", ["potential", "hamiltonian", "mlp"])
@pytest.mark.parametrize("want", [(), ("div",), ("hj",), ("curl",), ("div_rot",)])
def test_terms_output_subsets(cpu, kind, want):
    """Each optional output alone (the ops skip the branches whose outputs get no gradient)."""
    z = torch.randn(9, 6, dtype=F64, requires_grad=True)
    g = _coefficients(9, 3, "mixed", F64).requires_grad_()
    _check_terms(cpu, kind, z, g, _params(kind, 3, 7, 6, F64), want, F64)


@pytest.mark.parametrize("pattern", ["inactive", "active"])
@pytest.mark.parametrize("kind", ["potential", "hamiltonian", "mlp"])
def test_terms_all_off_all_on(cpu, kind, pattern):
    z = torch.randn(11, 5, dtype=F32, requires_grad=True)
    g = _coefficients(11, 3, pattern, F32).requires_grad_()
    out = _check_terms(cpu, kind, z, g, _params(kind, 3, 8, 5, F32), WANT[kind], F32)
    if pattern == "inactive":
        assert torch.equal(out.velocity, torch.zeros_like(out.velocity))


@pytest.mark.parametrize("kind", ["potential", "hamiltonian", "mlp"])
def test_terms_wide_and_empty(cpu, kind):
    """D = 255 (not a multiple of any vector width) and B = 0."""
    z = torch.randn(6, 255, dtype=F32, requires_grad=True)
    g = _coefficients(6, 3, "mixed", F32).requires_grad_()
    _check_terms(cpu, kind, z, g, _params(kind, 3, 20, 255, F32), WANT[kind], F32)
    z0 = torch.randn(0, 4, dtype=F32, requires_grad=True)
    g0 = torch.zeros(0, 2, dtype=F32, requires_grad=True)
    _check_terms(cpu, kind, z0, g0, _params(kind, 2, 3, 4, F32), WANT[kind], F32)


@pytest.mark.parametrize("kind", ["potential", "hamiltonian", "mlp"])
def test_terms_non_contiguous(cpu, kind):
    """Non-contiguous z, g, parameters and grad outputs."""
    B, D, H, K = 8, 6, 5, 3
    z = torch.randn(D, B, dtype=F64).t().requires_grad_()
    g = _coefficients(K, 2 * B, "mixed", F64)[:, ::2].t().requires_grad_()
    assert not z.is_contiguous() and not g.is_contiguous()
    p = _params(kind, K, H, D, F64)
    p = type(p)(*[x.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_() for x in p])
    want = WANT[kind]
    ref = _terms(backends.get_backend("torch"), kind, z, g, p, want)
    grad_outputs = [None if o is None else torch.randn(*reversed(o.shape), dtype=F64).permute(*reversed(range(o.dim()))) for o in ref]
    for w in grad_outputs:
        assert w is None or w.dim() < 2 or not w.is_contiguous()
    _check_terms(cpu, kind, z, g, p, want, F64, grad_outputs=grad_outputs)


# ----------------------------------------------------------------------------------------------
# flow_step end to end: gradients in t and every field parameter
# ----------------------------------------------------------------------------------------------

def _bank(D, H, Kp, Kr, rotational, dtype):
    bank = sta.FieldBank(D, Kp, Kr, H, rotational=rotational).to(dtype)
    with torch.no_grad():  # non-trivial time dependence, so de/dt and t carry gradients
        bank.potential.time.weight.normal_(0, 0.5)
        bank.rotational.time.weight.normal_(0, 0.5)
    return bank


FLOW_CASES = [  # (D, H, Kp, Kr, rotational)
    (3, 5, 3, 1, "hamiltonian"), (17, 32, 1, 3, "mlp"), (64, 5, 0, 3, "hamiltonian"),
    (1, 1, 3, 0, "mlp"), (17, 1, 1, 1, "hamiltonian"), (3, 32, 3, 3, "mlp"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", FLOW_CASES, ids=[f"D{c[0]}H{c[1]}Kp{c[2]}Kr{c[3]}{c[4]}" for c in FLOW_CASES])
def test_flow_step_parity(cpu, case, dtype):
    D, H, Kp, Kr, rotational = case
    B = 9
    bank = _bank(D, H, Kp, Kr, rotational, dtype)
    z = torch.randn(B, D, dtype=dtype, requires_grad=True)
    t = torch.tensor(0.7, dtype=dtype, requires_grad=True)
    g_pot = _coefficients(B, Kp, "mixed", dtype).requires_grad_()
    g_rot = _coefficients(B, Kr, "mixed", dtype).requires_grad_()
    leaves = [z, t, g_pot, g_rot] + list(bank.parameters())
    names = ["z", "t", "g_pot", "g_rot"] + [n for n, _ in bank.named_parameters()]
    outs = {}
    for backend in ("torch", "cpu"):
        out = sta.flow_step(z, t, g_pot, g_rot, bank, dt=0.3, outputs=ALL, backend=backend)
        outs[backend] = (out, _grads(_weighted_sum(out), leaves))
    (e, ge), (a, ga) = outs["torch"], outs["cpu"]
    for name in ALL:
        assert_close(getattr(a, name), getattr(e, name), dtype, what=name)
    for name, x, y in zip(names, ga, ge):
        assert_close(x, y, dtype, what=f"grad {name}")


def test_flow_step_div_hj_gradients_only(cpu):
    """Gradients through div and hj alone (the log-density and HJ losses of training)."""
    bank = _bank(7, 9, 3, 2, "mlp", F64)
    z = torch.randn(10, 7, dtype=F64, requires_grad=True)
    g_pot = _coefficients(10, 3, "mixed", F64).requires_grad_()
    g_rot = _coefficients(10, 2, "mixed", F64).requires_grad_()
    leaves = [z, g_pot, g_rot] + list(bank.parameters())
    res = []
    for backend in ("torch", "cpu"):
        out = sta.flow_step(z, 0.2, g_pot, g_rot, bank, outputs=("div", "hj", "div_rot"), backend=backend)
        loss = out.div.square().sum() + out.hj.square().sum() + out.div_rot.sum()
        res.append(_grads(loss, leaves))
    for x, y in zip(res[1], res[0]):
        assert_close(x, y, F64, what="grad via div/hj")


# ----------------------------------------------------------------------------------------------
# the torch op library: opcheck, torch.compile
# ----------------------------------------------------------------------------------------------

def _op_samples(dtype=F64):
    B, D, H, K = 5, 4, 3, 3
    z = torch.randn(B, D, dtype=dtype, requires_grad=True)
    g = _coefficients(B, K, "mixed", dtype).requires_grad_()
    pp = _params("potential", K, H, D, dtype)
    hp = _params("hamiltonian", K, H, D, dtype)
    mp = _params("mlp", K, H, D, dtype)
    C = torch.randn(K, H, H, dtype=dtype, requires_grad=True)
    P = torch.randn(K, D, H, dtype=dtype, requires_grad=True)

    def gr(*shape):
        return torch.randn(*shape, dtype=dtype)

    return {
        "potential_fwd": [(z, g, *pp)],
        "potential_bwd": [(gr(B, D), gr(B), gr(B, K), gr(B, K), z, g, *pp),
                          (gr(B, D), None, None, None, z, g, *pp)],
        "hamiltonian_fwd": [(z, g, *hp, C), (z, g, *hp, None)],
        "hamiltonian_bwd": [(gr(B, D), gr(B, K), z, g, *hp, C), (None, None, z, g, *hp, None)],
        "mlp_fwd": [(z, g, *mp, P), (z, g, *mp, None)],
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


def test_double_backward_raises(cpu):
    z = torch.randn(4, 3, dtype=F64, requires_grad=True)
    g = _coefficients(4, 2, "active", F64)
    p = _params("potential", 2, 5, 3, F64)
    div = cpu.potential_terms(z, g, p, ("div",)).div
    (gz,) = torch.autograd.grad(div.sum(), z, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gz.sum().backward()


@pytest.mark.parametrize("rotational", ["hamiltonian", "mlp"])
def test_torch_compile_fullgraph(cpu, rotational):
    torch._dynamo.reset()
    bank = _bank(6, 8, 2, 2, rotational, F32)
    z = torch.randn(7, 6, requires_grad=True)
    g_pot = _coefficients(7, 2, "mixed", F32)
    g_rot = _coefficients(7, 2, "mixed", F32)

    def step(z, g_pot, g_rot):
        out = sta.flow_step(z, 0.5, g_pot, g_rot, bank, outputs=("z", "div", "hj", "div_rot"), backend="cpu")
        return out.z, out.div, out.hj, out.div_rot

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager = step(z, g_pot, g_rot)
    got = compiled(z, g_pot, g_rot)
    for a, e in zip(got, eager):
        assert_close(a, e, F32)
    ge = torch.autograd.grad(sum(o.sum() for o in eager), [z] + list(bank.parameters()))
    ga = torch.autograd.grad(sum(o.sum() for o in got), [z] + list(bank.parameters()))
    for a, e in zip(ga, ge):
        assert_close(a, e, F32)


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
