"""The ``triton`` backend (kernels/, ``sta.kernels``) against the reference.

conftest.py sets TRITON_INTERPRET=1 on machines without CUDA, before triton is imported, so these
tests run the real kernels on the CPU interpreter (slowly: about 7 ms per program) at small
shapes; on a CUDA machine the same tests run on the GPU, plus the ``gpu``-marked ones (larger
shapes, bf16/fp16). Parity is float32 with tests/tolerances.py, forward and backward, for every
output and every differentiable input.
"""
import copy

import pytest
import torch

import sta
from sta import backends, reference
from sta.backends import Request
from tests.tolerances import assert_close

triton = pytest.importorskip("triton", reason="the triton backend needs triton installed")
from sta.backends import triton as triton_backend  # noqa: E402
from sta.kernels import configs as kernel_configs  # noqa: E402
from sta.kernels import flow_step as fs  # noqa: E402
from sta.kernels import routing  # noqa: E402

pytestmark = pytest.mark.skipif(
    triton_backend.IMPORT_ERROR is not None, reason=f"triton unusable: {triton_backend.IMPORT_ERROR}")

F32 = torch.float32
#: where the kernels run: the GPU when there is one, else the CPU interpreter
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _on_device():
    """Tensors and modules of every test are created on DEVICE."""
    with torch.device(DEVICE):
        yield

BACKEND = triton_backend.TritonFlowStep()
ALL = sta.OUTPUT_NAMES


def _bank(D=5, H=19, Kp=3, Kr=2, rotational="hamiltonian"):
    bank = sta.FieldBank(D, Kp, Kr, H, rotational=rotational)
    with torch.no_grad():  # non-trivial time dependence, so de/dt and t carry gradients
        bank.potential.time.weight.normal_(0, 0.5)
        bank.rotational.time.weight.normal_(0, 0.5)
    return bank


def _coefficients(B, K, pattern):
    g = torch.rand(B, K) + 0.5
    if pattern == "mixed":
        g = g * (torch.rand(B, K) < 0.5)
    elif pattern == "inactive":
        g = g * 0
    return g


def _weighted_sum(outs):
    """A scalar touching every output with fixed random weights (same weights for both sides)."""
    gen = torch.Generator().manual_seed(1234)
    total = 0.0
    for o in outs:
        if o is not None and o.requires_grad:
            # drawn in float32 whatever o's dtype: a float64 run gets the same weights
            weights = torch.randn(o.shape, generator=gen, device="cpu").to(o.device, o.dtype)
            total = total + (o * weights).sum()
    return total


def _grads(loss, leaves):
    if not isinstance(loss, torch.Tensor):
        return [torch.zeros_like(x) for x in leaves]
    gs = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, leaves)]


def _run_step(bank, z, t, g_pot, g_rot, backend):
    params = list(bank.parameters())
    out = sta.flow_step(z, t, g_pot, g_rot, bank, dt=0.7, outputs=ALL, backend=backend)
    grads = _grads(_weighted_sum(out), [z, t, g_pot, g_rot, *params])
    return out, grads


def _compare_step(bank, z, t, g_pot, g_rot):
    """Triton (float32) against the torch reference run in float64 on the same values, with the
    float32 tolerance: the reference's own float32 rounding is not charged to the kernel (grad t, a
    sum over every pair and hidden unit, differed by 8.3e-6 between two float32 runs whose errors
    against float64 were 3.4e-6 for triton and 4.9e-6 for torch)."""
    out_k, grads_k = _run_step(bank, z, t, g_pot, g_rot, "triton")
    bank64 = copy.deepcopy(bank).double()
    leaves64 = [x.detach().double().requires_grad_(x.requires_grad) for x in (z, t, g_pot, g_rot)]
    out_r, grads_r = _run_step(bank64, *leaves64, "torch")
    for name in ALL:
        assert_close(getattr(out_k, name), getattr(out_r, name), F32, what=name)
    names = ["z", "t", "g_pot", "g_rot"] + [n for n, _ in bank.named_parameters()]
    for name, gk, gr in zip(names, grads_k, grads_r):
        assert_close(gk, gr, F32, what=f"grad {name}")
    return out_k, grads_k


@pytest.mark.parametrize("pattern", ["mixed", "inactive", "active"])
@pytest.mark.parametrize("rotational", ["hamiltonian", "mlp"])
def test_flow_step_parity(rotational, pattern):
    """Every output and the gradient w.r.t. z, t, g_pot, g_rot and every parameter."""
    bank = _bank(rotational=rotational)
    B = 9
    z = torch.randn(B, 5, requires_grad=True)
    t = torch.tensor(0.6, requires_grad=True)
    g_pot = _coefficients(B, 3, pattern).requires_grad_()
    g_rot = _coefficients(B, 2, pattern).requires_grad_()
    _, grads = _compare_step(bank, z, t, g_pot, g_rot)
    if pattern == "mixed":  # the gradient w.r.t. a zero coefficient is exactly zero (routing)
        assert (grads[2][g_pot == 0] == 0).all() and (grads[3][g_rot == 0] == 0).all()
    if pattern == "inactive":  # nothing evaluated: only the identity part of z_next has a gradient
        assert all((g == 0).all() for g in grads[1:])


@pytest.mark.parametrize("D", [1, 3, 17])
def test_odd_sizes(D):
    """Odd D (and H = 17, B = 19: more than one row block per field) for all three field kinds."""
    B, H = 19, 17
    for rotational in ("hamiltonian", "mlp"):
        bank = _bank(D=D, H=H, Kp=2, Kr=2, rotational=rotational)
        z = torch.randn(B, D, requires_grad=True)
        t = torch.tensor(1.3, requires_grad=True)
        g_pot = _coefficients(B, 2, "active").requires_grad_()
        g_rot = _coefficients(B, 2, "mixed").requires_grad_()
        _compare_step(bank, z, t, g_pot, g_rot)


def test_zero_batch():
    bank = _bank(D=3, H=4, Kp=2, Kr=1)
    z = torch.zeros(0, 3, requires_grad=True)
    t = torch.tensor(0.5, requires_grad=True)
    g_pot = torch.zeros(0, 2, requires_grad=True)
    g_rot = torch.zeros(0, 1, requires_grad=True)
    out, grads = _compare_step(bank, z, t, g_pot, g_rot)
    assert out.z.shape == (0, 3) and out.div.shape == (0,) and out.hj.shape == (0, 2)


@pytest.mark.parametrize("kind", ["potential", "hamiltonian", "mlp"])
def test_noncontiguous_inputs_and_grad_outputs(kind):
    """z and g as strided views, gradients of the outputs non-contiguous (expanded / transposed)."""
    B, D, H, K = 11, 6, 5, 3
    z = torch.randn(D, 2 * B)[:, ::2].t().requires_grad_()  # (B, D), strides (1, 2B)
    g_wide = torch.rand(B, 2 * K) * (torch.rand(B, 2 * K) < 0.6)
    g = g_wide[:, ::2].requires_grad_()
    assert not z.is_contiguous() and not g.is_contiguous()

    def P(*shape):
        return (0.5 * torch.randn(*shape)).requires_grad_()

    if kind == "potential":
        p = reference.PotentialParams(P(K, H, D), P(K, H), P(K, H), P(K, H))
        want, fn = ("curl", "div", "hj", "u"), "potential_terms"
    elif kind == "hamiltonian":
        p = reference.HamiltonianParams(P(K, H, D), P(K, H), P(K, H), P(K, D, H))
        want, fn = ("curl", "div", "div_rot"), "hamiltonian_terms"
    else:
        p = reference.MLPParams(P(K, H, D), P(K, H), P(K, D, H), P(K, D))
        want, fn = ("div", "div_rot"), "mlp_terms"
    leaves = [z, g, *p]
    out_k = getattr(BACKEND, fn)(z, g, p, want)
    out_r = getattr(reference, fn)(z, g, p, want)
    gvel = torch.randn(D, B).t()  # transposed
    gdiv = torch.randn(1).expand(B)  # stride 0
    gpair = torch.randn(K, B).t()
    for name in out_r._fields:
        assert_close(getattr(out_k, name), getattr(out_r, name), F32, what=f"{kind} {name}")

    def backward(out):
        pairs = [(out.velocity, gvel), (out.div, gdiv)] + [
            (getattr(out, n), gpair) for n in ("hj", "u", "div_rot", "curl")]
        outs = [o for o, _ in pairs if o is not None and o.requires_grad]
        return _grads_from(outs, [gr for o, gr in pairs if o is not None and o.requires_grad], leaves)

    for i, (gk, gr) in enumerate(zip(backward(out_k), backward(out_r))):
        assert_close(gk, gr, F32, what=f"{kind} grad of input {i}")


def _grads_from(outs, grad_outs, leaves):
    gs = torch.autograd.grad(outs, leaves, grad_outs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, leaves)]


def test_parameter_gradients_are_deterministic():
    """Per-field reductions without atomics: the same inputs give bitwise-equal parameter gradients."""
    bank = _bank(D=4, H=6, Kp=2, Kr=2)
    z = torch.randn(40, 4)
    g_pot = _coefficients(40, 2, "active")
    g_rot = _coefficients(40, 2, "active")
    runs = []
    for _ in range(2):
        out = sta.flow_step(z, 0.3, g_pot, g_rot, bank, outputs=("z", "div", "hj"), backend="triton")
        runs.append(_grads(_weighted_sum(out), list(bank.parameters())))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_route_pads_index_lists_not_data():
    g = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [3.0, 0.0, 4.0]])
    r = routing.route(g, block_m=16)
    assert r.num_blocks == 2 and r.rows.shape == (32,)  # field 1 has no active row: no block
    assert r.block_field.tolist() == [0, 2] and r.block_ptr.tolist() == [0, 1, 1, 2]
    assert r.rows[:2].tolist() == [0, 2] and (r.rows[2:16] == -1).all()
    assert r.rows[16:18].tolist() == [1, 2] and (r.rows[18:] == -1).all()


def _op_args(kind, B=5, D=3, H=4, K=2):
    z = torch.randn(B, D, requires_grad=True)
    g = (torch.rand(B, K) * (torch.rand(B, K) < 0.7)).requires_grad_()

    def param(*shape):
        return (0.5 * torch.randn(*shape)).requires_grad_()

    # the op's inputs: z, g, W, c, a, de, W_out (M / W2), b2, mat (C / Pdiv), kind, want_curl, precision
    W, c = param(K, H, D), param(K, H)
    if kind == fs.POTENTIAL:
        return (z, g, W, c, param(K, H), param(K, H), None, None, None, kind, False, "ieee")
    if kind == fs.HAMILTONIAN:
        return (z, g, W, c, param(K, H), None, param(K, D, H), None, param(K, H, H), kind, True, "ieee")
    return (z, g, W, c, None, None, param(K, D, H), param(K, D), param(K, D, H), kind, False, "ieee")


@pytest.mark.parametrize("kind", [fs.POTENTIAL, fs.HAMILTONIAN, fs.MLP])
def test_opcheck(kind):
    """Schema, fake tensor, autograd registration and AOT dispatch of the registered ops."""
    args = _op_args(kind)
    torch.library.opcheck(torch.ops.sta.triton_flow_step_fwd.default, args)
    fwd = torch.ops.sta.triton_flow_step_fwd(*args)
    grads_out = [torch.randn_like(o) for o in fwd]
    inputs = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(torch.ops.sta.triton_flow_step_bwd.default, (*grads_out, *inputs))


@pytest.mark.parametrize("rotational", ["mlp"])
def test_torch_compile_fullgraph(rotational):
    """flow_step with backend="triton" compiles as one graph (the op is opaque, its fake gives shapes).

    Inductor (the default backend), forward and backward; about 12 s on this machine.
    """
    # the plugin registry is loaded once, under a lock dynamo cannot trace: load it eagerly
    backends.all_backends()
    bank = _bank(D=4, H=5, Kp=2, Kr=2, rotational=rotational)
    z = torch.randn(6, 4, requires_grad=True)
    g_pot = _coefficients(6, 2, "mixed")
    g_rot = _coefficients(6, 2, "mixed")

    def step(z, g_pot, g_rot):
        out = sta.flow_step(z, 0.4, g_pot, g_rot, bank, outputs=("z", "div", "hj"), backend="triton")
        return out.z, out.div, out.hj

    compiled = torch.compile(step, fullgraph=True)
    got = compiled(z, g_pot, g_rot)
    want = step(z, g_pot, g_rot)
    for a, b in zip(got, want):
        assert_close(a, b, F32)
    assert_close(_grads(_weighted_sum(got), [z])[0], _grads(_weighted_sum(want), [z])[0], F32)


# -- GPU only (never run on the CPU interpreter: bf16 does not run there, large shapes are slow) --

@pytest.mark.gpu
@pytest.mark.parametrize("rotational", ["hamiltonian", "mlp"])
def test_gpu_parity_many_blocks(rotational):
    """Several row blocks per field, H and D above one tile, mixed sparsity: fp32 parity on the GPU."""
    bank = _bank(D=70, H=100, Kp=4, Kr=3, rotational=rotational)
    B = 300
    z = torch.randn(B, 70, requires_grad=True)
    t = torch.tensor(0.6, requires_grad=True)
    g_pot = _coefficients(B, 4, "mixed").requires_grad_()
    g_rot = _coefficients(B, 3, "mixed").requires_grad_()
    _compare_step(bank, z, t, g_pot, g_rot)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_low_precision(dtype):
    """flash-attention rule: the kernel's error vs float64 is at most 2x the reference's in dtype."""
    from tests.tolerances import assert_low_precision

    bank64 = _bank(D=40, H=48, Kp=3, Kr=2).double()
    B = 200
    z64 = torch.randn(B, 40, dtype=torch.float64)
    gp64 = _coefficients(B, 3, "mixed").double()
    gr64 = _coefficients(B, 2, "mixed").double()
    low = copy.deepcopy(bank64).to(dtype)
    outs = ("z", "div", "hj", "u", "curl")
    ref64 = sta.flow_step(z64, 0.5, gp64, gr64, bank64, outputs=outs, backend="torch")
    args = (z64.to(dtype), 0.5, gp64.to(dtype), gr64.to(dtype), low)
    ref_low = sta.flow_step(*args, outputs=outs, backend="torch")
    got = sta.flow_step(*args, outputs=outs, backend="triton")
    for name in outs:
        assert_low_precision(getattr(got, name), getattr(ref_low, name), getattr(ref64, name), dtype, what=name)


# -- availability ------------------------------------------------------------------------------

def _request(dtype=F32, device="cpu"):
    return Request("flow_step", torch.device(device), dtype, requires_grad=True)


def test_why_not_float64():
    reasons = BACKEND.why_not(_request(torch.float64))
    assert len(reasons) == 1 and "float64 is not a Triton dtype" in reasons[0]
    assert backends.select(_request(torch.float64), "auto").name != "triton"
    with pytest.raises(backends.BackendUnavailableError, match="float64"):
        backends.select(_request(torch.float64), "triton")


def test_why_not_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = BACKEND.why_not(_request())
    assert reasons == ["Triton needs a CUDA device; set TRITON_INTERPRET=1 to run the interpreter "
                       "on CPU (slow, for tests)"]


def test_why_not_low_precision_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert any("only on GPU" in r for r in BACKEND.why_not(_request(torch.bfloat16)))


def test_interpreter_runs_only_when_named(monkeypatch):
    """Under the interpreter the backend can run, but `auto` must not pick it (a test mode)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert BACKEND.why_not(_request()) == []
    assert backends.select(_request(), "triton").name == "triton"
    assert backends.select(_request(), "auto").name != "triton"


# -- issue 16: every kept GPU tile config, tf32 (emulated), deterministic mode ----------------

from sta.kernels import launch as kernel_launch  # noqa: E402
from tests.tolerances import TF32, max_rel_error  # noqa: E402


AUTOTUNED = ("_flow_step_hidden_fwd_kernel", "_flow_step_fwd_kernel", "_flow_step_bwd_kernel",
             "_flow_step_hidden_bwd_kernel", "_flow_step_dz_bwd_kernel")
VARIANTS = [dict(KIND=fs.POTENTIAL, WANT_CURL=False), dict(KIND=fs.HAMILTONIAN, WANT_CURL=False),
            dict(KIND=fs.HAMILTONIAN, WANT_CURL=True), dict(KIND=fs.MLP, WANT_CURL=False)]


def _kept(arch, kernel, precision, block_m, variant):
    meta = dict(variant, INPUT_PRECISION=precision, BLOCK_M=block_m)
    return kernel_configs.keep_configs(kernel_configs.gpu_configs(), arch, meta, kernel)


def _kept_tiles():
    """(BLOCK_H, BLOCK_D, BLOCK_M) -> config, for every config the GPU pruning keeps for some
    target (sm_80, sm_90), kernel, field kind, precision and row-block size: what a GPU can run."""
    kept = {}
    for arch in (80, 90):
        for kernel in AUTOTUNED:
            for precision in ("ieee", "tf32", "bf16", "fp16"):
                for block_m in (16, 32, 64):
                    for variant in VARIANTS:
                        for cfg in _kept(arch, kernel, precision, block_m, variant):
                            kept.setdefault((cfg.kwargs["BLOCK_H"], cfg.kwargs["BLOCK_D"], block_m), cfg)
    return kept


KEPT = _kept_tiles()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the GPU autotunes for itself; this forces tiles under the interpreter")
@pytest.mark.parametrize("tile", sorted(KEPT), ids=lambda t: "H{}xD{}xM{}".format(*t))
def test_every_kept_config_parity(tile, monkeypatch):
    """The interpreter's default is one 16x16 tile with BLOCK_M = 16; here each GPU tile size and
    row-block size runs (forced past the autotuner), with tiles wider than D and H and several
    row blocks per field, forward and backward; potential fields in every case, hamiltonian (with
    curl) and mlp fields in alternate cases (the interpreter is slow)."""
    bh, bd, block_m = tile
    monkeypatch.setattr(routing, "block_m_for", lambda rows: block_m)  # what route calls
    B = block_m + 3  # the first field spans two row blocks
    rotational = "mlp" if sorted(KEPT).index(tile) % 2 else "hamiltonian"
    bank = _bank(D=5, H=19, Kp=2, Kr=2, rotational=rotational)
    z = torch.randn(B, 5, requires_grad=True)
    t = torch.tensor(0.4, requires_grad=True)
    g_pot = _coefficients(B, 2, "active").requires_grad_()
    g_rot = _coefficients(B, 2, "mixed").requires_grad_()
    with kernel_launch.forced_config(KEPT[tile]):
        _compare_step(bank, z, t, g_pot, g_rot)


def test_pruning_sizes_tiles_by_live_tiles():
    """One config per launch; light launches (potential forward, 16 rows) get 32-wide tiles, heavy
    ones (curl in the hidden backward, 64 rows) 16-wide; never a compile the AOT spill table lists."""
    for arch in (80, 90):
        for precision in ("ieee", "tf32", "bf16"):
            light = _kept(arch, "_flow_step_fwd_kernel", precision, 16, VARIANTS[0])
            heavy = _kept(arch, "_flow_step_hidden_bwd_kernel", precision, 64, VARIANTS[2])
            assert len(light) == len(heavy) == 1
            assert light[0].kwargs == {"BLOCK_H": 32, "BLOCK_D": 32}
            assert heavy[0].kwargs == {"BLOCK_H": 16, "BLOCK_D": 16}
    # 4 warps and 1 stage unless the AOT spill table lists that compile (then the next option)
    for arch in (80, 90):
        for kernel in AUTOTUNED:
            for precision in ("ieee", "tf32", "bf16", "fp16"):
                for block_m in (16, 32, 64):
                    for variant in VARIANTS:
                        meta = dict(variant, INPUT_PRECISION=precision, BLOCK_M=block_m)
                        (cfg,) = _kept(arch, kernel, precision, block_m, variant)
                        first = kernel_configs.spill_key(kernel, arch, {**meta, **cfg.kwargs}, 4, 1)
                        assert (cfg.num_warps, cfg.num_stages) == (4, 1) or first in kernel_configs.SPILLS, (kernel, arch, meta)
                        assert kernel_configs.spill_key(kernel, arch, {**meta, **cfg.kwargs}, cfg.num_warps,
                                                        cfg.num_stages) not in kernel_configs.SPILLS


def _round_tf32(x: torch.Tensor) -> torch.Tensor:
    """CPU model of the TF32 operand rounding: 10 mantissa bits, round half to even (the same bit
    arithmetic as the kernels' ``_round_tf32``)."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def test_tf32_rounding_model():
    """The CPU model (and so the kernel's hook, same bit arithmetic) keeps 10 mantissa bits."""
    x = torch.tensor([1.0 + 2.0 ** -10, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 1.0 + 2.0 ** -12, -3.0])
    assert _round_tf32(x).tolist() == [1.0 + 2.0 ** -10, 1.0, 1.0 + 2 * 2.0 ** -10, 1.0, -3.0]


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the emulation is the interpreter's stand-in for tf32")
@pytest.mark.parametrize("rotational", ["hamiltonian", "mlp"])
def test_tf32_emulation(rotational, monkeypatch):
    """The tf32 path, emulated: under the interpreter tl.dot ignores input_precision, so the
    kernels' ``_dot`` rounds both operands to 10 mantissa bits first ("tf32_emulated", chosen by
    the launcher in place of "tf32"). Checks that the result is within the TF32 tolerance of the
    float64 reference for every output and gradient, and that the rounding really ran (the error
    is above fp32 parity). It checks the numerics of TF32 products in these kernels, not the
    GPU's TF32 instructions (tests/test_triton_aot.py compiles those)."""
    bank = _bank(rotational=rotational)
    B = 9
    z = torch.randn(B, 5, requires_grad=True)
    t = torch.tensor(0.6, requires_grad=True)
    g_pot = _coefficients(B, 3, "mixed").requires_grad_()
    g_rot = _coefficients(B, 2, "mixed").requires_grad_()
    monkeypatch.setattr(fs, "precision_for", lambda dtype: "tf32_emulated")
    out_k, grads_k = _run_step(bank, z, t, g_pot, g_rot, "triton")
    bank64 = copy.deepcopy(bank).double()
    leaves64 = [x.detach().double().requires_grad_() for x in (z, t, g_pot, g_rot)]
    out_r, grads_r = _run_step(bank64, *leaves64, "torch")
    worst = 0.0
    for name in ALL:
        assert_close(getattr(out_k, name), getattr(out_r, name), tol=TF32, what=f"tf32 {name}")
        worst = max(worst, max_rel_error(getattr(out_k, name), getattr(out_r, name)))
    for i, (gk, gr) in enumerate(zip(grads_k, grads_r)):
        assert_close(gk, gr, tol=TF32, what=f"tf32 grad {i}")
    assert worst > 10 * 1e-5, "the tf32 rounding hook did not change the products"


def test_precision_follows_torch_matmul_setting():
    """fp32 follows torch.get_float32_matmul_precision(); bf16/fp16 use their own dtype."""
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert BACKEND.precision(torch.float32) == "ieee"
        for setting in ("high", "medium"):
            torch.set_float32_matmul_precision(setting)
            assert BACKEND.precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    assert BACKEND.precision(torch.bfloat16) == "bf16" and BACKEND.precision(torch.float16) == "fp16"


@pytest.fixture
def deterministic():
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield torch.use_deterministic_algorithms
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_deterministic_mode_refuses_atomics(deterministic):
    """torch.use_deterministic_algorithms(True): the forced backend refuses with the setting's name,
    auto picks another backend, and the launcher itself refuses; warn_only runs and warns."""
    bank = _bank(D=3, H=4, Kp=2, Kr=1)
    z = torch.randn(4, 3)
    g_pot, g_rot = _coefficients(4, 2, "active"), _coefficients(4, 1, "active")
    deterministic(True)
    reasons = BACKEND.why_not(_request())
    assert any("torch.use_deterministic_algorithms(True)" in r for r in reasons)
    with pytest.raises(Exception, match=r"use_deterministic_algorithms\(True\)"):
        sta.flow_step(z, 0.3, g_pot, g_rot, bank, backend="triton")
    assert backends.select(_request(), "auto").name != "triton"
    with pytest.raises(RuntimeError, match=r"use_deterministic_algorithms\(True\)"):
        fs.flow_step_fwd(z, g_pot, fs.POTENTIAL, torch.randn(2, 4, 3), torch.randn(2, 4), torch.randn(2, 4),
                         torch.randn(2, 4))
    deterministic(True, warn_only=True)
    assert BACKEND.why_not(_request()) == []
    with pytest.warns(UserWarning, match="not bit-reproducible"):
        out = sta.flow_step(z, 0.3, g_pot, g_rot, bank, backend="triton")
    deterministic(False)
    assert torch.equal(out.z, sta.flow_step(z, 0.3, g_pot, g_rot, bank, backend="triton").z)
