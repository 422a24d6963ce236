"""Benchmark of one sparse flow step (sta.flow_step), against the ways plain PyTorch computes it.

All providers run in one process on the same inputs (float32; the float64 torch reference is the
truth for the error columns). The step is ``outputs=("z", "div")``: the moved latents and the
divergence of the mixed field, what the model uses. Providers:

  (a) ``authors``         authors'-style step, written here: every field for every sample (dense),
                          grad u by autograd, their "Laplacian" = one backward of sum(grad u), i.e.
                          the Hessian-row-sum sum_ij d^2u/dz_i dz_j (NOT the trace), and the mlp
                          divergence as the trace of vmap(jacrev) Jacobians, one per sample of
                          the g-weighted mix (per-field Jacobians would cost Kr times more);
  (b) ``autograd_exact``  dense autograd step with the exact divergence: one backward per
                          coordinate of the velocity (D backward passes), what plain PyTorch pays
                          for the correct quantity;
  (c) ``torch``           our reference, sta.flow_step(backend="torch"), eager;
  (d) ``torch_compile``   the same under torch.compile (graph breaks at the data-dependent
                          routing; compile time reported in the note);
  (e) ``hessian``         dense; trace of torch.func vmap(hessian(u)) for the potential part,
                          vmap(jacrev(r)) for the rotational part;
  (f) ``hutchinson``      dense; one Rademacher probe (eps^T J eps, one backward): unbiased but
                          noisy, its per-sample relative error of div is the ``div_rel_med`` column;
  (g) ``cpu``             the C++ backend; ``triton`` (GPU: timed with triton.testing.do_bench; on
                          the CPU only the interpreter exists: skipped unless named with --providers);
                          ``cuda`` (GPU only).

Fields: Kp potential fields and Kr rotational fields of the ``mlp`` construction: that is the
authors' rotational field, so (a), (b), (e), (f) evaluate exactly the function our backends
evaluate (the default "hamiltonian" construction is divergence-free by construction and would
give the dense baselines nothing to differentiate in the authors' way). Each sample has
``active`` fields switched on among the K = Kp + Kr (coefficients uniform in [0.5, 1.5]).
The dense baselines are written as a PyTorch user would: one batched einsum over all fields.

Modes: ``fwd`` (our providers under torch.no_grad; the autograd baselines need autograd with
respect to z even for the forward) and ``fwd+bwd`` (loss = <w_z, z_next> + <w_div, div> with fixed
random weights, gradients with respect to z, both coefficient tensors and every field parameter).

Columns: median and p20/p80 ms; ``x_authors`` / ``x_exact`` / ``x_torch``: speedup over (a), (b),
(c) in the same shape and mode; ``gflops`` and ``pct_peak``: the useful FLOPs of the sparse step
(formula at :func:`sparse_flops`) per second, against the SGEMM peak measured in the same run;
``peak_mb``: extra memory at the peak of one call; ``err_z`` / ``err_div``: max relative error of
z_next and of div against the float64 reference (max|err| / max|ref|);
``div_rel_med``: median over samples of |div - ref| / |ref|; ``err_grad`` (fwd+bwd): max relative
error of the gradients of z and of every field parameter (the gradient of a zero coefficient is 0
by contract for the sparse providers but not for the dense ones, so coefficients are left out).
``products`` rows: the step's matrix products alone (:func:`products_call`), the floor under every
sparse implementation that uses them; their ``x_torch`` is the largest speedup over the torch
reference that an implementation with no other cost could reach.

A baseline whose single call would take over a minute (``--max-call-s``; estimated from one timed
call at a smaller batch, scaled linearly in B) is skipped, with the estimate in the row.
On a CPU shared with other busy processes, more torch threads than idle cores make every parallel
region wait for a descheduled thread (a 3 ms step then takes 400 ms); ``--threads auto`` (the
default) uses only the cores the load average leaves idle. The thread count and the load average
before and after the run are recorded with the results.

An active-fraction sweep (1/32 .. 1 of 32 fields active per sample) times ``torch`` and the kernel
backends against the number of active pairs and fits time = t0 + c * pairs.

    python benchmarks/bench_flow_step.py --device cpu              # writes results/cpu.csv, cpu.md
    python benchmarks/bench_flow_step.py --device cpu --threads 2  # force the thread count
    python benchmarks/bench_flow_step.py --quick --providers torch cpu --out /tmp/q.csv
    python benchmarks/bench_flow_step.py --device cuda --providers cuda --out bench_cuda.csv
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402


@dataclass(frozen=True)
class Shape:
    """One benchmark size: B samples, latent D, hidden H, Kp potential + Kr mlp fields, ``active``
    fields switched on per sample."""

    name: str
    B: int
    D: int
    H: int
    Kp: int
    Kr: int
    active: int

    @property
    def K(self) -> int:
        return self.Kp + self.Kr

    def label(self) -> str:
        return f"{self.name} B{self.B} D{self.D} H{self.H} K{self.Kp}+{self.Kr}"


SHAPES = {
    # the authors' scale: K=5 fields, split 3 potential + 2 rotational (mlp), 2 active per sample
    "S1": Shape("S1", 128, 226, 226, 3, 2, 2),
    "S2": Shape("S2", 1024, 512, 512, 8, 8, 2),
    "S3": Shape("S3", 512, 1024, 1024, 16, 16, 2),
    # --quick (seconds; used by tests/test_bench_flow_step.py)
    "Q1": Shape("Q1", 16, 12, 12, 3, 2, 2),
    "Q2": Shape("Q2", 24, 20, 16, 4, 4, 2),
}
DEFAULT_SHAPES = ("S1", "S2", "S3")
QUICK_SHAPES = ("Q1", "Q2")
#: active-fraction sweep: (shape with 32 fields, active fields per sample); quick: 8 fields
SWEEP = (Shape("SW", 256, 256, 256, 16, 16, 0), (1, 2, 4, 8, 16, 32))
QUICK_SWEEP = (Shape("QW", 16, 12, 12, 4, 4, 0), (1, 2, 4, 8))
SWEEP_PROVIDERS = ("torch", "cpu", "triton", "cuda")

MODES = ("fwd", "fwd+bwd")
T_STEP, DT = 0.5, 0.1


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------

@dataclass
class Case:
    """Inputs of one shape (float32 on the device) and the float64 reference outputs and gradients."""

    shape: Shape
    fields: "sta.FieldBank"
    z: torch.Tensor
    g_pot: torch.Tensor
    g_rot: torch.Tensor
    w_z: torch.Tensor
    w_div: torch.Tensor
    ref: dict = field(default_factory=dict)

    def rows(self, n: int) -> "Case":
        """The first n samples (same fields): the small batch a cost estimate runs on."""
        return Case(self.shape, self.fields, self.z[:n], self.g_pot[:n], self.g_rot[:n], self.w_z[:n],
                    self.w_div[:n], {})

    def params(self) -> list:
        return list(self.fields.parameters())


def coefficients(B: int, K: int, active: int, gen: torch.Generator) -> torch.Tensor:
    """g: (B, K) with ``active`` distinct non-zero entries per row, uniform in [0.5, 1.5]."""
    g = torch.zeros(B, K)
    cols = torch.rand(B, K, generator=gen).argsort(1)[:, :active]
    g.scatter_(1, cols, 0.5 + torch.rand(B, active, generator=gen))
    return g


def make_case(shape: Shape, device: torch.device, active: Optional[int] = None, seed: int = 0,
              with_reference: bool = True) -> Case:
    """Seeded fields (mlp rotational construction), z: (B, D), coefficients with ``active`` (default
    ``shape.active``) fields on per sample, loss weights, and the float64 reference."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    fields = sta.FieldBank(shape.D, shape.Kp, shape.Kr, shape.H, rotational="mlp")
    g = coefficients(shape.B, shape.K, shape.active if active is None else active, gen)
    z = torch.randn(shape.B, shape.D, generator=gen)
    w_z = torch.randn(shape.B, shape.D, generator=gen)
    w_div = torch.randn(shape.B, generator=gen)
    to = dict(device=device)
    case = Case(shape, fields.to(**to), z.to(**to), g[:, :shape.Kp].contiguous().to(**to),
                g[:, shape.Kp:].contiguous().to(**to), w_z.to(**to), w_div.to(**to))
    if with_reference:
        case.ref = float64_reference(case)
    return case


def float64_reference(case: Case) -> dict:
    """The truth: sta.flow_step(backend="torch") in float64 on a float64 copy of the fields."""
    fields64 = copy.deepcopy(case.fields).double()
    z = case.z.double().requires_grad_()
    gp, gr = case.g_pot.double(), case.g_rot.double()
    out = sta.flow_step(z, T_STEP, gp, gr, fields64, DT, ("z", "div"), backend="torch")
    loss = (out.z * case.w_z.double()).sum() + (out.div * case.w_div.double()).sum()
    grads = torch.autograd.grad(loss, [z, *fields64.parameters()])
    return {"z": out.z.detach(), "div": out.div.detach(), "grads": [x.detach() for x in grads]}


# ----------------------------------------------------------------------------------------------
# the dense fields, as a PyTorch user writes them (field definitions of docs/maths.md 1.1 / 1.2; every
# derivative below comes from autograd / torch.func, not from sta.reference's closed forms)
# ----------------------------------------------------------------------------------------------

def potential_values(z: torch.Tensor, p) -> torch.Tensor:
    """u_k(z) = a_k . tanh(W_k z + c_k) for every field, one sample: z (D,) -> (Kp,)."""
    K, H, D = p.W.shape
    return (torch.tanh((p.W.reshape(K * H, D) @ z).reshape(K, H) + p.c) * p.a).sum(-1)


def mlp_velocities(z: torch.Tensor, p) -> torch.Tensor:
    """r_k(z) = tanh(W2_k tanh(W1_k z + c1_k) + b2_k) for every field, one sample: z (D,) -> (Kr, D)."""
    K, H, D = p.W1.shape
    s = torch.tanh((p.W1.reshape(K * H, D) @ z).reshape(K, H) + p.c1)
    return torch.tanh(torch.stack([p.W2[k] @ s[k] for k in range(K)]) + p.b2)


def rotational_mix(z: torch.Tensor, g_rot: torch.Tensor, p) -> torch.Tensor:
    """sum_k g_rot[k] r_k(z), one sample: (D,), (Kr,) -> (D,)."""
    return g_rot @ mlp_velocities(z, p)


# Written per sample with 2-D products only and batched over samples with vmap, they run as plain
# matrix products ((K*H, D) @ (D, B), (D, H) @ (H, B) per field). Written with einsum or a 3-D
# matmul, vmap(jacrev(.)) materialises a (D, K, D, H) tensor per sample (13 GB at B=128, D=H=226).
def batched_potential_values(z, p):
    return torch.func.vmap(potential_values, in_dims=(0, None))(z, p)


def batched_rotational_mix(z, g_rot, p):
    return torch.func.vmap(rotational_mix, in_dims=(0, 0, None))(z, g_rot, p)


def potential_mix_gradient(z: torch.Tensor, g_pot: torch.Tensor, p) -> torch.Tensor:
    """sum_k g_pot[b, k] grad u_k(z_b) by autograd, kept differentiable: (B, D). z requires grad."""
    return torch.autograd.grad((g_pot * batched_potential_values(z, p)).sum(), z, create_graph=True)[0]


def _leaf(z: torch.Tensor) -> torch.Tensor:
    return z if z.requires_grad else z.detach().requires_grad_()


def trace(jac: torch.Tensor) -> torch.Tensor:
    return jac.diagonal(dim1=-2, dim2=-1).sum(-1)


def authors_step(z, g_pot, g_rot, fields, train: bool, parts: bool = False):
    """(a) The authors'-style step. Returns (z_next, div) (and, with ``parts``, the potential
    part of their div: sum_k g_k * sum_ij d^2 u_k / dz_i dz_j, the Hessian times a ones vector
    summed -- not the Laplacian)."""
    pp, rp = sta.ops.prepare_step(fields, T_STEP)
    z = _leaf(z)
    v = potential_mix_gradient(z, g_pot, pp)
    row_sum = torch.autograd.grad(v.sum(), z, create_graph=train)[0].sum(-1)  # their "u_zz", summed
    r = batched_rotational_mix(z, g_rot, rp)
    jac = torch.func.vmap(torch.func.jacrev(rotational_mix), in_dims=(0, 0, None))(z, g_rot, rp)
    div = row_sum + trace(jac)
    z_next = z + DT * (v + r)
    return (z_next, div, row_sum) if parts else (z_next, div)


def autograd_exact_step(z, g_pot, g_rot, fields, train: bool):
    """(b) Dense, exact divergence: d v_i / d z_i by one backward per coordinate i (D of them)."""
    pp, rp = sta.ops.prepare_step(fields, T_STEP)
    z = _leaf(z)
    v = potential_mix_gradient(z, g_pot, pp) + batched_rotational_mix(z, g_rot, rp)
    div = torch.zeros_like(v[:, 0])
    for i in range(v.shape[1]):
        div = div + torch.autograd.grad(v[:, i].sum(), z, create_graph=train, retain_graph=True)[0][:, i]
    return z + DT * v, div


def hessian_step(z, g_pot, g_rot, fields, train: bool):
    """(e) Dense; div = tr vmap(hessian(sum_k g_k u_k)) + tr vmap(jacrev(sum_k g_k r_k))."""
    pp, rp = sta.ops.prepare_step(fields, T_STEP)
    func = torch.func

    def u_mix(zb, gb):
        return potential_values(zb, pp) @ gb

    def r_mix(zb, gb):
        return rotational_mix(zb, gb, rp)

    v = func.vmap(func.grad(u_mix))(z, g_pot) + func.vmap(r_mix)(z, g_rot)
    div = func.vmap(lambda zb, gb: trace(func.hessian(u_mix)(zb, gb)))(z, g_pot)
    div = div + func.vmap(lambda zb, gb: trace(func.jacrev(r_mix)(zb, gb)))(z, g_rot)
    return z + DT * v, div


def hutchinson_step(z, g_pot, g_rot, fields, train: bool):
    """(f) Dense; div ~ eps^T J eps with one Rademacher probe eps per sample (one backward)."""
    pp, rp = sta.ops.prepare_step(fields, T_STEP)
    z = _leaf(z)
    v = potential_mix_gradient(z, g_pot, pp) + batched_rotational_mix(z, g_rot, rp)
    eps = torch.empty_like(z).bernoulli_(0.5).mul_(2).sub_(1)
    div = (torch.autograd.grad(v, z, eps, create_graph=train)[0] * eps).sum(-1)
    return z + DT * v, div


# ----------------------------------------------------------------------------------------------
# providers: build(case) -> step(z, g_pot, g_rot, train) -> (z_next, div)
# ----------------------------------------------------------------------------------------------

providers = H.Providers()
#: providers that need autograd for their forward; their cost is estimated before measuring
DENSE_BASELINES = ("authors", "autograd_exact", "hessian", "hutchinson")
#: A lower bound of the matrix products (one row times a D x H matrix) per sample of the dense
#: baselines that differentiate once per coordinate: D vector-Jacobian (or Jacobian-vector)
#: products, each through the two weight matrices of every field it covers. authors: the
#: jacrev of the Kr mlp fields; autograd_exact and hessian: all Kp + Kr fields.
DENSE_PRODUCTS_PER_SAMPLE = {
    "authors": lambda s: s.D * 2 * s.Kr,
    "autograd_exact": lambda s: s.D * 2 * (s.Kp + s.Kr),
    "hessian": lambda s: s.D * 2 * (s.Kp + s.Kr),
}


def _dense(step_fn):
    def build(case):
        return lambda z, gp, gr, train: step_fn(z, gp, gr, case.fields, train)
    return build


providers.register("authors", "(a) authors-style")(_dense(authors_step))
providers.register("autograd_exact", "(b) autograd exact")(_dense(autograd_exact_step))


def _flow_step(backend: str):
    def build(case):
        def step(z, gp, gr, train):
            out = sta.flow_step(z, T_STEP, gp, gr, case.fields, DT, ("z", "div"), backend=backend)
            return out.z, out.div
        return step
    return build


providers.register("torch", "(c) torch reference")(_flow_step("torch"))


@providers.register("torch_compile", "(d) torch.compile")
def _torch_compile(case):
    torch._dynamo.reset()  # a fresh cache per shape: no recompiles against an earlier shape
    compiled = torch.compile(_flow_step("torch")(case))
    return lambda z, gp, gr, train: compiled(z, gp, gr, train)


providers.register("hessian", "(e) vmap(hessian)")(_dense(hessian_step))
providers.register("hutchinson", "(f) hutchinson")(_dense(hutchinson_step))
providers.register("cpu", "(g) cpu backend", devices=("cpu",))(_flow_step("cpu"))
providers.register("triton", "triton backend")(_flow_step("triton"))
providers.register("cuda", "cuda backend", devices=("cuda",))(_flow_step("cuda"))


def unavailable(name: str, device: torch.device, named: bool) -> Optional[str]:
    """Why provider ``name`` cannot run on ``device`` (None when it can)."""
    if name == "triton" and device.type == "cpu" and not named:
        return "interpreter only (the Triton interpreter is a test mode on CPU; name it with --providers to run it)"
    if name in ("cpu", "triton", "cuda"):
        backend = sta.backends.get_backend(name)
        request = sta.backends.Request("flow_step", device, torch.float32, requires_grad=True)
        reasons = backend.why_not(request)
        if reasons:
            return "; ".join(reasons)
    return None


# ----------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------

def make_call(name: str, step: Callable, case: Case, mode: str) -> Callable:
    """The timed callable of one provider and mode; returns ((z_next, div), grads or None)."""
    z, gp, gr = case.z, case.g_pot, case.g_rot
    if mode == "fwd":
        if name in DENSE_BASELINES:  # they need autograd w.r.t. z even to run forward
            return lambda: (step(z, gp, gr, False), None)

        def fwd():
            with torch.no_grad():
                return step(z, gp, gr, False), None
        return fwd
    zl, gpl, grl = (x.detach().requires_grad_() for x in (z, gp, gr))
    inputs = [zl, gpl, grl, *case.params()]

    def fwd_bwd():
        z_next, div = step(zl, gpl, grl, True)
        loss = (z_next * case.w_z).sum() + (div * case.w_div).sum()
        return (z_next, div), torch.autograd.grad(loss, inputs)
    return fwd_bwd


def max_rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    scale = e.abs().max().item()
    err = (a - e).abs().max().item()
    return err / scale if scale > 0 else err


def errors(case: Case, result) -> dict:
    (z_next, div), grads = result
    ref = case.ref
    div64 = div.detach().double()
    per_sample = ((div64 - ref["div"]).abs() / ref["div"].abs().clamp_min(1e-30)).median().item()
    out = {"err_z": max_rel(z_next, ref["z"]),
           "err_div": max_rel(div64, ref["div"]), "div_rel_med": per_sample}
    if grads is not None:  # grads = (z, g_pot, g_rot, *params); reference = (z, *params)
        ours = [grads[0], *grads[3:]]
        out["err_grad"] = max(max_rel(a, e) for a, e in zip(ours, ref["grads"]))
    return out


def sparse_flops(shape: Shape, pairs_pot: int, pairs_rot: int, mode: str) -> float:
    """Useful FLOPs of the sparse step: its matrix products on the active pairs only.

    Each product is one row times a (D x H) matrix: 2 D H FLOPs per active pair. Forward:
    potential 2 products (h = W z, v = W^T (a s')), mlp 3 (h1 = W1 z, h2 = W2 s1, and the exact
    divergence E = (W2 o W1^T) s1'). Forward + backward: 3x the forward (each product's backward
    is one product for the input gradient and one for the weight gradient); recomputation inside
    a backward is not counted, so the figure is a lower bound of the work a kernel does.
    """
    products = 2 * pairs_pot + 3 * pairs_rot
    return 2.0 * shape.D * shape.H * products * (1 if mode == "fwd" else 3)


def products_call(case: Case, mode: str, device: torch.device) -> Callable:
    """The matrix products of the sparse step alone, as :func:`sparse_flops` counts them, on
    preallocated buffers: per field with n active pairs, the forward's (n x a) @ (a x b) products
    (potential: D -> H, H -> D; mlp: D -> H, H -> D twice) and, for fwd+bwd, each one's input
    gradient (n x b) @ (b x a) and weight gradient (a x n) @ (n x b). Its time is a floor for any
    implementation of the step built on these products (``products`` rows): what a backend spends
    beyond it is its elementwise work, its glue and the time conditioning of the fields."""
    shape = case.shape
    D, H = shape.D, shape.H
    counts = [int(n) for n in (case.g_pot != 0).sum(0)] + [int(n) for n in (case.g_rot != 0).sum(0)]
    dims = [[(D, H), (H, D)]] * shape.Kp + [[(D, H), (H, D), (H, D)]] * shape.Kr
    calls = []
    for n, field_dims in zip(counts, dims):
        if n == 0:
            continue
        for a, b in field_dims:
            x, w, out = (torch.randn(*size, device=device) for size in ((n, a), (a, b), (n, b)))
            calls.append((x, w, out))
            if mode == "fwd+bwd":
                gx, gw = torch.empty(n, a, device=device), torch.empty(a, b, device=device)
                calls.append((out, w.t(), gx))   # input gradient
                calls.append((x.t(), out, gw))   # weight gradient

    def run():
        for x, w, out in calls:
            torch.mm(x, w, out=out)
    return run


def time_call(name: str, call: Callable, device: torch.device, args, est_s: Optional[float]) -> H.Timing:
    if name == "triton" and device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(call, quantiles=[0.5, 0.2, 0.8])
        return H.Timing(med, p20, p80, 0)
    if est_s is not None and est_s > args.slow_call_s:  # slow baseline: one timed call, no warm-up
        return H.measure(call, device, warmup=0, reps=1, min_reps=1)
    return H.measure(call, device, warmup=1, reps=args.reps, min_reps=3, budget_s=args.budget_s)


def estimate_seconds(name, step, case: Case, mode: str, device, args) -> tuple:
    """(estimated seconds of one full call, how it was estimated).

    One call at B=1 scaled by B is an upper bound (fixed per-call costs are scaled too); when
    that bound exceeds ``--slow-call-s``, calls at B = 4, 16, ... (at most B/16) refine it by
    linear extrapolation from the last two, until the estimate is clearly above or below
    ``--max-call-s`` (a factor of 3) or the batches run out.
    """
    B = case.shape.B

    def timed(n):
        call = make_call(name, step, case.rows(n), mode)
        H._sync(device)
        t0 = time.perf_counter()
        call()
        H._sync(device)
        return time.perf_counter() - t0

    n_prev, t_prev = 1, timed(1)
    est, how = t_prev * B, f"one call at B=1 took {t_prev:.2f} s, x{B}"
    n = 4
    while est > args.slow_call_s and n <= B // 16:
        t = timed(n)
        est = t + max(0.0, (t - t_prev) / (n - n_prev)) * (B - n)
        how = f"calls at B={n_prev}, {n} took {t_prev:.2f}, {t:.2f} s, extrapolated linearly to B={B}"
        if not args.max_call_s / 3 < est < 3 * args.max_call_s:
            break
        n_prev, t_prev, n = n, t, 4 * n
    return est, how


def run_case(case: Case, names: list, device, args, sgemm_gflops: float) -> list:
    shape = case.shape
    rows = []
    pairs_pot = int((case.g_pot != 0).sum())
    pairs_rot = int((case.g_rot != 0).sum())
    for mode in MODES:
        skipped_fwd = {r["provider"] for r in rows if r["what"] == "skipped"}
        for name in names:
            base = dict(section="step", shape=shape.name, provider=name, mode=mode, B=shape.B, D=shape.D,
                        H=shape.H, Kp=shape.Kp, Kr=shape.Kr, active=shape.active, pairs=pairs_pot + pairs_rot,
                        dtype="float32", rotational="mlp")
            step = providers._items[name].build(case)
            est_s, note = None, ""
            if name in skipped_fwd:  # fwd+bwd costs more than fwd
                rows.append(dict(base, what="skipped", note="fwd was skipped; fwd+bwd costs more"))
                continue
            if name in DENSE_PRODUCTS_PER_SAMPLE:  # skip without running when even the bound is too slow
                flops = DENSE_PRODUCTS_PER_SAMPLE[name](shape) * shape.B * 2.0 * shape.D * shape.H
                bound_s = flops / (sgemm_gflops * 1e9)
                if bound_s > args.max_call_s:
                    note = (f"skipped: one call takes at least {bound_s:.0f} s > {args.max_call_s:.0f} s "
                            f"({flops / 1e12:.1f} TFLOP of per-coordinate derivative products at the SGEMM peak)")
                    print(f"  {shape.name} {mode:7s} {name}: {note}", flush=True)
                    rows.append(dict(base, what="skipped", est_ms=bound_s * 1e3, note=note))
                    continue
            if name in DENSE_BASELINES:
                est_s, how = estimate_seconds(name, step, case, mode, device, args)
                if est_s > args.max_call_s:
                    note = f"skipped: one call would take ~{est_s:.0f} s > {args.max_call_s:.0f} s ({how})"
                    print(f"  {shape.name} {mode:7s} {name}: {note}", flush=True)
                    rows.append(dict(base, what="skipped", est_ms=est_s * 1e3, note=note))
                    continue
            call = make_call(name, step, case, mode)
            if name == "torch_compile":
                t0 = time.perf_counter()
                call()
                H._sync(device)
                note = f"first call (compiles) {time.perf_counter() - t0:.1f} s"
            timing = time_call(name, call, device, args, est_s)
            result = call()
            row = dict(base, what="measured", median_ms=timing.median, p20_ms=timing.p20, p80_ms=timing.p80,
                       reps=timing.reps, **errors(case, result))
            del result
            flops = sparse_flops(shape, pairs_pot, pairs_rot, mode)
            row["gflops"] = flops / (timing.median * 1e-3) / 1e9
            row["pct_peak"] = 100 * row["gflops"] / sgemm_gflops
            if est_s is None or est_s <= args.slow_call_s:
                row["peak_mb"] = H.peak_memory_mb(call, device)
            else:
                note = (note + "; " if note else "") + "peak memory not measured (one slow call timed)"
            row["note"] = note
            print(f"  {shape.name} {mode:7s} {name:15s} {timing}", flush=True)
            rows.append(row)
        timing = H.measure(products_call(case, mode, device), device, warmup=1, reps=args.reps, min_reps=3,
                           budget_s=args.budget_s)
        flops = sparse_flops(shape, pairs_pot, pairs_rot, mode)
        rows.append(dict(section="step", shape=shape.name, provider="products", mode=mode, B=shape.B, D=shape.D,
                         H=shape.H, Kp=shape.Kp, Kr=shape.Kr, active=shape.active, pairs=pairs_pot + pairs_rot,
                         dtype="float32", rotational="mlp", what="measured", median_ms=timing.median,
                         p20_ms=timing.p20, p80_ms=timing.p80, reps=timing.reps,
                         gflops=flops / (timing.median * 1e-3) / 1e9,
                         pct_peak=100 * flops / (timing.median * 1e-3) / 1e9 / sgemm_gflops,
                         note="the step's matrix products alone (products_call): a floor, not an implementation"))
        print(f"  {shape.name} {mode:7s} {'products':15s} {timing}", flush=True)
    for row in rows:  # speedups against the references of the same shape and mode
        for ref_name, col in (("authors", "x_authors"), ("autograd_exact", "x_exact"), ("torch", "x_torch")):
            ref = [r for r in rows if r["provider"] == ref_name and r["mode"] == row["mode"]
                   and r["what"] == "measured"]
            if ref and row["what"] == "measured":
                row[col] = ref[0]["median_ms"] / row["median_ms"]
    return rows


#: consecutive forward steps captured in one CUDA graph (issue 5 target: per step, under a graph of 16)
GRAPH_STEPS = 16


def cuda_graph_rows(case: Case, names: list, device, args) -> list:
    """Per-step time of GRAPH_STEPS chained forward steps (z_{t+1} = step(z_t)) replayed from one
    CUDA graph, for the providers that run on the GPU. Launch overhead dominates a step at the
    authors' scale, so this is the figure a training loop under CUDA graphs sees. A provider that
    cannot be captured (e.g. one that copies routing sizes to the host) gets a skipped row saying why.
    """
    rows = []
    for name in names:
        if name not in ("torch", "triton", "cuda"):
            continue
        step = providers._items[name].build(case)
        base = dict(section="step", shape=case.shape.name, provider=name, mode=f"fwd graph x{GRAPH_STEPS}",
                    B=case.shape.B, D=case.shape.D, H=case.shape.H, Kp=case.shape.Kp, Kr=case.shape.Kr,
                    active=case.shape.active, dtype="float32", rotational="mlp")
        z0 = case.z.clone()

        def chain():
            z = z0
            for _ in range(GRAPH_STEPS):
                z, _ = step(z, case.g_pot, case.g_rot, False)
            return z

        try:
            with torch.no_grad():
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up (autotuning, allocator) outside the capture
                    for _ in range(3):
                        chain()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    chain()
        except Exception as err:
            note = f"not capturable in a CUDA graph: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
            print(f"  {case.shape.name} graph   {name}: {note}", flush=True)
            rows.append(dict(base, what="skipped", note=note))
            continue
        timing = H.measure(graph.replay, device, warmup=1, reps=args.reps, min_reps=3, budget_s=args.budget_s)
        rows.append(dict(base, what="measured", median_ms=timing.median / GRAPH_STEPS,
                         p20_ms=timing.p20 / GRAPH_STEPS, p80_ms=timing.p80 / GRAPH_STEPS, reps=timing.reps,
                         note=f"per step: {GRAPH_STEPS} chained steps replayed from one CUDA graph"))
        print(f"  {case.shape.name} graph   {name:15s} {timing} / {GRAPH_STEPS}", flush=True)
    return rows


def run_sweep(sweep, names: list, device, args) -> tuple:
    """Time the step against the number of active pairs; fit time = t0 + c * pairs per provider."""
    shape, actives = sweep
    rows, fits = [], []
    cases = [make_case(shape, device, active=a, with_reference=False) for a in actives]
    for name in names:
        for mode in MODES:
            points = []
            for active, case in zip(actives, cases):
                call = make_call(name, providers._items[name].build(case), case, mode)
                timing = time_call(name, call, device, args, None)
                pairs = int((case.g_pot != 0).sum() + (case.g_rot != 0).sum())
                points.append((pairs, timing.median))
                rows.append(dict(section="sweep", shape=shape.name, provider=name, mode=mode, what="measured",
                                 B=shape.B, D=shape.D, H=shape.H, Kp=shape.Kp, Kr=shape.Kr, active=active,
                                 fraction=f"{active}/{shape.K}", pairs=pairs, median_ms=timing.median,
                                 p20_ms=timing.p20, p80_ms=timing.p80, reps=timing.reps,
                                 us_per_pair=1e3 * timing.median / pairs, dtype="float32", rotational="mlp"))
            fits.append(dict(provider=name, mode=mode, **linear_fit(points)))
            f = fits[-1]
            print(f"  sweep {name:6s} {mode:7s} time = {f['t0_ms']:.2f} ms + {f['us_per_pair']:.2f} us x pairs "
                  f"(R^2 {f['r2']:.4f})", flush=True)
    return rows, fits


def linear_fit(points: list) -> dict:
    """Least squares time_ms = t0 + c * pairs; R^2 of the fit."""
    xs, ys = [float(p) for p, _ in points], [t for _, t in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    c = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    t0 = my - c * mx
    ss_res = sum((y - t0 - c * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"t0_ms": t0, "us_per_pair": 1e3 * c, "r2": 1 - ss_res / ss_tot if ss_tot > 0 else 1.0}


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------

STEP_COLUMNS = ["shape", "provider", "mode", "median_ms", "p20_ms", "p80_ms", "x_authors", "x_exact", "x_torch",
                "gflops", "pct_peak", "peak_mb", "err_z", "err_div", "div_rel_med", "err_grad", "note"]
SWEEP_COLUMNS = ["provider", "mode", "fraction", "pairs", "median_ms", "p20_ms", "p80_ms", "us_per_pair"]


def _find(rows, shape, provider, mode):
    hits = [r for r in rows if r.get("section") == "step" and r["shape"] == shape and r["provider"] == provider
            and r["mode"] == mode and r["what"] == "measured"]
    return hits[0] if hits else None


def targets(rows: list, kernel: str) -> list:
    """Issue targets that this run can judge: (text, value, met)."""
    out = []
    s1 = _find(rows, "S1", kernel, "fwd+bwd")
    if s1 is not None:
        for col, name, goal in (("x_exact", "(b) autograd exact", 30.0), ("x_torch", "(c) torch reference", 2.0)):
            if col in s1:
                out.append((f"S1 fwd+bwd: {kernel} >= {goal:g}x faster than {name}", f"{s1[col]:.1f}x",
                            s1[col] >= goal))
    for mode in MODES:
        s3 = _find(rows, "S3", kernel, mode)
        if s3 is not None:
            out.append((f"S3 (D=1024) {mode}: {kernel} >= 50% of the SGEMM peak", f"{s3['pct_peak']:.0f}%",
                        s3["pct_peak"] >= 50))
    return out


def _md_table(rows: list, columns: list) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(H._fmt(r.get(c)).replace("|", "/") for c in columns) + " |")
    return "\n".join(lines)


def summary(rows: list, kernel: str) -> list:
    """One row per shape and mode: the kernel backend against the references."""
    out = []
    for r in rows:
        if r.get("section") == "step" and r["provider"] == kernel and r["what"] == "measured":
            torch_row = _find(rows, r["shape"], "torch", r["mode"])
            floor = _find(rows, r["shape"], "products", r["mode"])
            out.append({"shape": r["shape"], "mode": r["mode"], f"{kernel}_ms": r["median_ms"],
                        "torch_ms": torch_row["median_ms"] if torch_row else None,
                        "products_ms": floor["median_ms"] if floor else None,
                        **{c: r.get(c) for c in ("x_torch", "x_exact", "x_authors", "gflops", "pct_peak")}})
    return out


def write_markdown(path: str, rows: list, sweep_rows: list, fits: list, prov: dict, header: list,
                   target_lines: list, kernel: str) -> None:
    step_rows = [r for r in rows if r.get("section") == "step"]
    short = summary(rows, kernel)
    parts = ["# sta.flow_step benchmark", "", *header, ""]
    if short:
        parts += [f"Summary: the {kernel} backend (x_*: speedup over the torch reference, the dense autograd "
                  "step with the exact divergence, the authors-style step; '-': that baseline was skipped, "
                  "see the full table).", "", _md_table(short, list(short[0])), ""]
    parts += ["## All providers", "",
             "Generated by `python benchmarks/bench_flow_step.py` (see its docstring for the providers and "
             "every column). Times in ms (median, p20, p80); x_*: speedup over (a) authors-style, "
             "(b) dense autograd with the exact divergence, (c) our torch reference; gflops: useful "
             "FLOPs of the sparse step per second; pct_peak: of the SGEMM peak measured in the same run; "
             "err_*: max relative error vs float64.", "",
             _md_table(step_rows, STEP_COLUMNS), ""]
    if sweep_rows:
        parts += ["## Active-fraction sweep", "", _md_table(sweep_rows, SWEEP_COLUMNS), "",
                  "Least-squares fit time = t0 + c x active pairs:", "",
                  _md_table(fits, ["provider", "mode", "t0_ms", "us_per_pair", "r2"]), ""]
    if target_lines:
        parts += ["## Targets (issue 3)", ""]
        parts += [f"- {'met' if met else 'NOT met'}: {text} (measured {value})" for text, value, met in target_lines]
        parts.append("")
    parts += ["## Provenance", ""] + [f"- {k}: {v}" for k, v in prov.items()] + [""]
    with open(path, "w") as f:
        f.write("\n".join(parts))


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--providers", nargs="+", default=None,
                   help="subset of: authors autograd_exact torch torch_compile hessian hutchinson cpu triton cuda")
    p.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES),
                   help=f"default {' '.join(DEFAULT_SHAPES)} ({' '.join(QUICK_SHAPES)} with --quick)")
    p.add_argument("--out", default=None, help="CSV path (default benchmarks/results/<device>.csv); "
                                               "a Markdown table is written next to it (.md)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repetitions (seconds)")
    p.add_argument("--reps", type=int, default=None, help="max timed calls per measurement (default 10, quick 3)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop repeating a measurement after this many seconds (default 2, quick 0.2)")
    p.add_argument("--max-call-s", type=float, default=60.0, help="skip a baseline whose one call would take longer")
    p.add_argument("--slow-call-s", type=float, default=5.0,
                   help="a baseline call estimated above this is timed once, without warm-up or memory profile")
    p.add_argument("--no-sweep", action="store_true", help="skip the active-fraction sweep")
    p.add_argument("--threads", default="auto",
                   help="torch intra-op threads, or 'auto' (default): torch's choice on an idle machine, else "
                        "the cores the load average leaves idle (at least 1). More threads than idle cores "
                        "make every parallel region wait for a descheduled thread")
    return p


def choose_threads(value: str, device: torch.device) -> tuple:
    """(intra-op threads, why). 'auto' on a CPU: all of torch's threads unless other processes keep
    cores busy (1-minute load average), then only the idle cores."""
    default = torch.get_num_threads()
    if value != "auto":
        return int(value), "--threads"
    if device.type != "cpu":
        return default, "torch's default"
    load = os.getloadavg()[0]
    idle = max(1, int((os.cpu_count() or 1) - load + 0.5))
    if idle >= default:
        return default, f"auto: torch's default; load average {load:.1f} on {os.cpu_count()} cpus"
    return idle, f"auto: load average {load:.1f} on {os.cpu_count()} cpus leaves {idle} idle; --threads N overrides"


def _wants_interpreter(argv) -> bool:
    args, _ = parser().parse_known_args(argv)
    return args.device == "cpu" and "triton" in (args.providers or [])


# The Triton interpreter must be chosen before triton is imported (by sta), and only when the user
# names the triton provider on the CPU.
if __name__ == "__main__" and _wants_interpreter(sys.argv[1:]):
    os.environ["TRITON_INTERPRET"] = "1"

import sta  # noqa: E402
import sta.backends  # noqa: E402
import sta.ops  # noqa: E402


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_flow_step: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    threads, why = choose_threads(args.threads, device)
    torch.set_num_threads(threads)
    print(f"torch threads: {threads} ({why})", flush=True)
    args.reps = args.reps or (3 if args.quick else 10)
    args.budget_s = args.budget_s if args.budget_s is not None else (0.2 if args.quick else 2.0)
    shapes = [SHAPES[s] for s in (args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES))]
    known = providers.names()
    named = args.providers is not None
    names = args.providers or [p.name for p in providers.for_device(device.type)]
    bad = [n for n in names if n not in known]
    if bad:
        print(f"bench_flow_step: unknown providers {bad}; expected a subset of {known}", file=sys.stderr)
        return 2
    out_path = args.out or os.path.join(H.RESULTS_DIR, f"{device.type}.csv")
    md_path = os.path.splitext(out_path)[0] + ".md"
    load_before = os.getloadavg()
    start = time.perf_counter()

    rows, runnable = [], []
    for name in names:
        if device.type not in providers._items[name].devices:
            reason = f"runs on {', '.join(providers._items[name].devices)} only"
        else:
            reason = unavailable(name, device, named and name in args.providers)
        if reason:
            print(f"  {name}: skipped ({reason})", flush=True)
            rows.append(dict(section="step", shape="all", provider=name, mode="all", what="skipped", note=reason))
        else:
            runnable.append(name)

    sgemm = H.sgemm_peak_gflops(device, n=512 if args.quick else 2048, budget_s=0.5 if args.quick else 3.0)
    print(f"SGEMM peak: {sgemm:.1f} GFLOP/s", flush=True)
    for shape in shapes:
        t0 = time.perf_counter()
        case = make_case(shape, device)
        print(f"{shape.label()}: inputs and float64 reference in {time.perf_counter() - t0:.1f} s", flush=True)
        # measured rows first, the providers skipped for the whole run last
        graph = cuda_graph_rows(case, runnable, device, args) if device.type == "cuda" else []
        rows = [r for r in rows if r["shape"] != "all"] + run_case(case, runnable, device, args, sgemm) + \
            graph + [r for r in rows if r["shape"] == "all"]
        del case

    sweep_rows, fits = [], []
    sweep_names = [n for n in runnable if n in SWEEP_PROVIDERS]
    if not args.no_sweep and sweep_names:
        sweep = QUICK_SWEEP if args.quick else SWEEP
        print(f"active-fraction sweep at {sweep[0].label()}", flush=True)
        sweep_rows, fits = run_sweep(sweep, sweep_names, device, args)

    load_after = os.getloadavg()
    prov = H.provenance(device)
    prov["command"] = " ".join(["python benchmarks/bench_flow_step.py", *(sys.argv[1:] if argv is None else argv)])
    prov["threads"] = f"{threads} ({why})"
    prov["sgemm_peak_gflops"] = round(sgemm, 1)
    prov["load_avg_before"] = " ".join(f"{x:.2f}" for x in load_before)
    prov["load_avg_after"] = " ".join(f"{x:.2f}" for x in load_after)
    prov["wall_s"] = round(time.perf_counter() - start, 1)
    kernel = "cpu" if device.type == "cpu" else "cuda"
    target_lines = targets(rows, kernel)
    header = [f"Command: `{prov['command']}`.",
              f"Machine: {prov['machine']}; torch {prov['torch']}; git {prov['git_sha']}; {prov['date']}.",
              f"SGEMM peak (float32, measured in this run): {sgemm:.1f} GFLOP/s. Load average before / after: "
              f"{prov['load_avg_before']} / {prov['load_avg_after']} (the CPU is shared). "
              f"Wall time {prov['wall_s']} s."]
    print()
    H.print_table([r for r in rows if r.get("section") == "step"], STEP_COLUMNS,
                  title=f"flow_step, float32, outputs (z, div) -- {prov['machine']}; SGEMM peak {sgemm:.1f} GFLOP/s")
    if sweep_rows:
        print()
        H.print_table(sweep_rows, ["shape"] + SWEEP_COLUMNS, title="active-fraction sweep")
        print()
        H.print_table(fits, ["provider", "mode", "t0_ms", "us_per_pair", "r2"],
                      title="fit: time = t0 + c x active pairs")
    short = summary(rows, kernel)
    if short:
        print()
        H.print_table(short, list(short[0]), title=f"summary: the {kernel} backend")
    for text, value, met in target_lines:
        print(f"target {'met' if met else 'NOT met'}: {text} (measured {value})")
    for r in fits:  # the fit as CSV rows too
        sweep_rows.append(dict(section="sweep_fit", shape=(QUICK_SWEEP if args.quick else SWEEP)[0].name,
                               what="fit", **r))
    H.write_csv(out_path, rows + sweep_rows, prov)
    write_markdown(md_path, rows, [r for r in sweep_rows if r["section"] == "sweep"], fits, prov, header,
                   target_lines, kernel)
    print(f"wrote {out_path} and {md_path} ({prov['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
