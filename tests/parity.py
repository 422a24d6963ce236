"""Shared helpers of the backend tests and the one cross-backend parity matrix.

Every backend of the registry (:mod:`sta.backends`) other than the ``torch`` reference is checked
against the reference, for every op of :data:`OPS`, in every dtype the backend declares, for every
field construction of :data:`CONSTRUCTIONS` and every case of :data:`CASES` (all-off / mixed /
all-on sparsity, B = 0, odd D, no potential or no rotational field): forward outputs and the gradient of a weighted sum
of them with respect to every input and every field parameter. tests/test_parity.py runs the
matrix; a new backend gets it by being registered, a new op by one :data:`OPS` entry.

Parity rule (tests/tolerances.py): the backend runs in its dtype, the reference runs on the same
values in the dtype :func:`reference_dtype` gives, and every difference must be within the
tolerance of the backend's dtype.
"""
from __future__ import annotations

import copy
from typing import Callable, NamedTuple

import pytest
import torch

import sta
from sta import backends, reference
from sta.backends import Request
from tests.tolerances import assert_close

F32, F64 = torch.float32, torch.float64
REFERENCE = "torch"
ALL = sta.OUTPUT_NAMES


# ----------------------------------------------------------------------------------------------
# builders
# ----------------------------------------------------------------------------------------------

def coefficients(shape, pattern, dtype=F32, signed=False):
    """Coefficients of ``shape`` (..., K), magnitudes in [0.5, 1.5) (both signs if ``signed``):
    pattern "on" none zero, "mixed" about half zero, "off" all zero, an int k exactly k non-zero
    per row (at most K)."""
    g = torch.rand(*shape, dtype=dtype) + 0.5
    if signed:
        g = g * torch.where(torch.rand(*shape) < 0.5, -1.0, 1.0).to(dtype)
    if pattern == "mixed":
        g = g * (torch.rand(*shape) < 0.5)
    elif pattern == "off":
        g = g * 0
    elif isinstance(pattern, int):
        keep = torch.rand(*shape).argsort(-1).argsort(-1) < pattern  # k random columns per row
        g = g * keep
    elif pattern != "on":
        raise ValueError(f"pattern: expected 'off', 'mixed', 'on' or an int, got {pattern!r}")
    return g


def field_bank(D, H, Kp, Kr, rotational="hamiltonian", rank=None, dtype=F32):
    """A FieldBank with non-trivial time dependence, so de/dt and t carry gradients."""
    bank = sta.FieldBank(D, Kp, Kr, H, rotational=rotational, rank=rank).to(dtype)
    with torch.no_grad():
        bank.potential.time.weight.normal_(0, 0.5)
        bank.rotational.time.weight.normal_(0, 0.5)
    return bank


def term_params(kind, K, H, D, dtype=F32):
    """Random per-field parameters of one field kind with the scales of a trained model (|W z| ~ 1)."""
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_()
    if kind == "potential":
        return reference.PotentialParams(r(K, H, D, scale=D ** -0.5), r(K, H, scale=0.5), r(K, H), r(K, H))
    if kind == "hamiltonian":
        return reference.HamiltonianParams(r(K, H, D, scale=D ** -0.5), r(K, H, scale=0.5), r(K, H),
                                           r(K, D, H, scale=H ** -0.5))
    return reference.MLPParams(r(K, H, D, scale=D ** -0.5), r(K, H, scale=0.5), r(K, D, H, scale=H ** -0.5),
                               r(K, D, scale=0.5))


#: the outputs each field kind's term method produces
TERMS_WANT = {"potential": ("curl", "div", "hj", "u"), "hamiltonian": ("curl", "div", "div_rot"),
              "mlp": ("curl", "div", "div_rot")}


# ----------------------------------------------------------------------------------------------
# losses, gradients, comparisons
# ----------------------------------------------------------------------------------------------

def weighted_sum(outs, seed=1234):
    """A scalar touching every output with fixed random weights: the same weights for any dtype
    and device (drawn in float32 on the CPU), so a float32 run and its float64 reference agree."""
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for o in outs:
        if o is not None and o.requires_grad:
            weights = torch.randn(o.shape, generator=gen).to(o.device, o.dtype)
            total = total + (o * weights).sum()
    return total


def grads(loss, leaves, grad_outputs=None):
    """d loss / d leaf for every leaf (zeros where the loss does not depend on it); ``loss`` may be
    a list of outputs with their ``grad_outputs``."""
    if not isinstance(loss, (torch.Tensor, list)) or (isinstance(loss, list) and not loss):
        return [torch.zeros_like(x) for x in leaves]
    gs = torch.autograd.grad(loss, leaves, grad_outputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, leaves)]


def assert_all_close(actual, expected, names, dtype=None, tol=None, what=""):
    """assert_close on each pair, named."""
    for name, a, e in zip(names, actual, expected):
        assert_close(a, e, dtype, tol=tol, what=f"{what}{name}")


#: backends compared with the reference run in float64 rather than in their own dtype. The Triton
#: kernels' tiled float32 sums round differently from the reference's BLAS products, so against a
#: float32 reference both roundings add up: grad t (a sum over every pair and hidden unit) differed
#: by 8.3e-6 between two float32 runs whose errors against float64 were 3.4e-6 (triton) and
#: 4.9e-6 (torch). cpu and cuda call the same torch matmul as the reference and track its float32
#: rounding: against float64, grad t of a cpu float32 run was 1.2e-5 off (hamiltonian rank 2, all on).
FLOAT64_REFERENCE = {"triton"}


def reference_dtype(backend, dtype):
    """The dtype the reference runs in when checking ``backend`` in ``dtype``."""
    return F64 if backend in FLOAT64_REFERENCE else dtype


# ----------------------------------------------------------------------------------------------
# where a backend runs
# ----------------------------------------------------------------------------------------------

def device_for(name):
    """The device a backend's tests use: its own device type, or the GPU when there is one (triton,
    which runs on the CPU only under the interpreter)."""
    device_type = backends.get_backend(name).device_type
    return torch.device(device_type or ("cuda" if torch.cuda.is_available() else "cpu"))


def require(name, op="flow_step", dtype=F32, device=None, requires_grad=True):
    """Skip the calling test, with the registry's reasons, when ``name`` cannot run the request here."""
    device = device if device is not None else device_for(name)
    reasons = backends.get_backend(name, op).why_not(Request(op, device, dtype, requires_grad))
    if reasons:
        pytest.skip(f"{name} cannot run {op} in {backends.dtype_name(dtype)} on {device}: " + "; ".join(reasons))


def fast_backends():
    """Every registered backend but the reference."""
    return [name for name in backends.BACKEND_NAMES if name != REFERENCE]


def backend_param(name, *values, slow=False):
    """pytest.param(name, *values), marked ``gpu`` when the backend takes CUDA tensors only, and
    ``slow`` when asked."""
    marks = [pytest.mark.gpu] if backends.get_backend(name).device_type == "cuda" else []
    if slow:
        marks.append(pytest.mark.slow)
    ident = "-".join([name] + [backends.dtype_name(v) if isinstance(v, torch.dtype) else str(v) for v in values])
    return pytest.param(name, *values, marks=marks, id=ident)


# ----------------------------------------------------------------------------------------------
# the matrix: op x construction x case (backend and dtype come from the registry)
# ----------------------------------------------------------------------------------------------

class Case(NamedTuple):
    """Sizes of one parity case and the sparsity pattern of its coefficients (:func:`coefficients`;
    a pair: the potential's, the rotational's)."""

    B: int
    D: int
    H: int
    Kp: int
    Kr: int
    pattern: object = "mixed"

    def patterns(self):
        return (self.pattern, self.pattern) if isinstance(self.pattern, (str, int)) else tuple(self.pattern)


#: the cases of the matrix. D17: odd D, H = 17 across two 16-wide tiles, B = 19 rows of field 0
#: across two 16-row blocks.
CASES = {
    "off": Case(9, 5, 19, 3, 2, "off"),
    "mixed": Case(9, 5, 19, 3, 2, "mixed"),
    "on": Case(9, 5, 19, 3, 2, "on"),
    "B0": Case(0, 3, 4, 2, 1),
    "D1": Case(7, 1, 3, 2, 2, ("on", "mixed")),
    "D17": Case(19, 17, 17, 2, 2, ("on", "mixed")),
    "Kp0": Case(9, 6, 5, 0, 3),
    "Kr0": Case(9, 6, 5, 3, 0),
}

#: construction id -> (FieldBank rotational, rank)
CONSTRUCTIONS = {"hamiltonian": ("hamiltonian", None), "hamiltonian_rank2": ("hamiltonian", 2),
                 "mlp": ("mlp", None)}


class Inputs(NamedTuple):
    leaves: dict          # name -> differentiable input tensor
    fields: torch.nn.Module

    def to(self, device=None, dtype=None):
        """A copy of the leaves (leaves again) and of the fields on ``device`` in ``dtype``."""
        leaves = {k: v.detach().to(device, dtype, copy=True).requires_grad_() for k, v in self.leaves.items()}
        return Inputs(leaves, copy.deepcopy(self.fields).to(device, dtype))

    def names(self):
        """The names of :meth:`differentiable`, in order."""
        return list(self.leaves) + [n for n, _ in self.fields.named_parameters()]

    def differentiable(self):
        """The leaves, then every field parameter."""
        return list(self.leaves.values()) + list(self.fields.parameters())


class OpCase(NamedTuple):
    """How the matrix builds the inputs of one op and runs it on a backend."""

    inputs: Callable      # (case, rotational, rank, dtype) -> Inputs
    run: Callable         # (inputs, backend name) -> the op's output (a NamedTuple of tensors)


def _bank_and_coefficients(case, rotational, rank, dtype, steps=()):
    fields = field_bank(case.D, case.H, case.Kp, case.Kr, rotational, rank, dtype)
    z = torch.randn(case.B, case.D, dtype=dtype)
    pot, rot = case.patterns()
    g_pot = coefficients((case.B, *steps, case.Kp), pot, dtype, signed=True)
    g_rot = coefficients((case.B, *steps, case.Kr), rot, dtype, signed=True)
    return fields, z, g_pot, g_rot


#: The time of a step is differentiated in float64 only. Backends never see it: the torch time
#: embedding (sta.ops.prepare_step) turns it into per-step parameters, whose gradients from the
#: kernels are checked here (grad of b and time.weight); grad t is then a cancelling sum over every
#: pair and hidden unit, ill-conditioned in float32: the float32 reference itself was 1.4e-5 off
#: float64 (flow_step, hamiltonian, Kr0) and 1.6e-5 (flow_path, D17), over the 1e-5 parity.
STEP_T, PATH_T0 = 0.6, 0.25
PATH_STEPS = 2


def _time(value, dtype):
    return {"t": torch.tensor(value, dtype=dtype)} if dtype == F64 else {}


def _flow_step_inputs(case, rotational, rank, dtype):
    fields, z, g_pot, g_rot = _bank_and_coefficients(case, rotational, rank, dtype)
    return Inputs(dict(z=z, **_time(STEP_T, dtype), g_pot=g_pot, g_rot=g_rot), fields)


def _flow_step_run(inputs, backend):
    x = inputs.leaves
    return sta.flow_step(x["z"], x.get("t", STEP_T), x["g_pot"], x["g_rot"], inputs.fields, dt=0.7,
                         outputs=ALL, backend=backend)


def _flow_path_inputs(case, rotational, rank, dtype):
    fields, z0, g_pot, g_rot = _bank_and_coefficients(case, rotational, rank, dtype, steps=(PATH_STEPS,))
    return Inputs(dict(z0=z0, **_time(PATH_T0, dtype), g_pot=g_pot, g_rot=g_rot), fields)


def _flow_path_run(inputs, backend):
    x = inputs.leaves
    # an mlp field's curl is a diagnostic every backend takes from the reference's explicit
    # Jacobians (checked once per step by flow_step); over a path it only adds time
    outputs = ALL if inputs.fields.rotational.construction != "mlp" else tuple(o for o in ALL if o != "curl")
    return sta.flow_path(x["z0"], x.get("t", PATH_T0), x["g_pot"], x["g_rot"], inputs.fields, dt=0.3,
                         outputs=outputs, backend=backend)


#: op name (as in the registry) -> how to build and run it. A new op: one entry here.
OPS = {
    "flow_step": OpCase(_flow_step_inputs, _flow_step_run),
    "flow_path": OpCase(_flow_path_inputs, _flow_path_run),
}
#: registry ops whose parity is tested elsewhere, with where
OPS_ELSEWHERE = {"grid_transport": "tests/test_grid_backends.py (a density on a grid: no fields, no sparsity)"}


def matrix():
    """Every (backend, op, dtype, construction, case) of the matrix, as pytest params: every
    registered backend but the reference, with the float dtypes it declares."""
    params = []
    for name in fast_backends():
        for op in OPS:
            for dtype in (F32, F64):
                if dtype not in backends.get_backend(name, op).dtypes:
                    continue
                # flow_path through the Triton interpreter is T interpreted steps (0.6-1.6 s a case):
                # the thorough run; the quick run keeps Triton's flow_step rows and tests/test_path.py
                # checks Triton's flow_path at T = 1
                slow = name == "triton" and op == "flow_path" and not torch.cuda.is_available()
                for construction in CONSTRUCTIONS:
                    for case in CASES:
                        params.append(backend_param(name, op, dtype, construction, case, slow=slow))
    return params


def run_with_grads(op, inputs, backend):
    """The op's outputs on ``backend`` and the gradients of their weighted sum w.r.t. every leaf
    and every field parameter (:meth:`Inputs.differentiable`)."""
    out = OPS[op].run(inputs, backend)
    return out, grads(weighted_sum(out), inputs.differentiable())


class Result(NamedTuple):
    inputs: Inputs        # the backend's
    got: tuple            # the backend's outputs
    grads: list           # and gradients (Inputs.differentiable order)
    want: tuple           # the reference's
    want_grads: list


def check_parity(backend, op, dtype, construction, case, tol=None) -> Result:
    """``op`` on ``backend`` in ``dtype`` against the reference on the same values (in
    :func:`reference_dtype`): every output and every gradient within the tolerance of ``dtype``
    (or ``tol``). The inputs are drawn on the CPU (the same values on every device), then moved to
    the backend's device. Skips, with the registry's reasons, where the backend cannot run."""
    device = device_for(backend)
    require(backend, op, dtype, device)
    case = CASES[case] if isinstance(case, str) else case
    with torch.device("cpu"):
        drawn = OPS[op].inputs(case, *CONSTRUCTIONS[construction], dtype)
    inputs = drawn.to(device)
    got, grads_got = run_with_grads(op, inputs, backend)
    want, grads_want = run_with_grads(op, drawn.to(device, reference_dtype(backend, dtype)), REFERENCE)
    what = f"{backend} {op} {construction} "
    assert_all_close(got, want, type(want)._fields, dtype, tol=tol, what=what)
    assert_all_close(grads_got, grads_want, inputs.names(), dtype, tol=tol, what=what + "grad ")
    return Result(inputs, got, grads_got, want, grads_want)


# ----------------------------------------------------------------------------------------------
# term level: one field kind's term method of a backend against the reference's
# ----------------------------------------------------------------------------------------------

def check_terms(backend, kind, z, g, p, want, dtype, grad_outputs=None):
    """``{kind}_terms`` of ``backend`` against the reference's on the same values (in
    :func:`reference_dtype`): the terms in ``want`` and the gradients w.r.t. z, g and every
    parameter, of the weighted sum of the terms or, with ``grad_outputs`` (term name -> tensor),
    of a backward that receives exactly those tensors. Returns the backend's terms."""
    ref_dtype = reference_dtype(backend, dtype)
    given = [(name, x) for name, x in zip(type(p)._fields, p) if x is not None]  # an unprepared Pdiv is None
    leaves = [z, g, *(x for _, x in given)]
    ref_leaves = [x.detach().to(ref_dtype, copy=True).requires_grad_(x.requires_grad) for x in leaves]
    got = getattr(backends.get_backend(backend), f"{kind}_terms")(z, g, p, want)
    expected = getattr(backends.get_backend(REFERENCE), f"{kind}_terms")(
        ref_leaves[0], ref_leaves[1], type(p)(**{name: x for (name, _), x in zip(given, ref_leaves[2:])}), want)
    assert_all_close(got, expected, got._fields, dtype, what=f"{backend} {kind}.")

    def backward(out, xs):
        if grad_outputs is None:
            return grads(weighted_sum(out), xs)
        pairs = [(o, grad_outputs[n]) for n, o in zip(out._fields, out) if o is not None and o.requires_grad]
        return grads([o for o, _ in pairs], xs, [w.to(o.dtype) for o, w in pairs])

    names = ["z", "g"] + [name for name, _ in given]
    assert_all_close(backward(got, leaves), backward(expected, ref_leaves), names, dtype,
                     what=f"{backend} {kind} grad ")
    return got
