"""sta.flow_step: gradients, sparsity, input validation and backend dispatch (reference backend)."""
import os
import re
import subprocess
import sys

import pytest
import torch

import sta
from sta import backends
from tests.parity import field_bank, require
from tests.tolerances import assert_close, assert_same_nonfinite

ALL = sta.OUTPUT_NAMES


def _bank(D=4, H=3, Kp=2, Kr=2, rotational="hamiltonian", rank=None, dtype=torch.float64):
    """This file's default bank (float64, tiny)."""
    return field_bank(D, H, Kp, Kr, rotational, rank, dtype)


def _step_fn(bank, outputs, backend="torch"):
    """(z, t, g_pot, g_rot, *params) -> every requested output concatenated, for gradcheck."""
    names = [n for n, _ in bank.named_parameters()]

    def fn(z, t, g_pot, g_rot, *params):
        with _swapped(bank, dict(zip(names, params))):
            res = sta.flow_step(z, t, g_pot, g_rot, bank, dt=0.7, outputs=outputs, backend=backend)
        return tuple(getattr(res, n) for n in outputs)

    return fn, [p.detach().clone().requires_grad_(True) for p in bank.parameters()]


class _swapped:
    """Temporarily replace a module's parameters by given tensors (so gradcheck can perturb them)."""

    def __init__(self, module, tensors):
        self.module, self.tensors, self.saved = module, tensors, {}

    def __enter__(self):
        for name, tensor in self.tensors.items():
            owner, attr = self._owner(name)
            self.saved[name] = owner._parameters[attr]
            owner._parameters[attr] = tensor

    def __exit__(self, *exc):
        for name, param in self.saved.items():
            owner, attr = self._owner(name)
            owner._parameters[attr] = param

    def _owner(self, name):
        *path, attr = name.split(".")
        owner = self.module
        for part in path:
            owner = getattr(owner, part)
        return owner, attr


@pytest.mark.parametrize("rotational,rank", [("hamiltonian", None), ("hamiltonian", 2), ("mlp", None)])
def test_gradcheck_every_input_and_parameter(rotational, rank):
    """float64 gradcheck w.r.t. z, t, g_pot, g_rot and every parameter, through z, div, hj, u, div_rot, curl."""
    bank = _bank(rotational=rotational, rank=rank)
    fn, params = _step_fn(bank, ALL)
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    g_pot = (torch.rand(3, 2, dtype=torch.float64) + 0.5).requires_grad_(True)  # all active: see test below
    g_rot = (torch.rand(3, 2, dtype=torch.float64) - 1.5).requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (z, t, g_pot, g_rot, *params), eps=1e-6, atol=1e-7)


def test_gradgradcheck_potential_step():
    """Second derivatives (used when a loss contains gradients of the step) are consistent too."""
    bank = _bank(D=3, H=2, Kp=2, Kr=1)
    fn, _ = _step_fn(bank, ("z", "div", "hj"))
    z = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    g = torch.rand(2, 2, dtype=torch.float64) + 0.5
    gr = torch.rand(2, 1, dtype=torch.float64) + 0.5
    assert torch.autograd.gradgradcheck(lambda x: fn(x, 0.3, g, gr, *bank.parameters()), (z,))


@pytest.mark.parametrize("rotational", ["hamiltonian", "mlp"])
def test_gradcheck_with_sparse_coefficients(rotational):
    """With some pairs inactive (g fixed), gradients w.r.t. z and parameters are still exact."""
    bank = _bank(rotational=rotational)
    fn, params = _step_fn(bank, ("z", "div", "hj", "curl"))
    z = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    g_pot = torch.tensor([[1.0, 0], [0, 0], [0.3, -2], [0, 1]], dtype=torch.float64)
    g_rot = torch.tensor([[0, 0], [1.0, 0], [0.5, 0.5], [0, 0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, *p: fn(x, 0.1, g_pot, g_rot, *p), (z, *params), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("rotational", ["hamiltonian", "mlp"])
def test_inactive_field_does_nothing(rotational):
    """With field 1's g columns all zero, its parameters change no output and get exactly zero grads."""
    bank = _bank(rotational=rotational)
    z = torch.randn(5, 4, dtype=torch.float64)
    g = torch.rand(5, 2, dtype=torch.float64) + 0.5
    g[:, 1] = 0
    out = sta.flow_step(z, 0.2, g, g, bank, outputs=ALL, backend="torch")
    loss = sum(o.square().sum() for o in out if o is not None)
    loss.backward()
    for name, p in bank.named_parameters():
        if p.grad is None:
            continue
        assert p.grad[1].abs().max().item() == 0.0, f"{name}[1] got a gradient"
    assert any(p.grad is not None and p.grad[0].abs().max().item() > 0 for p in bank.parameters())
    with torch.no_grad():
        for p in bank.parameters():
            p[1] += torch.randn_like(p[1])
    out2 = sta.flow_step(z, 0.2, g, g, bank, outputs=ALL, backend="torch")
    for name in ALL:
        assert torch.equal(getattr(out, name), getattr(out2, name)), name


def test_zero_coefficient_gets_zero_gradient():
    """The sparsity contract: an inactive pair is not evaluated, so d out / d g[b,k] = 0 there."""
    bank = _bank()
    z = torch.randn(3, 4, dtype=torch.float64)
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]], dtype=torch.float64, requires_grad=True)
    out = sta.flow_step(z, 0.0, g, None, bank, backend="torch")
    (out.z.sum() + out.div.sum()).backward()
    assert g.grad[0, 1].item() == 0.0 and g.grad[1, 0].item() == 0.0
    assert g.grad[0, 0].item() != 0.0 and g.grad[2, 1].item() != 0.0


def test_all_inactive_is_identity_and_all_active_moves_every_sample():
    bank = _bank()
    z = torch.randn(6, 4, dtype=torch.float64)
    out = sta.flow_step(z, 0.0, torch.zeros(6, 2, dtype=torch.float64), None, bank, outputs=ALL, backend="torch")
    assert torch.equal(out.z, z) and torch.equal(out.div, torch.zeros(6, dtype=torch.float64))
    for name in ("hj", "u", "div_rot", "curl"):
        assert torch.equal(getattr(out, name), torch.zeros_like(getattr(out, name)))
    on = sta.flow_step(z, 0.0, torch.ones(6, 2, dtype=torch.float64), torch.ones(6, 2, dtype=torch.float64), bank,
                       backend="torch")
    assert ((on.z - z).norm(dim=1) > 0).all()


def test_empty_batch_and_noncontiguous_inputs():
    bank = _bank(D=5)
    z0 = torch.zeros(0, 5, dtype=torch.float64)
    out = sta.flow_step(z0, 0.0, torch.zeros(0, 2, dtype=torch.float64), torch.zeros(0, 2, dtype=torch.float64),
                        bank, outputs=ALL, backend="torch")
    assert out.z.shape == (0, 5) and out.div.shape == (0,) and out.curl.shape == (0, 4)
    zt = torch.randn(5, 6, dtype=torch.float64).T[:, :5]  # (6, 5) non-contiguous
    gt = torch.randn(2, 6, dtype=torch.float64).T
    assert not zt.is_contiguous() and not gt.is_contiguous()
    a = sta.flow_step(zt, 0.1, gt, gt, bank, outputs=ALL, backend="torch")
    b = sta.flow_step(zt.contiguous(), 0.1, gt.contiguous(), gt.contiguous(), bank, outputs=ALL, backend="torch")
    for name in ALL:
        assert_close(getattr(a, name), getattr(b, name), what=name)


def test_outputs_selects_what_is_returned():
    bank = _bank()
    z = torch.randn(2, 4, dtype=torch.float64)
    g = torch.ones(2, 2, dtype=torch.float64)
    out = sta.flow_step(z, 0.0, g, g, bank, outputs=("div",), backend="torch")
    assert out.z is None and out.div is not None and out.hj is None
    out = sta.flow_step(z, 0.0, g, g, bank, outputs="hj", backend="torch")
    assert out.hj.shape == (2, 2) and out.div is None


def test_time_gradient_flows_through_hj():
    bank = _bank()
    z = torch.randn(3, 4, dtype=torch.float64)
    t = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    out = sta.flow_step(z, t, torch.ones(3, 2, dtype=torch.float64), None, bank, outputs=("hj",), backend="torch")
    (grad,) = torch.autograd.grad(out.hj.sum(), t)
    assert torch.isfinite(grad) and grad.item() != 0.0


# ---------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument.
# ---------------------------------------------------------------------------------------------

def _valid():
    bank = sta.FieldBank(4, 2, 3, 5)
    return dict(z=torch.randn(3, 4), t=0.0, g_pot=torch.ones(3, 2), g_rot=torch.ones(3, 3), fields=bank)


@pytest.mark.parametrize(
    "change,error,argument",
    [
        (dict(z=torch.randn(3, 4, 1)), ValueError, "z"),
        (dict(z=torch.randn(4)), ValueError, "z"),
        (dict(z=torch.randn(3, 5)), ValueError, "z"),
        (dict(z=torch.ones(3, 4, dtype=torch.int64)), TypeError, "z"),
        (dict(z=[[0.0] * 4] * 3), TypeError, "z"),
        (dict(g_pot=torch.ones(3, 3)), ValueError, "g_pot"),
        (dict(g_pot=torch.ones(2, 2)), ValueError, "g_pot"),
        (dict(g_rot=torch.ones(3, 2)), ValueError, "g_rot"),
        (dict(g_rot=torch.ones(3)), ValueError, "g_rot"),
        (dict(g_pot=torch.ones(3, 2, dtype=torch.float64)), TypeError, "g_pot"),
        (dict(g_rot=torch.ones(3, 3, device="meta")), ValueError, "g_rot"),
        (dict(dt=float("nan")), ValueError, "dt"),
        (dict(dt=float("inf")), ValueError, "dt"),
        (dict(dt="1"), TypeError, "dt"),
        (dict(t=float("nan")), ValueError, "t"),
        (dict(t="0.5"), TypeError, "t"),
        # issue 15: each of these raised an error that did not name the argument
        (dict(outputs=None), TypeError, "outputs"),
        (dict(outputs=3), TypeError, "outputs"),
        (dict(outputs=[["z"]]), ValueError, "outputs"),
        (dict(t=10**400), ValueError, "t"),
        (dict(dt=10**400), ValueError, "dt"),
        (dict(dt=1e300), ValueError, "dt"),  # finite in Python, Inf in float32: Inf * 0 would be NaN
        (dict(t=-1e300), ValueError, "t"),
        (dict(t=torch.zeros(2)), ValueError, "t"),
        (dict(fields="bank"), TypeError, "fields"),
        (dict(outputs=("z", "jacobian")), ValueError, "outputs"),
        (dict(backend="fortran"), ValueError, "backend"),
    ],
)
def test_bad_input_names_the_argument(change, error, argument):
    kwargs = _valid()
    kwargs.update(change)
    with pytest.raises(error, match=f"^{argument}:") as info:
        sta.flow_step(**kwargs)
    assert type(info.value) is error  # not an OverflowError or another subclass


# ---------------------------------------------------------------------------------------------
# Non-finite policy (flow_step docstring): the same on every backend that runs on this machine.
# ---------------------------------------------------------------------------------------------

#: every registered backend that takes CPU tensors (triton: the interpreter, tests/conftest.py)
CPU_BACKENDS = [name for name in backends.BACKEND_NAMES if backends.get_backend(name).device_type in (None, "cpu")]
NAN, INF = float("nan"), float("inf")


def _require(backend, dtype=torch.float32):
    require(backend, "flow_step", dtype, torch.device("cpu"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rotational", ["hamiltonian", "mlp"])
def test_nan_parameters_of_a_field_no_sample_uses_change_nothing(backend, rotational):
    """Issue 15: NaN in every parameter of field 1, which no sample uses, gave NaN gradients on cpu
    (W, a), triton (W) and torch (t, and P of a hamiltonian field). Outputs and every gradient
    must be exactly those of the same bank with finite parameters in field 1, whose own gradients
    are exactly 0."""
    _require(backend)
    bank = _bank(D=4, H=3, rotational=rotational, dtype=torch.float32)
    z = torch.randn(5, 4)
    g = torch.rand(5, 2) + 0.5
    g[:, 1] = 0

    def run(values):
        with torch.no_grad():
            for p in bank.parameters():
                p[1] = values
        zz, t, gg = z.clone().requires_grad_(), torch.tensor(0.3, requires_grad=True), g.clone().requires_grad_()
        out = sta.flow_step(zz, t, gg, gg, bank, outputs=ALL, backend=backend)
        with torch.no_grad():  # no gradient recorded: the gate is skipped, the outputs are the same
            again = sta.flow_step(zz, t, gg, gg, bank, outputs=ALL, backend=backend)
        for name in ALL:
            assert torch.equal(getattr(again, name), getattr(out, name)), name
        loss = sum(o.square().sum() for o in out)
        grads = torch.autograd.grad(loss, [zz, t, gg, *bank.parameters()], allow_unused=True)
        return out, [torch.zeros(()) if gr is None else gr for gr in grads]

    out_nan, grads_nan = run(NAN)
    out_ok, grads_ok = run(0.25)
    for name in ALL:
        assert torch.equal(getattr(out_nan, name), getattr(out_ok, name)), name
    for (name, _), gr in zip([("z", 0), ("t", 0), ("g", 0)] + list(bank.named_parameters()), grads_nan):
        assert torch.isfinite(gr).all(), f"{name}: non-finite gradient"
    for gr_nan, gr_ok in zip(grads_nan, grads_ok):
        assert torch.equal(gr_nan, gr_ok)
    for (name, _), gr in zip(bank.named_parameters(), grads_nan[3:]):
        assert gr.dim() == 0 or gr[1].abs().max().item() == 0.0, f"{name}[1] got a gradient"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("where", ["z", "g", "t", "parameter"])
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_nonfinite_inputs_propagate_like_the_reference(backend, where, value):
    """NaN/Inf in z, g, a tensor t or an active field's parameters is not checked: every backend
    gives the reference's NaN/Inf pattern, and rows it does not touch stay finite and equal."""
    _require(backend)
    bank = _bank(D=4, H=3, dtype=torch.float32)
    z = torch.randn(5, 4)
    g_pot = torch.tensor([[1.0, 0], [0, 0.5], [0, 0], [0.3, -2], [0, 0]])
    g_rot = torch.tensor([[0, 0], [1.0, 0], [0, 0], [0.5, 0.5], [0, 0]])
    t = torch.tensor(0.2)
    if where == "z":
        z[1, 2] = value
        z[2, 0] = value  # a row with no active field: z_next keeps it, div stays 0
    elif where == "g":
        g_pot[0, 0] = value
        g_pot[4, 1] = value  # NaN != 0: the pair is active
    elif where == "t":
        t = torch.tensor(value)
    else:
        with torch.no_grad():
            bank.potential.W[1, 0, 0] = value  # field 1 is active in rows 1 and 3
    want = sta.flow_step(z, t, g_pot, g_rot, bank, outputs=ALL, backend="torch")
    got = sta.flow_step(z, t, g_pot, g_rot, bank, outputs=ALL, backend=backend)
    for name in ALL:
        assert_same_nonfinite(getattr(got, name), getattr(want, name), torch.float32, what=name)
    if where != "t":  # row 2 has no active field and no non-finite coefficient
        torch.testing.assert_close(got.z[2], z[2], rtol=0, atol=0, equal_nan=True)
        assert got.div[2].item() == 0.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_dt_times_zero_is_zero(backend):
    """dt*0 is 0: dt = 1e300 is finite in float64, so rows with no active field keep z exactly;
    in float32 it would be Inf (and Inf * 0 = NaN), so it is refused naming dt."""
    dtype = torch.float64 if backend != "triton" else torch.float32
    _require(backend, dtype)
    bank = _bank(dtype=dtype)
    z = torch.randn(3, 4, dtype=dtype)
    g = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]], dtype=dtype)
    dt = 1e300 if dtype == torch.float64 else 1e38
    out = sta.flow_step(z, 0.0, g, g, bank, dt=dt, backend=backend)
    assert torch.equal(out.z[0], z[0]) and torch.equal(out.z[2], z[2])
    assert torch.equal(out.div[[0, 2]], torch.zeros(2, dtype=dtype))
    with pytest.raises(ValueError, match="^dt:.*not finite in float32"):
        sta.flow_step(z.float(), 0.0, g.float(), g.float(), bank.float(), dt=1e300, backend=backend)


def test_mixed_parameter_dtype_or_device_is_rejected():
    kwargs = _valid()
    kwargs["z"], kwargs["g_pot"], kwargs["g_rot"] = (x.double() for x in (kwargs["z"], kwargs["g_pot"], kwargs["g_rot"]))
    with pytest.raises(TypeError, match="^fields:.*dtype"):
        sta.flow_step(**kwargs)
    kwargs = _valid()
    kwargs["z"], kwargs["g_pot"], kwargs["g_rot"] = (x.to("meta") for x in (kwargs["z"], kwargs["g_pot"], kwargs["g_rot"]))
    with pytest.raises(ValueError, match="^fields:.*device"):
        sta.flow_step(**kwargs)


# ---------------------------------------------------------------------------------------------
# Backend dispatch.
# ---------------------------------------------------------------------------------------------

def test_forced_unavailable_backend_lists_reasons():
    kwargs = _valid()
    kwargs["z"], kwargs["g_pot"], kwargs["g_rot"] = (x.to("meta") for x in (kwargs["z"], kwargs["g_pot"], kwargs["g_rot"]))
    kwargs["fields"] = kwargs["fields"].to("meta")
    # every non-reference backend must refuse a meta tensor with a reason (the reference accepts it)
    for name in ("cpu", "triton", "cuda"):
        with pytest.raises(sta.BackendUnavailableError, match=f"backend '{name}' cannot run"):
            sta.flow_step(**kwargs, backend=name)


def test_auto_falls_back_silently_and_env_overrides(monkeypatch):
    kwargs = _valid()
    ref = sta.flow_step(**kwargs, backend="torch")
    auto = sta.flow_step(**kwargs)
    assert_close(auto.z, ref.z)
    monkeypatch.setenv("STA_BACKEND", "torch")
    assert backends.requested_backend("auto") == "torch"
    assert backends.requested_backend("cpu") == "cpu"  # an explicit argument wins over the variable
    monkeypatch.setenv("STA_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="^backend:"):
        sta.flow_step(**kwargs)


@pytest.mark.parametrize("op", ["flow_step", "flow_path", "grid_transport"])
def test_every_backend_reports_reasons_or_runs(op):
    request = backends.Request(op, torch.device("cpu"), torch.float32, requires_grad=True)
    assert op in backends.op_names()
    names = [b.name for b in backends.all_backends(op)]
    assert names == list(backends.BACKEND_NAMES)
    for backend in backends.all_backends(op):
        reasons = backend.why_not(request)
        assert isinstance(reasons, list) and all(isinstance(r, str) and r for r in reasons)
    assert backends.select(request, "auto").why_not(request) == []
    assert backends.get_backend("torch", op).why_not(request) == []


def test_register_checks_the_op_contract():
    class Half(backends.Backend):  # a flow_step implementation without mlp_terms
        op, name = "flow_step", "cpu"
        potential_terms = hamiltonian_terms = staticmethod(lambda *a: None)

    with pytest.raises(TypeError, match=r"lacks \['mlp_terms'\]"):
        backends.register(Half())
    Half.op = "no_such_op"
    with pytest.raises(ValueError, match="^impl: op 'no_such_op' is not"):
        backends.register(Half())
    Half.op = "flow_path"  # runs on flow_step's implementations: none of its own
    with pytest.raises(ValueError, match="^impl: op 'flow_path' is not"):
        backends.register(Half())
    assert type(backends.get_backend("cpu")).__name__ != "Half"
    with pytest.raises(ValueError, match="^op:"):
        backends.get_backend("torch", "no_such_op")


def test_flow_step_docstring_documents_every_shape():
    doc = sta.flow_step.__doc__
    for shape in ("z: (B, D)", "g_pot: (B, Kp)", "g_rot: (B, Kr)", "div: (B,)", "hj: (B, Kp)",
                  "div_rot: (B, Kr)", "curl: (B, Kp + Kr)", "u: (B, Kp)", "z: (B, D) the moved"):
        assert shape in doc, shape


@pytest.mark.slow
def test_info_runs_and_lists_every_backend():
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "-m", "sta.info"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    for op in backends.op_names():
        for name in backends.BACKEND_NAMES:
            assert re.search(rf"^  {op} +{name} ", res.stdout, re.M), (op, name)
    assert "torch" in res.stdout and "available" in res.stdout


_FIRST_CALL_COMPILED = """
import sys, torch, sta
from sta import backends
assert backends._plugins_loaded, "import sta must register the compiled backends"
name = sys.argv[1]
fields = sta.FieldBank(5, 2, 1, 4)
z, g_pot, g_rot = torch.randn(6, 5), torch.randn(6, 2), torch.randn(6, 1)
step = torch.compile(lambda z: sta.flow_step(z, 0.3, g_pot, g_rot, fields, backend=name).z, fullgraph=True)
got = step(z)
want = sta.flow_step(z, 0.3, g_pot, g_rot, fields, backend="torch").z
print(float((got - want).abs().max()))
"""


@pytest.mark.slow
def test_first_flow_step_of_a_process_can_be_inside_torch_compile():
    # Regression: the registry and the extension loader took a threading.Lock on first use,
    # which dynamo cannot trace, so fullgraph compilation failed when it came first.
    if backends.get_backend("cpu").unavailable():
        pytest.skip(f"cpu backend unavailable: {backends.get_backend('cpu').unavailable()}")
    res = subprocess.run([sys.executable, "-c", _FIRST_CALL_COMPILED, "cpu"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert float(res.stdout.strip().splitlines()[-1]) < 1e-5
