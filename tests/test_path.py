"""sta.flow_path: equal to T chained flow_step calls, forward and every gradient, on every backend."""
import pytest
import torch

import sta
from sta.backends import BackendUnavailableError
from sta.path import chained_flow_path
from sta.reference import mlp_divergence_matrix
from tests.tolerances import assert_close

OUTPUTS = ("z", "div", "hj", "div_rot", "curl", "u")
# (backend, dtype): float64 on torch and cpu (1e-10), float32 on triton under the interpreter,
# cuda (float32) only with a GPU.
CASES = [("torch", torch.float64), ("cpu", torch.float64), ("triton", torch.float32), ("cuda", torch.float32)]
CONSTRUCTIONS = [("hamiltonian", None), ("hamiltonian", 2), ("mlp", None)]


def _bank(construction, rank, dtype, device, D=5, Kp=3, Kr=2, H=6):
    torch.manual_seed(1)
    return sta.FieldBank(D, Kp, Kr, H, construction, rank).to(device=device, dtype=dtype)


def _coefficients(B, T, K, pattern, dtype, device):
    g = torch.rand(B, T, K, dtype=dtype, device=device) + 0.1
    if pattern == "off":
        return torch.zeros_like(g)
    if pattern == "mixed":
        return g * (torch.rand(B, T, K, device=device) > 0.5)
    return g


def _device(backend):
    return torch.device("cuda") if backend in ("cuda",) or (backend == "triton" and torch.cuda.is_available()) \
        else torch.device("cpu")


STEPS_AND_PATTERNS = [(1, "mixed"), (3, "off"), (3, "mixed"), (3, "on"), (8, "mixed")]


def _path_cases():
    """(backend, dtype, T, pattern) for every case; cuda needs a GPU, and Triton under the interpreter
    beyond T = 1 is ``slow`` (2-10 s a case; the quick run keeps T = 1 and the parity matrix's
    Triton flow_path rows)."""
    for backend, dtype in CASES:
        for T, pattern in STEPS_AND_PATTERNS:
            marks = [pytest.mark.gpu] if backend == "cuda" else []
            if backend == "triton" and T > 1 and not torch.cuda.is_available():
                marks.append(pytest.mark.slow)
            yield pytest.param(backend, dtype, T, pattern, marks=marks, id=f"{backend}-T{T}-{pattern}")


@pytest.mark.parametrize("construction,rank", CONSTRUCTIONS)
@pytest.mark.parametrize("backend,dtype,T,pattern", list(_path_cases()))
def test_flow_path_equals_chained_flow_step(backend, dtype, construction, rank, T, pattern, one_thread):
    device = _device(backend)
    fields = _bank(construction, rank, dtype, device)
    B, dt, t0 = 4, 0.3, 0.25
    z0 = torch.randn(B, fields.dim, dtype=dtype, device=device, requires_grad=True)
    g_pot = _coefficients(B, T, fields.num_potential, pattern, dtype, device).requires_grad_()
    g_rot = _coefficients(B, T, fields.num_rotational, pattern, dtype, device).requires_grad_()
    outputs = OUTPUTS if construction != "mlp" else tuple(o for o in OUTPUTS if o != "curl")
    got = sta.flow_path(z0, t0, g_pot, g_rot, fields, dt=dt, outputs=outputs, backend=backend)
    want = chained_flow_path(z0, t0, g_pot, g_rot, fields, dt=dt, outputs=outputs, backend=backend)._asdict()
    for name in outputs:
        assert_close(getattr(got, name), want[name], dtype, what=f"{backend} {name}")
    inputs = [z0, g_pot, g_rot] + list(fields.parameters())
    weights = {name: torch.randn_like(want[name]) for name in outputs}  # a random cotangent per output

    def loss(outs):
        return sum((outs[n] * weights[n]).sum() for n in outputs)

    grads_got = torch.autograd.grad(loss(got._asdict()), inputs, allow_unused=True)
    grads_want = torch.autograd.grad(loss(want), inputs, allow_unused=True)
    names = ["z0", "g_pot", "g_rot"] + [n for n, _ in fields.named_parameters()]
    for name, a, b in zip(names, grads_got, grads_want):
        if b is None:
            assert a is None or not a.abs().max() > 0, f"{backend} grad {name}: only flow_path has a gradient"
        else:
            assert a is not None, f"{backend} grad {name}: missing"
            assert_close(a, b, dtype, what=f"{backend} grad {name}")
    if pattern == "off":  # nothing active: z never moves and no parameter receives a gradient
        assert torch.equal(got.z, z0.detach()[:, None].expand(-1, T + 1, -1))
        for name, a in zip(names[3:], grads_got[3:]):
            assert a is None or torch.count_nonzero(a) == 0, name


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_flow_path_empty_batch_and_zero_steps(backend):
    fields = _bank("hamiltonian", None, torch.float64, "cpu")
    z0 = torch.zeros(0, fields.dim, dtype=torch.float64)
    out = sta.flow_path(z0, 0.0, torch.zeros(0, 3, 3, dtype=torch.float64), None, fields,
                        outputs=("z", "div", "hj"), backend=backend)
    assert out.z.shape == (0, 4, fields.dim) and out.div.shape == (0, 3) and out.hj.shape == (0, 3, 3)
    z0 = torch.randn(2, fields.dim, dtype=torch.float64)
    out = sta.flow_path(z0, 0.0, torch.zeros(2, 0, 3, dtype=torch.float64), None, fields,
                        outputs=("z", "div", "u"), backend=backend)
    assert torch.equal(out.z[:, 0], z0) and out.z.shape == (2, 1, fields.dim)
    assert out.div.shape == (2, 0) and out.u.shape == (2, 0, 3)


def test_flow_path_gradcheck_float64():
    """Finite differences wrt z0, t0 and the coefficients (all non-zero: a zero coefficient's
    gradient is 0 by contract, which finite differences across 0 do not see)."""
    fields = _bank("hamiltonian", None, torch.float64, "cpu", D=3, Kp=2, Kr=1, H=3)
    z0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t0 = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    g_pot = (torch.rand(2, 2, 2, dtype=torch.float64) + 0.5).requires_grad_()
    g_rot = (torch.rand(2, 2, 1, dtype=torch.float64) + 0.5).requires_grad_()

    def fn(z0, t0, g_pot, g_rot):
        out = sta.flow_path(z0, t0, g_pot, g_rot, fields, outputs=("z", "div", "hj"), backend="torch")
        return out.z, out.div, out.hj

    assert torch.autograd.gradcheck(fn, (z0, t0, g_pot, g_rot))


def test_flow_path_bad_inputs_name_the_argument():
    fields = _bank("hamiltonian", None, torch.float32, "cpu")
    z0 = torch.randn(2, fields.dim)
    with pytest.raises(ValueError, match="g_pot, g_rot"):
        sta.flow_path(z0, 0.0, None, None, fields)
    with pytest.raises(ValueError, match="g_pot: expected shape"):
        sta.flow_path(z0, 0.0, torch.zeros(2, 3), None, fields)
    with pytest.raises(ValueError, match="g_rot: expected shape"):
        sta.flow_path(z0, 0.0, torch.zeros(2, 3, 3), torch.zeros(2, 4, 2), fields)
    with pytest.raises(TypeError, match="g_pot: expected dtype"):
        sta.flow_path(z0, 0.0, torch.zeros(2, 3, 3, dtype=torch.float64), None, fields)
    with pytest.raises(ValueError, match="z0: expected shape"):
        sta.flow_path(z0[0], 0.0, torch.zeros(2, 3, 3), None, fields)
    with pytest.raises(TypeError, match="fields"):
        sta.flow_path(z0, 0.0, torch.zeros(2, 3, 3), None, object())
    with pytest.raises(ValueError, match="dt"):
        sta.flow_path(z0, 0.0, torch.zeros(2, 3, 3), None, fields, dt=float("nan"))
    with pytest.raises(BackendUnavailableError):
        sta.flow_path(z0, 0.0, torch.zeros(2, 3, 3), None, fields, backend="cuda")


def test_flow_path_prepares_the_skew_product_once(monkeypatch):
    """M = A W^T (the costly per-step product of the hamiltonian fields) is formed once per path."""
    fields = _bank("hamiltonian", None, torch.float32, "cpu")
    calls = []
    original = type(fields.rotational).skew

    def counting_skew(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(fields.rotational), "skew", counting_skew)
    sta.flow_path(torch.randn(2, fields.dim), 0.0, torch.rand(2, 8, 3), torch.rand(2, 8, 2), fields)
    assert len(calls) == 1


def _opcheck_cases():
    for backend, dtype in CASES:
        for construction in ("hamiltonian", "mlp"):
            marks = [pytest.mark.gpu] if backend == "cuda" else []
            if backend == "triton" and not torch.cuda.is_available():
                marks.append(pytest.mark.slow)  # the interpreter: ~5 s a case
            yield pytest.param(backend, dtype, construction, marks=marks, id=f"{backend}-{construction}")


@pytest.mark.parametrize("backend,dtype,construction", list(_opcheck_cases()))
def test_flow_path_op_passes_opcheck(backend, dtype, construction, one_thread):
    """torch.ops.sta.flow_path (the registered op under sta.flow_path): schema, autograd
    registration, fake tensors and AOT dispatch with dynamic shapes, with mixed sparsity."""
    device = _device(backend)
    fields = _bank(construction, None, dtype, device)
    B, T = 4, 3
    z0 = torch.randn(B, fields.dim, dtype=dtype, device=device, requires_grad=True)
    g_pot = _coefficients(B, T, fields.num_potential, "mixed", dtype, device).requires_grad_()
    g_rot = _coefficients(B, T, fields.num_rotational, "mixed", dtype, device).requires_grad_()
    times = 0.25 + 0.5 * torch.arange(T, dtype=dtype, device=device)
    potential = [p.detach().requires_grad_() for p in fields.potential.prepare(times)]
    prepared = fields.rotational.prepare(times)
    if construction == "mlp":  # with the divergence matrix, as sta.flow_path prepares it
        prepared = prepared._replace(Pdiv=mlp_divergence_matrix(prepared))
    rotational = [p.detach().requires_grad_() for p in prepared]
    outputs = [o for o in OUTPUTS if construction != "mlp" or o != "curl"]
    sta.flow_path(z0, 0.0, g_pot, g_rot, fields, backend=backend)  # the public path reaches the op
    result = torch.library.opcheck(torch.ops.sta.flow_path.default,
                                   (z0, g_pot, g_rot, potential, rotational, construction, 0.5, outputs, backend))
    assert set(result.values()) == {"SUCCESS"}, result


def test_flow_path_runs_as_one_registered_op(monkeypatch):
    """sta.flow_path hands its T steps to torch.ops.sta.flow_path, once per call."""
    import sta.path as path_module

    calls = []
    original = path_module.flow_path_op

    def spy(*args):
        calls.append(args[-1])
        return original(*args)

    monkeypatch.setattr(path_module, "flow_path_op", spy)
    fields = _bank("hamiltonian", None, torch.float64, "cpu")
    sta.flow_path(torch.randn(2, fields.dim, dtype=torch.float64), 0.0, torch.rand(2, 3, 3, dtype=torch.float64),
                  None, fields, backend="cpu")
    assert calls == ["cpu"]


def test_flow_path_forms_the_mlp_divergence_matrix_once(monkeypatch):
    """Pdiv = W2 o W1^T does not depend on t: every step of a path gets the same prepared matrix,
    and a path that needs no divergence prepares none."""
    from sta.backends.compiled import CompiledFlowStep

    seen = []
    original = CompiledFlowStep.mlp_terms

    def spy(self, z, g, p, want=("div",)):
        seen.append(p.Pdiv)
        return original(self, z, g, p, want)

    monkeypatch.setattr(CompiledFlowStep, "mlp_terms", spy)
    fields = _bank("mlp", None, torch.float64, "cpu")
    z0 = torch.randn(4, fields.dim, dtype=torch.float64)
    g_rot = _coefficients(4, 3, fields.num_rotational, "on", torch.float64, "cpu")
    sta.flow_path(z0, 0.0, None, g_rot, fields, outputs=("z", "div"), backend="cpu")
    assert len(seen) == 3 and seen[0] is not None and all(P is seen[0] for P in seen)
    seen.clear()
    sta.flow_path(z0, 0.0, None, g_rot, fields, outputs=("z",), backend="cpu")
    assert seen == [None, None, None]
