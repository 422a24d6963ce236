"""Compile-time parameters of the flow-step kernels and how each launch picks them.

The constexprs of every kernel in :mod:`sta.kernels.flow_step_kernels`: the field kind (``KIND``),
the ``tl.dot`` operand precision (``INPUT_PRECISION``, :func:`precision_for`), the rows per
program (``BLOCK_M``, :func:`block_m_for`) and the tile (``BLOCK_H``, ``BLOCK_D``, with
``num_warps`` / ``num_stages``). The tile is autotuned over :func:`autotune_configs`, pruned per
launch by :func:`keep_configs` (register and shared-memory estimates, and the AOT spill table
``aot_spills.json`` that ``python -m sta.kernels.aot --update-spills`` writes).
"""
from __future__ import annotations

import json
import os

import torch
import triton

__all__ = [
    "POTENTIAL", "HAMILTONIAN", "MLP", "interpreting", "PRECISIONS", "precision_for", "next_pow2",
    "block_m_for", "SPILLS_PATH", "SPILL_META", "spill_key", "load_spills", "SPILLS", "SHARED_LIMIT",
    "target_arch", "autotune_configs", "gpu_configs", "keep_configs", "prune_for", "AUTOTUNE_KEY",
]

#: Field kinds, the ``KIND`` constexpr (the kernels compare with the literals 0, 1, 2).
POTENTIAL, HAMILTONIAN, MLP = 0, 1, 2


def interpreting() -> bool:
    """True when Triton runs through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: ``tl.dot`` precision modes (the INPUT_PRECISION constexpr of every kernel, see ``_dot`` in flow_step_kernels):
#: float32 inputs run "ieee" or "tf32" (:func:`precision_for`), bfloat16 / float16 inputs
#: "bf16" / "fp16"; "tf32_emulated" is the interpreter's stand-in for "tf32" (tests only).
PRECISIONS = ("ieee", "tf32", "bf16", "fp16", "tf32_emulated")
#: modes whose products run on the FMA units (operand tiles in registers) vs. tensor cores
_FMA = ("ieee", "tf32_emulated")


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


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): autotune-key buckets and row-block sizes."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def block_m_for(rows_per_field: int) -> int:
    """Rows per program. 16 under the interpreter (smallest ``tl.dot`` tile: fewest programs);
    on a GPU 16..64 following the mean rows per active field, so that sparse steps (a few rows per
    field) do not pad every field to 64 rows. Not measured on a GPU in this repository yet."""
    if interpreting():
        return 16
    return max(16, min(64, next_pow2(rows_per_field)))


# ----------------------------------------------------------------------------------------------
# The tile space, pruning and the AOT spill table.
# ----------------------------------------------------------------------------------------------

#: The tile space, (BLOCK_H, BLOCK_D), in order of preference (largest first); :func:`keep_configs`
#: keeps the first one that fits the launch within the register budget of its precision (FMA or
#: tensor cores: the two spaces this started with converged to the same tiles). Chosen from the
#: AOT tables of ``python -m sta.kernels.aot`` (sm_80/sm_90): the earlier 8-config space (4-8 warps, 2-3 stages,
#: tiles up to 128x128) spilled in 231 of 460 compiles -- "ieee" lowers tl.dot to FMA with both
#: operand tiles in registers (32x32 tiles, 4 warps, 2 stages, BLOCK_M = 64: 255 registers + 372 B
#: spill) and 64/128-wide tf32 tiles at 3 stages spilled 0.4-3 KB and needed up to 393 KB of shared
#: memory. A first pruned space at 8 warps (32x32 FMA, 64x64 / 64x32 tensor cores) still spilled in
#: 54 of 462 compiles, all in the heavy variants (mlp, curl, hidden backward) or at 8 warps; hence
#: tiles sized by the launch's live tiles.
_TILE_SPACE = ((32, 32), (16, 16))
#: Launch options per tile, (num_warps, num_stages), in order of preference. (4, 1) is spill-free
#: in 452 of 462 AOT compiles; the other 10 keep 4-20 B of stack at 72-168 registers (a ptxas
#: quirk, not register pressure: the same launch at 2 stages or 8 warps has none). Those are
#: listed in ``aot_spills.json`` and :func:`keep_configs` moves on to the next option for them.
_LAUNCH_OPTIONS = ((4, 1), (4, 2), (8, 1))
#: The launch constexprs a spill depends on (besides the tile and the launch options).
SPILL_META = ("INPUT_PRECISION", "BLOCK_M", "KIND", "WANT_CURL")
#: Compiles measured to spill: written by ``python -m sta.kernels.aot --update-spills``.
SPILLS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aot_spills.json")


def spill_key(kernel: str, arch: int, constexprs: dict, num_warps: int, num_stages: int) -> tuple:
    """Identity of one compile in the spill table: kernel, target, the launch constexprs that
    matter, the tile and the launch options."""
    return (kernel, arch, *(constexprs.get(k) for k in SPILL_META), constexprs["BLOCK_H"], constexprs["BLOCK_D"],
            num_warps, num_stages)


def load_spills(path: str = SPILLS_PATH) -> set:
    """The spill table as a set of :func:`spill_key` tuples (empty when the file is missing)."""
    try:
        with open(path) as f:
            entries = json.load(f)["spills"]
    except FileNotFoundError:
        return set()
    return {spill_key(e["kernel"], e["arch"], e, e["num_warps"], e["num_stages"]) for e in entries}


#: The spill table, loaded once (``sta.kernels.aot --update-spills`` reloads it).
SPILLS = load_spills()

#: Most shared memory one block may use (bytes, opt-in maximum) per compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
#: Budget of :func:`_estimate`: live fp32 tile values per thread (see there).
_FMA_BUDGET, _MMA_BUDGET = 8, 16


def autotune_configs():
    """Autotune space over the tile sizes along D and H (BLOCK_M is fixed by the routing).

    Under the interpreter a single 16x16 configuration: ``tl.dot`` needs tiles of at least 16
    and every extra configuration would be run (slowly) by the autotuner; the parity tests run
    every kept GPU configuration explicitly (:func:`gpu_configs`,
    :func:`sta.kernels.launch.forced_config`). On a GPU every tile of :data:`_TILE_SPACE` with
    every launch option; :func:`keep_configs` (the autotuner's ``early_config_prune``) picks per launch.
    """
    if interpreting():
        return [triton.Config({"BLOCK_H": 16, "BLOCK_D": 16}, num_warps=1)]
    return gpu_configs()


def gpu_configs():
    """Every GPU tile configuration, as ``triton.Config``."""
    return [triton.Config({"BLOCK_H": bh, "BLOCK_D": bd}, num_warps=w, num_stages=s)
            for bh, bd in _TILE_SPACE for w, s in _LAUNCH_OPTIONS]


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
    Takes the first (largest) tile of :data:`_TILE_SPACE` whose register estimate is within the
    budget of the precision (FMA for "ieee", tensor cores otherwise) and whose shared memory fits the
    target (so no config is found out by an OutOfResources at run time), with the first launch
    option of :data:`_LAUNCH_OPTIONS` that the AOT spill table (:data:`SPILLS`) does not list for
    this launch; the smallest tile when none fits. Returns a one-element list.
    ``tests/test_triton_aot.py`` compiles what this returns for sm_80 and sm_90.
    """
    fma = meta["INPUT_PRECISION"] in _FMA
    limit = SHARED_LIMIT.get(arch, min(SHARED_LIMIT.values()))
    budget = _FMA_BUDGET if fma else _MMA_BUDGET
    live = _live_tiles(kernel, meta)
    by_tile = {}
    for c in configs:
        by_tile.setdefault((c.kwargs["BLOCK_H"], c.kwargs["BLOCK_D"]), {})[c.num_warps, c.num_stages] = c
    tiles = [t for t in _TILE_SPACE if t in by_tile]

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


def prune_for(kernel: str) -> dict:
    """``prune_configs_by`` of one autotuned kernel: :func:`keep_configs` for this device."""
    def prune(configs, named_args, **meta):
        return keep_configs(configs, target_arch(), meta, kernel)
    return {"early_config_prune": prune}


#: The autotune key: next powers of two of D, H and the most active rows of one field (bucketed,
#: so a new batch size or latent size within a bucket reuses the tuned config).
AUTOTUNE_KEY = ["d_bucket", "h_bucket", "m_bucket"]

