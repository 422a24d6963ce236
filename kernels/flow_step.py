"""Triton kernels of the sparse flow step (docs/maths.md section 2): forward and backward, all field kinds.

Mixture-of-experts layout. The active (sample, field) pairs -- ``g[b, k] != 0`` -- are sorted by
field and each field's list of sample indices is padded to a multiple of ``BLOCK_M`` with -1
(:func:`route`): the index lists are padded, never the data. A program owns one block of
``BLOCK_M`` rows of one field; it gathers its rows of ``z`` by index, runs the grouped matrix
products with ``tl.dot`` (fp32 accumulation; operand precision from :func:`precision_for`)
and applies the field's epilogue in registers. Per-row intermediates live in padded buffers of
shape ``(Npad, H)`` or ``(Npad, D)``, ``Npad = BLOCK_M * num_blocks <= B*K + K*BLOCK_M``; padding
rows are written as exact zeros, so per-field reductions can run over whole blocks.

Field kinds (``KIND``), with the maths of :mod:`sta.reference` (s = tanh h, s1 = 1 - s^2,
s2 = -2 s s1, s3 = -2 s1 (1 - 3 s^2)):

* ``POTENTIAL`` (0): h = W z + c; v = W^T (a s1); u = a.s; lap = sum a s2 |W_j|^2;
  du/dt = sum a s1 de; hj = du/dt + |v|^2 / 2.
* ``HAMILTONIAN`` (1): same hidden layer; r = M (a s1) with M = A W^T (K, D, H) precomputed per
  step; div = 0 exactly; curl = d^T Q d with d = a s2 and Q = G - N o N^T (K, H, H) built from
  :func:`sta.reference.hamiltonian_curl_matrices` by the caller.
* ``MLP`` (2): s = tanh(W1 z + c1); r = tanh(W2 s + b2); div = sum_i (1 - r_i^2) [C (1 - s^2)]_i
  with C = W2 o W1^T (K, D, H) precomputed per step by the caller.

Forward (:func:`flow_step_fwd`): ``_flow_step_hidden_fwd_kernel`` (z -> hidden activations and
per-row scalars) then ``_flow_step_fwd_kernel`` (hidden -> velocity rows, fused epilogue, g-weighted
scatter-add into ``velocity`` and ``div``, per-pair outputs written in place; curl).

Backward (:func:`flow_step_bwd`), recomputing the forward like flash-attention (nothing
data-dependent is saved between the passes): hidden recompute, ``_flow_step_bwd_kernel`` (output
stage: gradient w.r.t. the velocity rows and the coefficients), ``_flow_step_hidden_bwd_kernel``
(gradient w.r.t. h and per-row parameter contributions), ``_flow_step_dz_bwd_kernel`` (scatter-add
into dz) and ``_flow_step_param_bwd_kernel``: parameter gradients as a deterministic per-field
reduction (each program owns one output tile of one field and loops over that field's row blocks
in order; no float atomics on parameters).

The only atomics are the scatter-adds into ``velocity``, ``div`` and ``dz`` (several fields add to
the same sample), as in a mixture-of-experts combine; so the launchers refuse to run under
``torch.use_deterministic_algorithms(True)`` (:func:`deterministic_refusal`).

Every launch goes through :func:`sta.kernels.launch.launch`: ``python -m sta.kernels.aot``
records the launchers' own arguments and compiles each kernel for sm_80 / sm_90 without a GPU.
"""
from __future__ import annotations

import os
import warnings
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .launch import launch

__all__ = [
    "POTENTIAL",
    "HAMILTONIAN",
    "MLP",
    "Routing",
    "route",
    "flow_step_fwd",
    "flow_step_bwd",
    "interpreting",
    "precision_for",
    "deterministic_refusal",
    "keep_configs",
    "gpu_configs",
    "spill_key",
    "load_spills",
    "PRECISIONS",
]

POTENTIAL, HAMILTONIAN, MLP = 0, 1, 2


def interpreting() -> bool:
    """True when Triton runs through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def precision_for(dtype: torch.dtype) -> str:
    """The ``tl.dot`` precision mode (``PRECISIONS``) for inputs of ``dtype``.

    float32 follows ``torch.get_float32_matmul_precision()`` like torch's own matmuls: "highest"
    (torch's default) -> "ieee" (exact fp32 products on the FMA units, the parity mode);
    "high" / "medium" -> "tf32" (tensor cores, operands rounded to 10 mantissa bits, fp32
    accumulation). bfloat16 / float16 -> "bf16" / "fp16": ``tl.dot`` on operands in the input
    dtype with fp32 accumulation (tensor cores); per-row intermediates stay fp32.
    """
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    return "ieee" if _matmul_precision() == "highest" else "tf32"


@torch.compiler.assume_constant_result
def _matmul_precision() -> str:
    # a constant for torch.compile: dynamo cannot put a function returning a str into the graph
    return torch.get_float32_matmul_precision()


def deterministic_refusal() -> str:
    """Why the kernels may not run under ``torch.use_deterministic_algorithms(True)`` ('' if they may).

    The velocity, divergence and dz scatter-adds are float atomics (several fields add to one
    sample): their order, so their rounding, varies from run to run on a GPU. In warn-only mode
    (``use_deterministic_algorithms(True, warn_only=True)``) this returns '' and the launchers warn.
    """
    if torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled():
        return ("torch.use_deterministic_algorithms(True) is set, and the Triton flow-step kernels accumulate "
                "velocity, div and dz with float atomics (order-dependent on a GPU); use backend='cpu' or "
                "'torch', or warn_only=True")
    return ""


def _check_deterministic():
    reason = deterministic_refusal()
    if reason:
        raise RuntimeError(reason)
    if torch.are_deterministic_algorithms_enabled():
        warnings.warn("the Triton flow-step kernels accumulate with float atomics: not bit-reproducible on a GPU "
                      "(torch.use_deterministic_algorithms(True, warn_only=True))", stacklevel=3)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


# ----------------------------------------------------------------------------------------------
# Launch configurations.
# ----------------------------------------------------------------------------------------------

#: ``tl.dot`` precision modes (the INPUT_PRECISION constexpr of every kernel, see ``_dot``):
#: float32 inputs run "ieee" or "tf32" (:func:`precision_for`), bfloat16 / float16 inputs
#: "bf16" / "fp16"; "tf32_emulated" is the interpreter's stand-in for "tf32" (tests only).
PRECISIONS = ("ieee", "tf32", "bf16", "fp16", "tf32_emulated")
#: modes whose products run on the FMA units (operand tiles in registers) vs. tensor cores
_FMA = ("ieee", "tf32_emulated")

#: Tile spaces, (BLOCK_H, BLOCK_D), in order of preference (largest first); :func:`keep_configs`
#: keeps the first one that fits the launch. Chosen from the AOT tables of
#: ``python -m sta.kernels.aot`` (sm_80/sm_90): the earlier 8-config space (4-8 warps, 2-3 stages,
#: tiles up to 128x128) spilled in 231 of 460 compiles -- "ieee" lowers tl.dot to FMA with both
#: operand tiles in registers (32x32 tiles, 4 warps, 2 stages, BLOCK_M = 64: 255 registers + 372 B
#: spill) and 64/128-wide tf32 tiles at 3 stages spilled 0.4-3 KB and needed up to 393 KB of shared
#: memory. A first pruned space at 8 warps (32x32 FMA, 64x64 / 64x32 tensor cores) still spilled in
#: 54 of 462 compiles, all in the heavy variants (mlp, curl, hidden backward) or at 8 warps; hence
#: tiles sized by the launch's live tiles.
_FMA_SPACE = ((32, 32), (16, 16))
_MMA_SPACE = ((32, 32), (16, 16))
#: Launch options per tile, (num_warps, num_stages), in order of preference. (4, 1) is spill-free
#: in 452 of 462 AOT compiles; the other 10 keep 4-20 B of stack at 72-168 registers (a ptxas
#: quirk, not register pressure: the same launch at 2 stages or 8 warps has none). Those are
#: listed in ``aot_spills.json`` and :func:`keep_configs` moves on to the next option for them.
_LAUNCH_OPTIONS = ((4, 1), (4, 2), (8, 1))
#: The launch constexprs a spill depends on (besides the tile and the launch options).
_SPILL_META = ("INPUT_PRECISION", "BLOCK_M", "KIND", "WANT_CURL")
#: Compiles measured to spill: written by ``python -m sta.kernels.aot --update-spills``.
SPILLS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aot_spills.json")


def spill_key(kernel: str, arch: int, constexprs: dict, num_warps: int, num_stages: int) -> tuple:
    """Identity of one compile in the spill table: kernel, target, the launch constexprs that
    matter, the tile and the launch options."""
    return (kernel, arch, *(constexprs.get(k) for k in _SPILL_META), constexprs["BLOCK_H"], constexprs["BLOCK_D"],
            num_warps, num_stages)


def load_spills(path: str = SPILLS_PATH) -> set:
    """The spill table as a set of :func:`spill_key` tuples (empty when the file is missing)."""
    import json

    try:
        with open(path) as f:
            entries = json.load(f)["spills"]
    except FileNotFoundError:
        return set()
    return {spill_key(e["kernel"], e["arch"], e, e["num_warps"], e["num_stages"]) for e in entries}


SPILLS = load_spills()

#: Most shared memory one block may use (bytes, opt-in maximum) per compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
#: Budget of :func:`_estimate`: live fp32 tile values per thread (see there).
_FMA_BUDGET, _MMA_BUDGET = 8, 16


def _configs():
    """Autotune space over the tile sizes along D and H (BLOCK_M is fixed by the routing).

    Under the interpreter a single 16x16 configuration: ``tl.dot`` needs tiles of at least 16
    and every extra configuration would be run (slowly) by the autotuner; the parity tests run
    every kept GPU configuration explicitly (:func:`gpu_configs`,
    :func:`sta.kernels.launch.forced_config`). On a GPU the union of the FMA and tensor-core
    spaces; :func:`keep_configs` (the autotuner's ``early_config_prune``) picks per launch.
    """
    if interpreting():
        return [triton.Config({"BLOCK_H": 16, "BLOCK_D": 16}, num_warps=1)]
    return gpu_configs()


def gpu_configs():
    """Every GPU tile configuration (both spaces), as ``triton.Config``."""
    tiles = dict.fromkeys(_FMA_SPACE + _MMA_SPACE)
    return [triton.Config({"BLOCK_H": bh, "BLOCK_D": bd}, num_warps=w, num_stages=s)
            for bh, bd in tiles for w, s in _LAUNCH_OPTIONS]


def _live_tiles(kernel: str, meta: dict) -> int:
    """(BLOCK_M x tile) fp32 tensors a launch keeps live: one accumulator, plus the second product
    of mlp fields, plus the curl product, plus the epilogue of the hidden stages (h, s, s1, the
    per-row sums; the hidden forward at 64 rows and 32x32 tiles needed 255 registers and spilled)."""
    return (1 + (meta.get("KIND") == MLP) + bool(meta.get("WANT_CURL"))
            + (kernel in ("_flow_step_hidden_bwd_kernel", "_flow_step_hidden_fwd_kernel")))


def _estimate(cfg, block_m: int, live: int, fma: bool) -> tuple[float, int]:
    """(register-pressure estimate, shared-memory bytes estimate) of one config at ``block_m`` rows.

    Registers: fp32 values per thread of the ``live`` BLOCK_M x max(BLOCK_H, BLOCK_D) tiles (the
    FMA products also hold their operand tiles in registers: hence a lower budget). Shared
    memory: the staged operand tiles of the products, in fp32.
    """
    bh, bd = cfg.kwargs["BLOCK_H"], cfg.kwargs["BLOCK_D"]
    values = live * block_m * max(bh, bd) / (32 * cfg.num_warps)
    shared = 4 * max(cfg.num_stages, 1) * (block_m * bh + block_m * bd + bh * bd) * (2 if live > 1 else 1)
    return values, shared


def target_arch() -> int:
    """Compute capability of the current CUDA device as an integer (90 for sm_90)."""
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def keep_configs(configs, arch: int, meta: dict, kernel: str):
    """The config to autotune with for one launch of ``kernel`` (its name) on target ``arch``.

    ``meta``: the launch's constexprs (``INPUT_PRECISION``, ``BLOCK_M``, ``KIND``, ``WANT_CURL``).
    Keeps the tile space of the precision (FMA for "ieee", tensor cores otherwise) and takes the
    first (largest) tile whose register estimate is within budget and whose shared memory fits the
    target (so no config is found out by an OutOfResources at run time), with the first launch
    option of :data:`_LAUNCH_OPTIONS` that the AOT spill table (:data:`SPILLS`) does not list for
    this launch; the smallest tile when none fits. Returns a one-element list.
    ``tests/test_triton_aot.py`` compiles what this returns for sm_80 and sm_90.
    """
    fma = meta["INPUT_PRECISION"] in _FMA
    space = _FMA_SPACE if fma else _MMA_SPACE
    limit = SHARED_LIMIT.get(arch, min(SHARED_LIMIT.values()))
    budget = _FMA_BUDGET if fma else _MMA_BUDGET
    live = _live_tiles(kernel, meta)
    by_tile = {}
    for c in configs:
        by_tile.setdefault((c.kwargs["BLOCK_H"], c.kwargs["BLOCK_D"]), {})[c.num_warps, c.num_stages] = c
    tiles = [t for t in space if t in by_tile]

    def options(tile):
        """The tile's configs in preference order, without those the spill table lists."""
        ordered = [by_tile[tile][o] for o in _LAUNCH_OPTIONS if o in by_tile[tile]]
        clean = [c for c in ordered if spill_key(kernel, arch, {**meta, **c.kwargs}, c.num_warps, c.num_stages)
                 not in SPILLS]
        return clean or ordered[:1]

    for tile in tiles:
        first = by_tile[tile].get(_LAUNCH_OPTIONS[0]) or next(iter(by_tile[tile].values()))
        regs, _ = _estimate(first, meta["BLOCK_M"], live, fma)
        if regs > budget:
            continue
        fitting = [c for c in options(tile) if _estimate(c, meta["BLOCK_M"], live, fma)[1] <= limit]
        if fitting:
            return fitting[:1]
    return options(tiles[-1])[:1] if tiles else []


def _prune_for(kernel: str) -> dict:
    """``prune_configs_by`` of one autotuned kernel: :func:`keep_configs` for this device."""
    def prune(configs, named_args, **meta):
        return keep_configs(configs, target_arch(), meta, kernel)
    return {"early_config_prune": prune}


_KEY = ["d_bucket", "h_bucket", "m_bucket"]


def block_m_for(rows_per_field: int) -> int:
    """Rows per program. 16 under the interpreter (smallest ``tl.dot`` tile: fewest programs);
    on a GPU 16..64 following the mean rows per active field, so that sparse steps (a few rows per
    field) do not pad every field to 64 rows. Not measured on a GPU in this repository yet."""
    if interpreting():
        return 16
    return max(16, min(64, _next_pow2(rows_per_field)))


# ----------------------------------------------------------------------------------------------
# Routing: active pairs sorted by field, padded index lists.
# ----------------------------------------------------------------------------------------------

class Routing(NamedTuple):
    """Active (sample, field) pairs sorted by field, index lists padded to BLOCK_M.

    rows: (Npad,) int64 sample index of each padded row, -1 for padding;
    block_field: (num_blocks,) int32 field of each row block;
    block_ptr: (K + 1,) int32, field k owns blocks block_ptr[k] .. block_ptr[k+1]-1;
    block_m: rows per block; num_blocks; max_rows: most active rows of one field.
    """

    rows: torch.Tensor
    block_field: torch.Tensor
    block_ptr: torch.Tensor
    block_m: int
    num_blocks: int
    max_rows: int


def route(g: torch.Tensor, block_m: Optional[int] = None) -> Routing:
    """Sort the active pairs of ``g: (B, K)`` by field and pad each field's index list.

    Evaluates nothing for inactive pairs: a field with no active sample owns no block. One
    device-to-host copy (the K per-field counts, which size the launch grid).
    """
    B, K = g.shape
    dev = g.device
    k_idx, b_idx = torch.nonzero(g.t() != 0, as_tuple=True)  # sorted by field, then by sample
    counts_t = torch.bincount(k_idx, minlength=K)
    counts = counts_t.tolist()  # the one sync
    max_rows = max(counts, default=0)
    if block_m is None:
        active = sum(1 for n in counts if n)
        block_m = block_m_for(-(-sum(counts) // max(active, 1)))
    blocks = [-(-n // block_m) for n in counts]
    ptr = [0]
    for nb in blocks:
        ptr.append(ptr[-1] + nb)
    num_blocks = ptr[-1]
    block_ptr = torch.tensor(ptr, dtype=torch.int32).to(dev, non_blocking=True)
    block_field = torch.repeat_interleave(
        torch.arange(K, dtype=torch.int32), torch.tensor(blocks, dtype=torch.int64)).to(dev, non_blocking=True)
    rows = torch.full((num_blocks * block_m,), -1, dtype=torch.int64, device=dev)
    if num_blocks:
        first = torch.cumsum(counts_t, 0) - counts_t  # index of each field's first pair in k_idx
        pos = torch.arange(k_idx.numel(), device=dev) - first[k_idx] + block_ptr[k_idx].long() * block_m
        rows[pos] = b_idx
    return Routing(rows, block_field, block_ptr, block_m, num_blocks, max_rows)


# ----------------------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------------------

@triton.jit
def _round_tf32(x):
    """fp32 -> the nearest value with a 10-bit mantissa (round half to even), as fp32: the
    operand rounding of a TF32 tensor-core product (finite inputs; test emulation only)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation; ``PRECISION`` (see PRECISIONS) sets the operands:
    "ieee" fp32 (FMA), "tf32" (tensor cores, 10-bit mantissa), "bf16" / "fp16" (operands cast to
    the input dtype, tensor cores), "tf32_emulated" (operands rounded to 10 mantissa bits, then an
    exact product: what "tf32" computes, checkable where tl.dot ignores input_precision)."""
    if PRECISION == "bf16":
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif PRECISION == "fp16":
        out = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    elif PRECISION == "tf32_emulated":
        out = tl.dot(_round_tf32(a), _round_tf32(b), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _tanh(x):
    # tanh from exp(-2|x|): no overflow, no dependence on libdevice (also runs in the interpreter).
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.autotune(configs=_configs(), key=_KEY, prune_configs_by=_prune_for("_flow_step_hidden_fwd_kernel"))
@triton.jit(do_not_specialize=["store_x2", "store_h"])  # 0/1 flags: one compiled variant
def _flow_step_hidden_fwd_kernel(
    z_ptr, stride_zb, stride_zd,  # z: (B, D) latents, any strides
    rows_ptr,  # (Npad,) int64: sample of each padded row, -1 for padding
    block_field_ptr,  # (num_blocks,) int32: field owning each block of BLOCK_M rows
    w_ptr,  # (K, H, D) contiguous: hidden weights W (potential, hamiltonian) or W1 (mlp)
    c_ptr,  # (K, H) contiguous: hidden bias b + e(t)
    a_ptr,  # (K, H) contiguous: output weights a (unused for mlp)
    de_ptr,  # (K, H) contiguous: de/dt (potential only)
    x1_ptr,  # (Npad, H) out: a*s1 (potential, hamiltonian) or s = tanh(h) (mlp)
    x2_ptr,  # (Npad, H) out if store_x2: d = a*s2 (hamiltonian curl) or 1 - s^2 (mlp)
    h_ptr,  # (Npad, H) out if store_h: the pre-activation h (for the backward)
    u_ptr, lap_ptr, dudt_ptr,  # (Npad,) out (potential): u, lap u, du/dt per row
    D, H,  # latent size and hidden width (runtime: never constexpr)
    d_bucket, h_bucket, m_bucket,  # next powers of two of D, H, rows per field: autotune key only
    store_x2,  # write x2 (runtime flag: one compiled variant per KIND, not four)
    store_h,  # write h
    KIND: tl.constexpr,  # POTENTIAL, HAMILTONIAN or MLP
    INPUT_PRECISION: tl.constexpr,  # tl.dot operands: see _dot
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,  # tile sizes
):
    pid = tl.program_id(0).to(tl.int64)
    k = tl.load(block_field_ptr + pid).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    b = tl.load(rows_ptr + offs_m)
    valid = b >= 0
    b = tl.where(valid, b, 0)
    u_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    lap_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    dudt_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mh = offs_h < H
        acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        wn = tl.zeros((BLOCK_H,), dtype=tl.float32)  # |W_j|^2, for the Laplacian
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            md = offs_d < D
            zt = tl.load(z_ptr + b[:, None] * stride_zb + offs_d[None, :] * stride_zd,
                         mask=valid[:, None] & md[None, :], other=0.0).to(tl.float32)
            wt = tl.load(w_ptr + k * H * D + offs_h[None, :] * D + offs_d[:, None],
                         mask=md[:, None] & mh[None, :], other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_H)
            acc = _dot(zt, wt, acc, INPUT_PRECISION)
            if KIND == 0:
                wn += tl.sum(wt * wt, 0)
        c = tl.load(c_ptr + k * H + offs_h, mask=mh, other=0.0).to(tl.float32)
        h = acc + c[None, :]
        s = _tanh(h)
        s1 = 1.0 - s * s
        keep = valid[:, None] & mh[None, :]
        out_off = offs_m[:, None] * H + offs_h[None, :]
        if KIND == 2:
            x1 = s
            x2 = s1
        else:
            a = tl.load(a_ptr + k * H + offs_h, mask=mh, other=0.0).to(tl.float32)
            s2 = -2.0 * s * s1
            x1 = a[None, :] * s1
            x2 = a[None, :] * s2
            if KIND == 0:
                de = tl.load(de_ptr + k * H + offs_h, mask=mh, other=0.0).to(tl.float32)
                u_acc += tl.sum(tl.where(keep, a[None, :] * s, 0.0), 1)
                lap_acc += tl.sum(tl.where(keep, x2 * wn[None, :], 0.0), 1)
                dudt_acc += tl.sum(tl.where(keep, x1 * de[None, :], 0.0), 1)
        # padding rows are stored as exact zeros: the per-field reductions sum whole blocks
        tl.store(x1_ptr + out_off, tl.where(keep, x1, 0.0), mask=mh[None, :])
        if store_x2:
            tl.store(x2_ptr + out_off, tl.where(keep, x2, 0.0), mask=mh[None, :])
        if store_h:
            tl.store(h_ptr + out_off, tl.where(keep, h, 0.0), mask=mh[None, :])
    if KIND == 0:
        tl.store(u_ptr + offs_m, u_acc)
        tl.store(lap_ptr + offs_m, lap_acc)
        tl.store(dudt_ptr + offs_m, dudt_acc)


@triton.autotune(configs=_configs(), key=_KEY, prune_configs_by=_prune_for("_flow_step_fwd_kernel"), reset_to_zero=["vel_ptr", "div_ptr"])
@triton.jit
def _flow_step_fwd_kernel(
    rows_ptr,  # (Npad,) int64: sample of each padded row, -1 for padding
    block_field_ptr,  # (num_blocks,) int32: field owning each block
    g_ptr, stride_gb, stride_gk,  # g: (B, K) coefficients, any strides
    x1_ptr, x2_ptr,  # (Npad, H): hidden activations from _flow_step_hidden_fwd_kernel
    wo_ptr, stride_wok, stride_woh, stride_wod,  # output weights as a (K, H, D) view: W, M^T or W2^T
    cm_ptr,  # (K, D, H) contiguous (mlp): C = W2 o W1^T, for the divergence
    bo_ptr,  # (K, D) contiguous (mlp): output bias b2
    q_ptr,  # (K, H, H) contiguous (hamiltonian, WANT_CURL): Q = G - N o N^T
    u_ptr, lap_ptr, dudt_ptr,  # (Npad,) per-row scalars of the potential hidden stage
    vel_ptr,  # (B, D) fp32, zero-initialised: velocity, accumulated with atomics
    div_ptr,  # (B,) fp32, zero-initialised: divergence, accumulated with atomics
    o1_ptr, o2_ptr, stride_ob, stride_ok,  # (B, K) fp32 zero-initialised per-pair outputs:
    # potential: hj, u; hamiltonian: curl, -; mlp: div_rot, -
    D, H,  # latent size and hidden width
    d_bucket, h_bucket, m_bucket,  # autotune key only
    KIND: tl.constexpr,  # POTENTIAL, HAMILTONIAN or MLP
    WANT_CURL: tl.constexpr,  # hamiltonian: compute the curl energy
    INPUT_PRECISION: tl.constexpr,  # tl.dot operands: see _dot
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,  # tile sizes
):
    pid = tl.program_id(0).to(tl.int64)
    k = tl.load(block_field_ptr + pid).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    b = tl.load(rows_ptr + offs_m)
    valid = b >= 0
    b = tl.where(valid, b, 0)
    gw = tl.load(g_ptr + b * stride_gb + k * stride_gk, mask=valid, other=0.0).to(tl.float32)
    vsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    divrow = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        md = offs_d < D
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mh = offs_h < H
            xt = tl.load(x1_ptr + offs_m[:, None] * H + offs_h[None, :], mask=mh[None, :], other=0.0)
            wt = tl.load(wo_ptr + k * stride_wok + offs_h[:, None] * stride_woh + offs_d[None, :] * stride_wod,
                         mask=mh[:, None] & md[None, :], other=0.0).to(tl.float32)
            acc = _dot(xt, wt, acc, INPUT_PRECISION)
            if KIND == 2:
                x2t = tl.load(x2_ptr + offs_m[:, None] * H + offs_h[None, :], mask=mh[None, :], other=0.0)
                ct = tl.load(cm_ptr + k * D * H + offs_d[None, :] * H + offs_h[:, None],
                             mask=mh[:, None] & md[None, :], other=0.0).to(tl.float32)
                acc2 = _dot(x2t, ct, acc2, INPUT_PRECISION)
        keep = valid[:, None] & md[None, :]
        if KIND == 2:
            b2 = tl.load(bo_ptr + k * D + offs_d, mask=md, other=0.0).to(tl.float32)
            v = _tanh(acc + b2[None, :])
            divrow += tl.sum(tl.where(keep, (1.0 - v * v) * acc2, 0.0), 1)
        else:
            v = acc
        v = tl.where(keep, v, 0.0)
        vsq += tl.sum(v * v, 1)
        tl.atomic_add(vel_ptr + b[:, None] * D + offs_d[None, :], gw[:, None] * v, mask=keep)
    pair = b * stride_ob + k * stride_ok
    if KIND == 0:
        lap = tl.load(lap_ptr + offs_m)
        tl.atomic_add(div_ptr + b, gw * lap, mask=valid)
        tl.store(o1_ptr + pair, tl.load(dudt_ptr + offs_m) + 0.5 * vsq, mask=valid)
        tl.store(o2_ptr + pair, tl.load(u_ptr + offs_m), mask=valid)
    if KIND == 2:
        tl.atomic_add(div_ptr + b, gw * divrow, mask=valid)
        tl.store(o1_ptr + pair, divrow, mask=valid)
    if KIND == 1:
        if WANT_CURL:  # d^T Q d, d = a*s2: O(H^2) per row
            curl = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for j0 in range(0, H, BLOCK_H):
                offs_j = j0 + tl.arange(0, BLOCK_H)
                mj = offs_j < H
                accq = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
                for i0 in range(0, H, BLOCK_H):
                    offs_i = i0 + tl.arange(0, BLOCK_H)
                    mi = offs_i < H
                    dti = tl.load(x2_ptr + offs_m[:, None] * H + offs_i[None, :], mask=mi[None, :], other=0.0)
                    qt = tl.load(q_ptr + k * H * H + offs_i[:, None] * H + offs_j[None, :],
                                 mask=mi[:, None] & mj[None, :], other=0.0).to(tl.float32)
                    accq = _dot(dti, qt, accq, INPUT_PRECISION)
                dtj = tl.load(x2_ptr + offs_m[:, None] * H + offs_j[None, :], mask=mj[None, :], other=0.0)
                curl += tl.sum(accq * dtj, 1)
            tl.store(o1_ptr + pair, curl, mask=valid)


@triton.autotune(configs=_configs(), key=_KEY, prune_configs_by=_prune_for("_flow_step_bwd_kernel"))
@triton.jit
def _flow_step_bwd_kernel(
    rows_ptr,  # (Npad,) int64: sample of each padded row, -1 for padding
    block_field_ptr,  # (num_blocks,) int32: field owning each block
    g_ptr, stride_gb, stride_gk,  # g: (B, K) coefficients
    x1_ptr, x2_ptr,  # (Npad, H): recomputed hidden activations
    wo_ptr, stride_wok, stride_woh, stride_wod,  # output weights as a (K, H, D) view
    cm_ptr,  # (K, D, H) contiguous (mlp): C = W2 o W1^T
    bo_ptr,  # (K, D) contiguous (mlp): b2
    lap_ptr,  # (Npad,) recomputed lap u (potential)
    gvel_ptr, stride_gvb, stride_gvd,  # (B, D) grad of velocity, any strides
    gdiv_ptr, stride_gdiv,  # (B,) grad of div
    go1_ptr, stride_go1b, stride_go1k,  # (B, K) grad of o1 (hj / - / div_rot)
    gv_ptr,  # (Npad, D) out: grad w.r.t. the velocity rows (mlp: w.r.t. the pre-tanh output o)
    gq_ptr,  # (Npad, D) out (mlp): grad w.r.t. q = C (1 - s^2)
    gg_ptr, stride_ggb, stride_ggk,  # (B, K) fp32 zero-initialised out: grad of g
    D, H,  # latent size and hidden width
    d_bucket, h_bucket, m_bucket,  # autotune key only
    KIND: tl.constexpr,  # POTENTIAL, HAMILTONIAN or MLP
    INPUT_PRECISION: tl.constexpr,  # tl.dot operands: see _dot
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,  # tile sizes
):
    pid = tl.program_id(0).to(tl.int64)
    k = tl.load(block_field_ptr + pid).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    b = tl.load(rows_ptr + offs_m)
    valid = b >= 0
    b = tl.where(valid, b, 0)
    gw = tl.load(g_ptr + b * stride_gb + k * stride_gk, mask=valid, other=0.0).to(tl.float32)
    gdivb = tl.load(gdiv_ptr + b * stride_gdiv, mask=valid, other=0.0).to(tl.float32)
    go1 = tl.load(go1_ptr + b * stride_go1b + k * stride_go1k, mask=valid, other=0.0).to(tl.float32)
    gamma = gw * gdivb + go1  # mlp: total weight of this pair's divergence
    gg = tl.zeros((BLOCK_M,), dtype=tl.float32)
    divrow = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        md = offs_d < D
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mh = offs_h < H
            xt = tl.load(x1_ptr + offs_m[:, None] * H + offs_h[None, :], mask=mh[None, :], other=0.0)
            wt = tl.load(wo_ptr + k * stride_wok + offs_h[:, None] * stride_woh + offs_d[None, :] * stride_wod,
                         mask=mh[:, None] & md[None, :], other=0.0).to(tl.float32)
            acc = _dot(xt, wt, acc, INPUT_PRECISION)
            if KIND == 2:
                x2t = tl.load(x2_ptr + offs_m[:, None] * H + offs_h[None, :], mask=mh[None, :], other=0.0)
                ct = tl.load(cm_ptr + k * D * H + offs_d[None, :] * H + offs_h[:, None],
                             mask=mh[:, None] & md[None, :], other=0.0).to(tl.float32)
                acc2 = _dot(x2t, ct, acc2, INPUT_PRECISION)
        keep = valid[:, None] & md[None, :]
        gvt = tl.load(gvel_ptr + b[:, None] * stride_gvb + offs_d[None, :] * stride_gvd,
                      mask=keep, other=0.0).to(tl.float32)
        out_off = offs_m[:, None] * D + offs_d[None, :]
        if KIND == 2:
            b2 = tl.load(bo_ptr + k * D + offs_d, mask=md, other=0.0).to(tl.float32)
            r = _tanh(acc + b2[None, :])
            ds2 = 1.0 - r * r
            divrow += tl.sum(tl.where(keep, ds2 * acc2, 0.0), 1)
            gg += tl.sum(tl.where(keep, gvt * r, 0.0), 1)
            go = gw[:, None] * gvt * ds2 - 2.0 * gamma[:, None] * acc2 * r * ds2
            tl.store(gv_ptr + out_off, tl.where(keep, go, 0.0), mask=md[None, :])
            tl.store(gq_ptr + out_off, tl.where(keep, gamma[:, None] * ds2, 0.0), mask=md[None, :])
        else:
            gg += tl.sum(tl.where(keep, gvt * acc, 0.0), 1)
            gv = gw[:, None] * gvt
            if KIND == 0:  # hj = du/dt + |v|^2/2 adds ghj * v
                gv += go1[:, None] * acc
            tl.store(gv_ptr + out_off, tl.where(keep, gv, 0.0), mask=md[None, :])
    if KIND == 0:
        gg += gdivb * tl.load(lap_ptr + offs_m)
    if KIND == 2:
        gg += gdivb * divrow
    tl.store(gg_ptr + b * stride_ggb + k * stride_ggk, gg, mask=valid)


@triton.autotune(configs=_configs(), key=_KEY, prune_configs_by=_prune_for("_flow_step_hidden_bwd_kernel"))
@triton.jit
def _flow_step_hidden_bwd_kernel(
    rows_ptr,  # (Npad,) int64: sample of each padded row, -1 for padding
    block_field_ptr,  # (num_blocks,) int32: field owning each block
    g_ptr, stride_gb, stride_gk,  # g: (B, K) coefficients
    w_ptr,  # (K, H, D) contiguous: hidden weights (for |W_j|^2, potential)
    a_ptr, de_ptr,  # (K, H) contiguous: a, de/dt
    wo_ptr, stride_wok, stride_woh, stride_wod,  # output weights as a (K, H, D) view
    cm_ptr,  # (K, D, H) contiguous (mlp): C = W2 o W1^T
    q_ptr,  # (K, H, H) contiguous (hamiltonian, WANT_CURL): Q
    h_ptr, x2_ptr,  # (Npad, H): recomputed pre-activation h and x2 (d = a*s2 for the curl)
    gv_ptr, gq_ptr,  # (Npad, D): from _flow_step_bwd_kernel
    gdiv_ptr, stride_gdiv,  # (B,) grad of div
    go1_ptr, stride_go1b, stride_go1k,  # (B, K) grad of o1 (hj / curl / div_rot)
    go2_ptr, stride_go2b, stride_go2k,  # (B, K) grad of o2 (u)
    gh_ptr,  # (Npad, H) out: grad w.r.t. h
    pa_ptr, pde_ptr, pwn_ptr, pq_ptr,  # (Npad, H) out: per-row contributions to grad a, de, |W|^2;
    # pq = gcurl * d, for grad Q = sum_rows pq d^T
    D, H,  # latent size and hidden width
    d_bucket, h_bucket, m_bucket,  # autotune key only
    KIND: tl.constexpr,  # POTENTIAL, HAMILTONIAN or MLP
    WANT_CURL: tl.constexpr,  # hamiltonian: the curl has a gradient
    INPUT_PRECISION: tl.constexpr,  # tl.dot operands: see _dot
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,  # tile sizes
):
    pid = tl.program_id(0).to(tl.int64)
    k = tl.load(block_field_ptr + pid).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    b = tl.load(rows_ptr + offs_m)
    valid = b >= 0
    b = tl.where(valid, b, 0)
    gw = tl.load(g_ptr + b * stride_gb + k * stride_gk, mask=valid, other=0.0).to(tl.float32)
    glap = gw * tl.load(gdiv_ptr + b * stride_gdiv, mask=valid, other=0.0).to(tl.float32)
    go1 = tl.load(go1_ptr + b * stride_go1b + k * stride_go1k, mask=valid, other=0.0).to(tl.float32)
    go2 = tl.load(go2_ptr + b * stride_go2b + k * stride_go2k, mask=valid, other=0.0).to(tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mh = offs_h < H
        acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        wn = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            md = offs_d < D
            gvt = tl.load(gv_ptr + offs_m[:, None] * D + offs_d[None, :], mask=md[None, :], other=0.0)
            wt = tl.load(wo_ptr + k * stride_wok + offs_h[None, :] * stride_woh + offs_d[:, None] * stride_wod,
                         mask=md[:, None] & mh[None, :], other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_H)
            acc = _dot(gvt, wt, acc, INPUT_PRECISION)
            if KIND == 0:
                wn += tl.sum(wt * wt, 0)  # the potential's output weights are W itself
            if KIND == 2:
                gqt = tl.load(gq_ptr + offs_m[:, None] * D + offs_d[None, :], mask=md[None, :], other=0.0)
                ct = tl.load(cm_ptr + k * D * H + offs_d[:, None] * H + offs_h[None, :],
                             mask=md[:, None] & mh[None, :], other=0.0).to(tl.float32)
                acc2 = _dot(gqt, ct, acc2, INPUT_PRECISION)
        keep = valid[:, None] & mh[None, :]
        out_off = offs_m[:, None] * H + offs_h[None, :]
        h = tl.load(h_ptr + out_off, mask=mh[None, :], other=0.0)
        s = _tanh(h)
        s1 = 1.0 - s * s
        if KIND == 2:
            gh = acc * s1 - 2.0 * acc2 * s * s1
        else:
            a = tl.load(a_ptr + k * H + offs_h, mask=mh, other=0.0).to(tl.float32)[None, :]
            s2 = -2.0 * s * s1
            s3 = -2.0 * s1 * (1.0 - 3.0 * s * s)
            gh = acc * a * s2
            pa = acc * s1
            if KIND == 0:
                de = tl.load(de_ptr + k * H + offs_h, mask=mh, other=0.0).to(tl.float32)[None, :]
                wnb = wn[None, :]
                gdudt = go1[:, None]  # hj = du/dt + ...
                gu = go2[:, None]
                gl = glap[:, None]
                gh += gdudt * a * de * s2 + gu * a * s1 + gl * a * wnb * s3
                pa += gu * s + gl * s2 * wnb + gdudt * s1 * de
                tl.store(pde_ptr + out_off, tl.where(keep, gdudt * a * s1, 0.0), mask=mh[None, :])
                tl.store(pwn_ptr + out_off, tl.where(keep, gl * a * s2, 0.0), mask=mh[None, :])
            if KIND == 1:
                if WANT_CURL:  # curl = d^T Q d: grad d = gcurl (Q + Q^T) d
                    accq = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
                    for i0 in range(0, H, BLOCK_H):
                        offs_i = i0 + tl.arange(0, BLOCK_H)
                        mi = offs_i < H
                        dti = tl.load(x2_ptr + offs_m[:, None] * H + offs_i[None, :], mask=mi[None, :], other=0.0)
                        qm = mi[:, None] & mh[None, :]
                        qt = tl.load(q_ptr + k * H * H + offs_i[:, None] * H + offs_h[None, :], mask=qm, other=0.0)
                        qtt = tl.load(q_ptr + k * H * H + offs_h[None, :] * H + offs_i[:, None], mask=qm, other=0.0)
                        accq = _dot(dti, (qt + qtt).to(tl.float32), accq, INPUT_PRECISION)
                    gd = go1[:, None] * accq
                    gh += gd * a * s3
                    pa += gd * s2
                    d = tl.load(x2_ptr + out_off, mask=mh[None, :], other=0.0)
                    tl.store(pq_ptr + out_off, tl.where(keep, go1[:, None] * d, 0.0), mask=mh[None, :])
            tl.store(pa_ptr + out_off, tl.where(keep, pa, 0.0), mask=mh[None, :])
        tl.store(gh_ptr + out_off, tl.where(keep, gh, 0.0), mask=mh[None, :])


@triton.autotune(configs=_configs(), key=_KEY, prune_configs_by=_prune_for("_flow_step_dz_bwd_kernel"), reset_to_zero=["gz_ptr"])
@triton.jit
def _flow_step_dz_bwd_kernel(
    rows_ptr,  # (Npad,) int64: sample of each padded row, -1 for padding
    block_field_ptr,  # (num_blocks,) int32: field owning each block
    gh_ptr,  # (Npad, H): grad w.r.t. h
    w_ptr,  # (K, H, D) contiguous: hidden weights
    gz_ptr,  # (B, D) fp32 zero-initialised out: grad of z, accumulated with atomics
    D, H,  # latent size and hidden width
    d_bucket, h_bucket, m_bucket,  # autotune key only
    INPUT_PRECISION: tl.constexpr,  # tl.dot operands: see _dot
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,  # tile sizes
):
    pid = tl.program_id(0).to(tl.int64)
    k = tl.load(block_field_ptr + pid).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    b = tl.load(rows_ptr + offs_m)
    valid = b >= 0
    b = tl.where(valid, b, 0)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        md = offs_d < D
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mh = offs_h < H
            ght = tl.load(gh_ptr + offs_m[:, None] * H + offs_h[None, :], mask=mh[None, :], other=0.0)
            wt = tl.load(w_ptr + k * H * D + offs_h[:, None] * D + offs_d[None, :],
                         mask=mh[:, None] & md[None, :], other=0.0).to(tl.float32)
            acc = _dot(ght, wt, acc, INPUT_PRECISION)
        tl.atomic_add(gz_ptr + b[:, None] * D + offs_d[None, :], acc, mask=valid[:, None] & md[None, :])


@triton.jit
def _flow_step_param_bwd_kernel(
    block_ptr_ptr,  # (K + 1,) int32: field k owns row blocks block_ptr[k] .. block_ptr[k+1]-1
    rows_ptr,  # (Npad,) int64: sample of each padded row (used when B_GATHER)
    a_ptr, stride_an,  # (Npad, P): left factor, padded rows (padding rows are zeros)
    b_ptr, stride_bn, stride_bq,  # (Npad, Q) padded rows, or (B, Q) gathered by rows when B_GATHER
    out_ptr, stride_ok, stride_op, stride_oq,  # (K, P, Q) out: sum over field k's rows of a^T b
    P, Q,  # sizes of the output tile space
    B_GATHER: tl.constexpr,  # b is indexed by sample (z), not by padded row
    B_ONES: tl.constexpr,  # b is a column of ones: column sums of a (Q = 1)
    ACCUMULATE: tl.constexpr,  # add to out instead of overwriting
    INPUT_PRECISION: tl.constexpr,  # tl.dot operands: see _dot
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,  # tile sizes
):
    # One program owns one (P, Q) tile of one field and walks that field's row blocks in order:
    # a deterministic reduction without atomics.
    k = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tl.program_id(2).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mp = offs_p < P
    mq = offs_q < Q
    start = tl.load(block_ptr_ptr + k).to(tl.int64)
    end = tl.load(block_ptr_ptr + k + 1).to(tl.int64)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    # rows in chunks of 16 whatever BLOCK_M: the FMA product holds its K = rows operand tiles in
    # registers (K = 64 spilled 250 B with bf16 z, sm_80/sm_90)
    for row in range(start * BLOCK_M, end * BLOCK_M, 16):
        offs_m = row + tl.arange(0, 16)
        at = tl.load(a_ptr + offs_m[None, :] * stride_an + offs_p[:, None], mask=mp[:, None], other=0.0)
        if B_ONES:
            colsum += tl.sum(at, 1)
        else:
            if B_GATHER:
                bi = tl.load(rows_ptr + offs_m)
                ok = bi >= 0
                bi = tl.where(ok, bi, 0)
                bt = tl.load(b_ptr + bi[:, None] * stride_bn + offs_q[None, :] * stride_bq,
                             mask=ok[:, None] & mq[None, :], other=0.0).to(tl.float32)
            else:
                bt = tl.load(b_ptr + offs_m[:, None] * stride_bn + offs_q[None, :] * stride_bq,
                             mask=mq[None, :], other=0.0).to(tl.float32)
            acc = _dot(at, bt, acc, INPUT_PRECISION)
    if B_ONES:
        acc = colsum[:, None] + acc
    ptrs = out_ptr + k * stride_ok + offs_p[:, None] * stride_op + offs_q[None, :] * stride_oq
    m = mp[:, None] & mq[None, :]
    if ACCUMULATE:
        acc += tl.load(ptrs, mask=m, other=0.0)
    tl.store(ptrs, acc, mask=m)


# ----------------------------------------------------------------------------------------------
# Launchers.
# ----------------------------------------------------------------------------------------------

def _empty(*shape, like):
    return torch.empty(shape, dtype=torch.float32, device=like.device)


def _out_view(kind: int, w: torch.Tensor, w_out: Optional[torch.Tensor]):
    """Output weights as strides of a (K, H, D) view: v[n, d] = sum_h x[n, h] Wout[k, h, d]."""
    if kind == POTENTIAL:
        return w, w.stride(0), w.stride(1), w.stride(2)  # W: (K, H, D)
    return w_out, w_out.stride(0), w_out.stride(2), w_out.stride(1)  # M, W2: (K, D, H)


def _buckets(D: int, H: int, r: Routing):
    return _next_pow2(D), _next_pow2(H), _next_pow2(max(r.max_rows, 1))


def _hidden(z, r: Routing, kind, w, c, a, de, store_x2, store_h, precision):
    """Stage 1: hidden activations of every padded row. Returns x1, x2, h, (u, lap, dudt)."""
    D, H = z.shape[1], w.shape[1]
    n = r.num_blocks * r.block_m
    x1 = _empty(n, H, like=z)
    x2 = _empty(n, H, like=z) if store_x2 else x1
    h = _empty(n, H, like=z) if store_h else x1
    scal = _empty(3, n, like=z) if kind == POTENTIAL else _empty(3, 1, like=z)
    if r.num_blocks:
        launch(_flow_step_hidden_fwd_kernel, (r.num_blocks,),
            z, z.stride(0), z.stride(1), r.rows, r.block_field, w, c,
            a if a is not None else c, de if de is not None else c,
            x1, x2, h, scal[0], scal[1], scal[2], D, H, *_buckets(D, H, r), int(store_x2), int(store_h),
            KIND=kind, INPUT_PRECISION=precision, BLOCK_M=r.block_m,
        )
    return x1, x2, h, scal


def flow_step_fwd(z, g, kind: int, w, c, a=None, de=None, w_out=None, b_out=None, mat=None,
                  want_curl: bool = False, precision: str = "ieee"):
    """Forward of one bank of fields on the active pairs of ``g``.

    z: (B, D); g: (B, K); w: (K, H, D) (W, or W1 for mlp); c: (K, H); a: (K, H) (not mlp);
    de: (K, H) (potential); w_out: (K, D, H) (M for hamiltonian, W2 for mlp); b_out: (K, D)
    (mlp b2); mat: Q (K, H, H) for the hamiltonian curl, C = W2 o W1^T (K, D, H) for mlp.
    Parameters must be contiguous. Returns fp32 ``velocity (B, D), div (B,), o1 (B, K),
    o2 (B, K)`` with o1, o2 = (hj, u) for potential fields, (curl, unused zeros) for hamiltonian,
    (div_rot, unused zeros) for mlp.
    """
    B, D = z.shape
    K, H = w.shape[0], w.shape[1]
    vel = torch.zeros(B, D, dtype=torch.float32, device=z.device)
    div = torch.zeros(B, dtype=torch.float32, device=z.device)
    o1 = torch.zeros(B, K, dtype=torch.float32, device=z.device)
    o2 = torch.zeros(B, K, dtype=torch.float32, device=z.device)
    _check_deterministic()
    if B == 0 or K == 0 or D == 0:
        return vel, div, o1, o2
    r = route(g)
    if r.num_blocks == 0:
        return vel, div, o1, o2
    want_curl = bool(want_curl and kind == HAMILTONIAN)
    x1, x2, _, scal = _hidden(z, r, kind, w, c, a, de, kind == MLP or want_curl, False, precision)
    wo, swk, swh, swd = _out_view(kind, w, w_out)
    launch(_flow_step_fwd_kernel, (r.num_blocks,),
        r.rows, r.block_field, g, g.stride(0), g.stride(1), x1, x2, wo, swk, swh, swd,
        mat if kind == MLP else c, b_out if b_out is not None else c, mat if want_curl else c,
        scal[0], scal[1], scal[2], vel, div, o1, o2, o1.stride(0), o1.stride(1), D, H, *_buckets(D, H, r),
        KIND=kind, WANT_CURL=want_curl, INPUT_PRECISION=precision, BLOCK_M=r.block_m,
    )
    return vel, div, o1, o2


def _param_reduce(r: Routing, a_buf, out, b=None, gather=False, accumulate=False, precision="ieee"):
    """out[k] (+)= sum over field k's padded rows of a_buf[n]^T b[n]; b None: column sums.

    bf16/fp16 inputs reduce in fp32 ("ieee"): a parameter gradient sums every active row of its
    field, and these products are a small part of the backward."""
    K, P = out.shape[0], out.shape[1]
    ones = b is None
    precision = "ieee" if ones or precision in ("bf16", "fp16") else precision  # no product: one variant
    Q = 1 if ones else b.shape[1]
    o3 = out.unsqueeze(-1) if ones else out
    # 32x32 output tiles: under the interpreter each program costs the same at 16 or 32 wide, so
    # fewer, larger tiles are faster; on a GPU this reduction is a small part of the backward.
    bp, bq = 32, 32 if not ones else 16
    grid = (K, triton.cdiv(P, bp), triton.cdiv(Q, bq))
    bb = a_buf if ones else b
    launch(_flow_step_param_bwd_kernel, grid,
        r.block_ptr, r.rows, a_buf, a_buf.stride(0), bb, bb.stride(0), bb.stride(1) if bb.dim() > 1 else 1,
        o3, o3.stride(0), o3.stride(1), o3.stride(2), P, Q,
        B_GATHER=gather, B_ONES=ones, ACCUMULATE=accumulate, INPUT_PRECISION=precision,
        BLOCK_M=r.block_m, BLOCK_P=bp, BLOCK_Q=bq,
    )


def flow_step_bwd(gvel, gdiv, go1, go2, z, g, kind: int, w, c, a=None, de=None, w_out=None,
                  b_out=None, mat=None, want_curl: bool = False, precision: str = "ieee"):
    """Backward of :func:`flow_step_fwd`, recomputing the forward.

    gvel: (B, D), gdiv: (B,), go1, go2: (B, K) gradients of the four outputs (any strides).
    Returns fp32 gradients ``(dz, dg, dw, dc, da, dde, dw_out, db_out, dmat)``, None for an
    input that was None. Gradients w.r.t. inactive pairs are exactly zero.
    """
    B, D = z.shape
    K, H = w.shape[0], w.shape[1]
    f32 = dict(dtype=torch.float32, device=z.device)
    dz = torch.zeros(B, D, **f32)
    dg = torch.zeros(B, K, **f32)
    dw = torch.zeros(w.shape, **f32)
    dc = torch.zeros(K, H, **f32)
    da = torch.zeros(K, H, **f32) if a is not None else None
    dde = torch.zeros(K, H, **f32) if de is not None else None
    dw_out = torch.zeros(w_out.shape, **f32) if w_out is not None else None
    db_out = torch.zeros(b_out.shape, **f32) if b_out is not None else None
    dmat = torch.zeros(mat.shape, **f32) if mat is not None else None
    grads = (dz, dg, dw, dc, da, dde, dw_out, db_out, dmat)
    _check_deterministic()
    if B == 0 or K == 0 or D == 0:
        return grads
    r = route(g)
    if r.num_blocks == 0:
        return grads
    want_curl = bool(want_curl and kind == HAMILTONIAN)
    x1, x2, h, scal = _hidden(z, r, kind, w, c, a, de, kind == MLP or want_curl, True, precision)
    n = r.num_blocks * r.block_m
    gv = _empty(n, D, like=z)
    gq = _empty(n, D, like=z) if kind == MLP else gv
    wo, swk, swh, swd = _out_view(kind, w, w_out)
    cm = mat if kind == MLP else c
    launch(_flow_step_bwd_kernel, (r.num_blocks,),
        r.rows, r.block_field, g, g.stride(0), g.stride(1), x1, x2, wo, swk, swh, swd,
        cm, b_out if b_out is not None else c, scal[1],
        gvel, gvel.stride(0), gvel.stride(1), gdiv, gdiv.stride(0), go1, go1.stride(0), go1.stride(1),
        gv, gq, dg, dg.stride(0), dg.stride(1), D, H, *_buckets(D, H, r),
        KIND=kind, INPUT_PRECISION=precision, BLOCK_M=r.block_m,
    )
    gh = _empty(n, H, like=z)
    pa = _empty(n, H, like=z) if kind != MLP else gh
    pde = _empty(n, H, like=z) if kind == POTENTIAL else gh
    pwn = _empty(n, H, like=z) if kind == POTENTIAL else gh
    pq = _empty(n, H, like=z) if want_curl else gh
    launch(_flow_step_hidden_bwd_kernel, (r.num_blocks,),
        r.rows, r.block_field, g, g.stride(0), g.stride(1), w,
        a if a is not None else c, de if de is not None else c, wo, swk, swh, swd,
        cm, mat if want_curl else c, h, x2, gv, gq, gdiv, gdiv.stride(0),
        go1, go1.stride(0), go1.stride(1), go2, go2.stride(0), go2.stride(1),
        gh, pa, pde, pwn, pq, D, H, *_buckets(D, H, r),
        KIND=kind, WANT_CURL=want_curl, INPUT_PRECISION=precision, BLOCK_M=r.block_m,
    )
    launch(_flow_step_dz_bwd_kernel, (r.num_blocks,),
        r.rows, r.block_field, gh, w, dz, D, H, *_buckets(D, H, r),
        INPUT_PRECISION=precision, BLOCK_M=r.block_m,
    )
    # parameter gradients: per-field reductions over the padded rows
    _param_reduce(r, gh, dw, z, gather=True, precision=precision)  # h = W z + c
    _param_reduce(r, gh, dc)
    if kind == POTENTIAL:
        _param_reduce(r, x1, dw, gv, accumulate=True, precision=precision)  # v = W^T (a s1)
        gwn = torch.zeros(K, H, **f32)
        _param_reduce(r, pwn, gwn)
        dw += 2.0 * gwn.unsqueeze(-1) * w.float()  # lap uses |W_j|^2
        _param_reduce(r, pa, da)
        _param_reduce(r, pde, dde)
    elif kind == HAMILTONIAN:
        _param_reduce(r, gv, dw_out, x1, precision=precision)  # v = M (a s1): dM = gv^T (a s1)
        _param_reduce(r, pa, da)
        if want_curl:
            _param_reduce(r, pq, dmat, x2, precision=precision)  # curl = d^T Q d
    else:
        _param_reduce(r, gv, dw_out, x1, precision=precision)  # o = W2 s + b2
        _param_reduce(r, gv, db_out)
        _param_reduce(r, gq, dmat, x2, precision=precision)  # q = C (1 - s^2)
    return grads


# ----------------------------------------------------------------------------------------------
# torch.library registration: opaque custom ops with fake implementations, autograd outside.
# ----------------------------------------------------------------------------------------------
# The ops own the routing (sorting and padding the active pairs), so every output has a static
# shape ((B, D), (B,), (B, K)) and fake tensors need no data-dependent size. The Triton launches
# stay inside the op (the interpreter cannot run under ``wrap_triton``'s functional tracing of
# data-dependent routing); torch.compile(fullgraph=True) sees one opaque node per direction.

_OptT = Optional[torch.Tensor]


def _contig(t):
    return None if t is None else t.contiguous()


@torch.library.custom_op("sta::triton_flow_step_fwd", mutates_args=())
def _flow_step_fwd_op(z: torch.Tensor, g: torch.Tensor, w: torch.Tensor, c: torch.Tensor, a: _OptT,
                      de: _OptT, w_out: _OptT, b_out: _OptT, mat: _OptT, kind: int, want_curl: bool,
                      precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    outs = flow_step_fwd(z, g, kind, w.contiguous(), c.contiguous(), _contig(a), _contig(de), _contig(w_out),
                         _contig(b_out), _contig(mat), want_curl, precision)
    return tuple(o.to(z.dtype) for o in outs)


@_flow_step_fwd_op.register_fake
def _(z, g, w, c, a, de, w_out, b_out, mat, kind, want_curl, precision):
    B, D = z.shape
    K = g.shape[1]
    return z.new_empty(B, D), z.new_empty(B), z.new_empty(B, K), z.new_empty(B, K)


@torch.library.custom_op("sta::triton_flow_step_bwd", mutates_args=())
def _flow_step_bwd_op(gvel: torch.Tensor, gdiv: torch.Tensor, go1: torch.Tensor, go2: torch.Tensor,
                      z: torch.Tensor, g: torch.Tensor, w: torch.Tensor, c: torch.Tensor, a: _OptT, de: _OptT,
                      w_out: _OptT, b_out: _OptT, mat: _OptT, kind: int, want_curl: bool,
                      precision: str) -> list[torch.Tensor]:
    grads = flow_step_bwd(gvel, gdiv, go1, go2, z, g, kind, w.contiguous(), c.contiguous(), _contig(a),
                          _contig(de), _contig(w_out), _contig(b_out), _contig(mat), want_curl, precision)
    inputs = (z, g, w, c, a, de, w_out, b_out, mat)
    # an absent optional input gets an empty gradient (custom ops return tensors only)
    return [z.new_empty(0) if x is None else gr.to(x.dtype) for gr, x in zip(grads, inputs)]


@_flow_step_bwd_op.register_fake
def _(gvel, gdiv, go1, go2, z, g, w, c, a, de, w_out, b_out, mat, kind, want_curl, precision):
    inputs = (z, g, w, c, a, de, w_out, b_out, mat)
    return [z.new_empty(0) if x is None else torch.empty_like(x, memory_format=torch.contiguous_format)
            for x in inputs]


def _setup_context(ctx, inputs, output):
    z, g, w, c, a, de, w_out, b_out, mat, kind, want_curl, precision = inputs
    ctx.save_for_backward(z, g, w, c, a, de, w_out, b_out, mat)
    ctx.kind, ctx.want_curl, ctx.precision = kind, want_curl, precision


def _backward(ctx, gvel, gdiv, go1, go2):
    z, g, w, c, a, de, w_out, b_out, mat = ctx.saved_tensors
    grads = _flow_step_bwd_op(gvel, gdiv, go1, go2, z, g, w, c, a, de, w_out, b_out, mat,
                              ctx.kind, ctx.want_curl, ctx.precision)
    inputs = (z, g, w, c, a, de, w_out, b_out, mat)
    return tuple(None if x is None else gr for gr, x in zip(grads, inputs)) + (None, None, None)


_flow_step_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class FlowStepFunction:
    """The differentiable Triton flow step of one bank: ``FlowStepFunction.apply(...)``.

    A thin front over the registered op ``torch.ops.sta.triton_flow_step_fwd`` whose autograd
    formula (registered with ``register_autograd``) calls ``torch.ops.sta.triton_flow_step_bwd``.
    Arguments as :func:`flow_step_fwd`; returns ``velocity (B, D), div (B,), o1 (B, K), o2 (B, K)``
    in z's dtype.
    """

    @staticmethod
    def apply(z, g, kind, w, c, a=None, de=None, w_out=None, b_out=None, mat=None,
              want_curl=False, precision="ieee"):
        return torch.ops.sta.triton_flow_step_fwd(z, g, w, c, a, de, w_out, b_out, mat, kind,
                                                  bool(want_curl), precision)
