"""The ``triton`` backend (kernels/, ``sta.kernels``) against the reference.

conftest.py sets TRITON_INTERPRET=1 on machines without CUDA, before triton is imported, so these
tests run the real kernels on the CPU interpreter (slowly: about 7 ms per program) at small
shapes; on a CUDA machine the same tests run on the GPU, plus the ``gpu``-marked ones (larger
shapes, bf16/fp16). Parity is float32 with tests/tolerances.py, forward and backward, for every
output and every differentiable input: the sparsity patterns, B = 0, odd D and non-contiguous
inputs are in the cross-backend matrix (tests/test_parity.py); here every kept GPU tile, tf32,
determinism, opcheck, torch.compile and the reasons the backend gives.
"""
import copy

import pytest
import torch

import sta
from sta import backends
from sta.backends import Request
from tests.parity import F32, Case, assert_all_close, check_parity, coefficients, field_bank, grads, weighted_sum
from tests.tolerances import assert_close

triton = pytest.importorskip("triton", reason="the triton backend needs triton installed")
from sta.backends import triton as triton_backend  # noqa: E402
from sta.kernels import configs as kernel_configs  # noqa: E402
from sta.kernels import flow_step as fs  # noqa: E402
from sta.kernels import routing  # noqa: E402

pytestmark = [pytest.mark.skipif(triton_backend.IMPORT_ERROR is not None,
                                 reason=f"triton unusable: {triton_backend.IMPORT_ERROR}"),
              pytest.mark.usefixtures("one_thread")]

#: where the kernels run: the GPU when there is one, else the CPU interpreter
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _on_device():
    """Tensors and modules of every test are created on DEVICE."""
    with torch.device(DEVICE):
        yield

BACKEND = triton_backend.TritonFlowStep()


def test_parameter_gradients_are_deterministic():
    """Per-field reductions without atomics: the same inputs give bitwise-equal parameter gradients."""
    bank = field_bank(4, 6, 2, 2)
    z = torch.randn(40, 4)
    g_pot = coefficients((40, 2), "on")
    g_rot = coefficients((40, 2), "on")
    runs = []
    for _ in range(2):
        out = sta.flow_step(z, 0.3, g_pot, g_rot, bank, outputs=("z", "div", "hj"), backend="triton")
        runs.append(grads(weighted_sum(out), list(bank.parameters())))
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


@pytest.mark.slow  # opcheck runs the op a dozen ways under the interpreter (1.5-2 s a kind)
@pytest.mark.parametrize("kind", [fs.POTENTIAL, fs.HAMILTONIAN, fs.MLP])
def test_opcheck(kind):
    """Schema, fake tensor, autograd registration and AOT dispatch of the registered ops."""
    args = _op_args(kind)
    torch.library.opcheck(torch.ops.sta.triton_flow_step_fwd.default, args)
    fwd = torch.ops.sta.triton_flow_step_fwd(*args)
    grads_out = [torch.randn_like(o) for o in fwd]
    inputs = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(torch.ops.sta.triton_flow_step_bwd.default, (*grads_out, *inputs))


@pytest.mark.slow
@pytest.mark.parametrize("rotational", ["mlp"])
def test_torch_compile_fullgraph(rotational):
    """flow_step with backend="triton" compiles as one graph (the op is opaque, its fake gives shapes).

    Inductor (the default backend), forward and backward; about 12 s on this machine.
    """
    # the plugin registry is loaded once, under a lock dynamo cannot trace: load it eagerly
    backends.all_backends()
    bank = field_bank(4, 5, 2, 2, rotational)
    z = torch.randn(6, 4, requires_grad=True)
    g_pot = coefficients((6, 2), "mixed")
    g_rot = coefficients((6, 2), "mixed")

    def step(z, g_pot, g_rot):
        out = sta.flow_step(z, 0.4, g_pot, g_rot, bank, outputs=("z", "div", "hj"), backend="triton")
        return out.z, out.div, out.hj

    compiled = torch.compile(step, fullgraph=True)
    got = compiled(z, g_pot, g_rot)
    want = step(z, g_pot, g_rot)
    assert_all_close(got, want, ("z", "div", "hj"), F32)
    assert_close(grads(weighted_sum(got), [z])[0], grads(weighted_sum(want), [z])[0], F32, what="grad z")


# -- GPU only (never run on the CPU interpreter: bf16 does not run there, large shapes are slow) --

@pytest.mark.gpu
@pytest.mark.parametrize("rotational", ["hamiltonian", "mlp"])
def test_gpu_parity_many_blocks(rotational):
    """Several row blocks per field, H and D above one tile, mixed sparsity: fp32 parity on the GPU."""
    check_parity("triton", "flow_step", F32, rotational, Case(300, 70, 100, 4, 3, "mixed"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_low_precision(dtype):
    """flash-attention rule: the kernel's error vs float64 is at most 2x the reference's in dtype."""
    from tests.tolerances import assert_low_precision

    bank64 = field_bank(40, 48, 3, 2, dtype=torch.float64)
    B = 200
    z64 = torch.randn(B, 40, dtype=torch.float64)
    gp64 = coefficients((B, 3), "mixed", torch.float64)
    gr64 = coefficients((B, 2), "mixed", torch.float64)
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
    rotational = "mlp" if sorted(KEPT).index(tile) % 2 else "hamiltonian"
    case = Case(block_m + 3, 5, 19, 2, 2, ("on", "mixed"))  # the first field spans two row blocks
    with kernel_launch.forced_config(KEPT[tile]):
        check_parity("triton", "flow_step", F32, rotational, case)


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
    monkeypatch.setattr(fs, "precision_for", lambda dtype: "tf32_emulated")
    res = check_parity("triton", "flow_step", F32, rotational, "mixed", tol=TF32)
    worst = max(max_rel_error(a, e) for a, e in zip(res.got, res.want))
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
    bank = field_bank(3, 4, 2, 1)
    z = torch.randn(4, 3)
    g_pot, g_rot = coefficients((4, 2), "on"), coefficients((4, 1), "on")
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
