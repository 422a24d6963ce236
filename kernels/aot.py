"""Ahead-of-time compile check of every Triton kernel of ``sta.kernels``, without a GPU.

``python -m sta.kernels.aot [--jobs 2] [--log FILE] [--json FILE]`` (``TRITON_INTERPRET`` must
be unset or 0: interpreted kernels cannot be compiled) prints one summary line and exits 1 when
any compile fails, spills registers or needs more shared memory than the target has.

What is compiled: the launches the launchers themselves make (:func:`sta.kernels.launch.recording`
runs :func:`~sta.kernels.flow_step.flow_step_fwd`, :func:`~sta.kernels.flow_step.flow_step_bwd`
and :func:`~sta.kernels.grid_transport.grid_transport_fwd` on small CPU tensors and records the
arguments instead of launching), over every field kind, curl on/off, the three row-block sizes
the routing can pick, and every input dtype with its ``tl.dot`` precision (float32 "ieee" and
"tf32", bfloat16, float16; float32/float64 for grid transport); signatures come from the recorded
arguments (tensor dtype -> pointer type). Each launch is compiled for sm_80 and sm_90 with every
autotune config that :func:`sta.kernels.configs.keep_configs` keeps for that target, through
the whole pipeline (ttir .. ptx, then the ptxas bundled with triton); registers and spills come
from the ptxas log, shared memory from the kernel metadata.

Results are cached (``$STA_AOT_CACHE``, default ``~/.cache/sta/triton_aot.json``) under a key
holding triton's hash of the kernel source (with the jit functions it calls), the triton version
and the compile inputs, so an unchanged kernel is not recompiled; ``--no-cache`` compiles
everything. Cold, the whole check is about 460 compiles (about 1 s each on one CPU core).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import time
from typing import NamedTuple

import torch

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # pragma: no cover - usage error
    raise RuntimeError("sta.kernels.aot compiles for the GPU: run it with TRITON_INTERPRET unset or 0")

import triton  # noqa: E402

from . import configs  # noqa: E402
from . import flow_step as fs  # noqa: E402
from . import flow_step_kernels  # noqa: E402
from . import grid_transport as gt  # noqa: E402
from .launch import recording  # noqa: E402

__all__ = ["TARGETS", "SHARED_LIMIT", "Job", "jobs", "run", "main"]

#: the targets compiled for, and the most shared memory one block may use on each (bytes)
TARGETS = (80, 90)
SHARED_LIMIT = {arch: configs.SHARED_LIMIT[arch] for arch in TARGETS}

_SIG = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
        torch.int64: "i64", torch.int32: "i32", torch.bool: "i1"}

#: input dtype -> the tl.dot precisions the backend uses for it (fp32: both matmul settings)
PRECISIONS_BY_DTYPE = {torch.float32: ("ieee", "tf32"), torch.bfloat16: ("bf16",), torch.float16: ("fp16",)}


class Job(NamedTuple):
    """One compile: kernel (module, name), signature, constexprs, target, launch options."""

    module: str
    name: str
    signature: tuple  # ((arg name, type), ...): "*fp32", "i32", ..., "constexpr"
    constexprs: tuple  # ((name, value), ...)
    label: str  # the launch it comes from: combination, dtype, precision
    arch: int
    num_warps: int
    num_stages: int

    def key(self, salt: str) -> str:
        return hashlib.sha256(repr((salt, self)).encode()).hexdigest()


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _SIG[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type the kernel argument {value!r}")


def _flow_step_launches():
    """(label, Launch) of every flow-step kernel launch the launchers can make."""
    out = []
    D, H, K = 5, 7, 1
    for dtype, precisions in PRECISIONS_BY_DTYPE.items():
        for precision in precisions:
            for block_m in (16, 32, 64):  # the three sizes block_m_for can pick
                # one field with exactly block_m active rows: the routing picks BLOCK_M = block_m
                z = torch.randn(block_m, D, dtype=dtype)
                g = torch.ones(block_m, K, dtype=dtype)
                assert configs.block_m_for(block_m) == block_m
                params = dict(W=torch.randn(K, H, D, dtype=dtype), c=torch.randn(K, H, dtype=dtype))
                c, M = params["c"], torch.randn(K, D, H, dtype=dtype)
                kinds = [
                    ("potential", fs.POTENTIAL, False, dict(a=c, de=c)),
                    ("hamiltonian", fs.HAMILTONIAN, False, dict(a=c, W_out=M)),
                    ("hamiltonian+curl", fs.HAMILTONIAN, True,
                     dict(a=c, W_out=M, mat=torch.randn(K, H, H, dtype=dtype))),
                    ("mlp", fs.MLP, False, dict(W_out=torch.randn(K, D, H, dtype=dtype),
                                                b2=torch.randn(K, D, dtype=dtype),
                                                mat=torch.randn(K, D, H, dtype=dtype))),  # mat: C above, Pdiv here
                ]
                for name, kind, curl, extra in kinds:
                    label = f"{name} {str(dtype)[6:]} {precision} BLOCK_M={block_m}"
                    kw = dict(params, **extra, want_curl=curl, precision=precision)
                    grads = [torch.ones(block_m, D), torch.ones(block_m), torch.ones(block_m, K), torch.ones(block_m, K)]
                    with recording() as launches:
                        fs.flow_step_fwd(z, g, kind, **kw)
                        fs.flow_step_bwd(*grads, z, g, kind, **kw)
                    out += [(label, launch) for launch in launches]
    return out


def _grid_launches():
    out = []
    for dtype in (torch.float32, torch.float64):
        for ndim in (2, 3):
            shape = (4,) * ndim
            rho = torch.rand(shape, dtype=dtype)
            faces = tuple(torch.zeros(shape[:a] + (shape[a] + 1,) + shape[a + 1:], dtype=dtype) for a in range(ndim))
            for periodic in (False, True):
                for limiter in (0, 1, 2):
                    label = f"{ndim}-D {str(dtype)[6:]} periodic={periodic} limiter={limiter}"
                    with recording() as launches:
                        gt.grid_transport_fwd(rho, faces, (0.1,) * ndim, periodic, limiter)
                    out += [(label, launch) for launch in launches]
    return out


def jobs(targets=TARGETS) -> list[Job]:
    """Every compile to run: recorded launch x target x kept config, deduplicated."""
    seen, result = set(), []
    for label, launch in _flow_step_launches() + _grid_launches():
        kernel = launch.kernel
        autotuned = isinstance(kernel, triton.runtime.Autotuner)
        fn = kernel.fn if autotuned else kernel
        meta = dict(launch.meta)
        for arch in targets:
            if autotuned:
                kept = configs.keep_configs(kernel.configs, arch, meta, fn.__name__)
            else:  # the launch options the JIT uses when the launcher passes none
                kept = [triton.Config({}, num_warps=meta.pop("num_warps", 4), num_stages=meta.pop("num_stages", 3))]
            for cfg in kept:
                consts = {**meta, **cfg.kwargs}
                sig, values = [], iter(launch.args)
                for p in fn.params:
                    sig.append((p.name, "constexpr" if p.is_constexpr else _arg_type(next(values))))
                job = Job(fn.__module__, fn.__name__, tuple(sig), tuple(sorted(consts.items())), label, arch,
                          cfg.num_warps, cfg.num_stages)
                ident = job._replace(label="")
                if ident not in seen:
                    seen.add(ident)
                    result.append(job)
    return result


_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def compile_job(job: Job) -> dict:
    """Compile one job; returns its registers, spills, shared memory and error (if any)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.nvidia.dump_ptxas_log = True  # ptxas -v output goes to stdout: registers and spills
    knobs.compilation.always_compile = True  # a triton cache hit would print no ptxas log
    fn = getattr(sys.modules[job.module], job.name)
    fn = fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn
    sig = dict(job.signature)
    attrs = {(i,): [["tt.divisibility", 16]] for i, (_, t) in enumerate(job.signature) if t.startswith("*")}
    start = time.perf_counter()
    buf = io.StringIO()
    res = dict(regs=0, stack=0, spill_stores=0, spill_loads=0, shared=0, error="")
    try:
        with contextlib.redirect_stdout(buf):
            kernel = triton.compile(ASTSource(fn, sig, dict(job.constexprs), attrs),
                                    target=GPUTarget("cuda", job.arch, 32),
                                    options=dict(num_warps=job.num_warps, num_stages=job.num_stages))
        res["shared"] = int(kernel.metadata.shared)
        log = buf.getvalue()
        for name, pattern in _PTXAS.items():
            res[name] = max((int(v) for v in pattern.findall(log)), default=0)
    except Exception as err:  # a compile error is a result, reported by the caller
        res["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
    res["seconds"] = round(time.perf_counter() - start, 3)
    return res


def _salt(job: Job) -> str:
    """Triton's own hash of the kernel (its source, the jit functions it calls, the globals it
    reads) and the triton version: an edited kernel is compiled again."""
    fn = getattr(sys.modules[job.module], job.name)
    fn = fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn
    return triton.__version__ + fn.cache_key


def run(job_list, processes=2, cache_path=None):
    """Compile the jobs (cached results reused); returns (results in job order, cache hits)."""
    cache = {}
    if cache_path and os.path.exists(cache_path):
        try:
            with open(cache_path) as f:
                cache = json.load(f)
        except (OSError, ValueError):
            cache = {}
    keys = [job.key(_salt(job)) for job in job_list]
    todo = [i for i, key in enumerate(keys) if key not in cache]
    # largest tiles first, so that the pool's two workers finish together
    todo.sort(key=lambda i: -sum(v for k, v in job_list[i].constexprs if k.startswith("BLOCK") and isinstance(v, int)))
    if todo:
        if processes > 1 and len(todo) > 1:
            with multiprocessing.get_context("fork").Pool(processes) as pool:
                fresh = pool.map(compile_job, [job_list[i] for i in todo], chunksize=1)
        else:
            fresh = [compile_job(job_list[i]) for i in todo]
        for i, res in zip(todo, fresh):
            cache[keys[i]] = res
        if cache_path:
            os.makedirs(os.path.dirname(cache_path) or ".", exist_ok=True)
            with open(cache_path + ".tmp", "w") as f:
                json.dump(cache, f)
            os.replace(cache_path + ".tmp", cache_path)
    return [cache[key] for key in keys], len(job_list) - len(todo)


def verdict(job: Job, res: dict) -> str:
    """'' when the compile is usable on its target, else why not."""
    if res["error"]:
        return "error: " + res["error"]
    if res["spill_stores"] or res["spill_loads"] or res["stack"]:
        return f"spills ({res['spill_stores']} B stores, {res['spill_loads']} B loads, {res['stack']} B stack)"
    if res["shared"] > SHARED_LIMIT[job.arch]:
        return f"shared memory {res['shared']} B > {SHARED_LIMIT[job.arch]} B"
    return ""


def summary(job_list, results, seconds, hits) -> str:
    bad = [verdict(j, r) for j, r in zip(job_list, results)]
    per_arch = ", ".join(f"sm_{a} {sum(j.arch == a for j in job_list)}" for a in TARGETS)
    return (f"triton AOT: {len(job_list)} compiles ({per_arch}), "
            f"{sum(b.startswith('error') for b in bad)} compile errors, "
            f"{sum(b.startswith('spills') for b in bad)} spilling, "
            f"{sum(b.startswith('shared') for b in bad)} over shared memory; "
            f"max {max((r['regs'] for r in results), default=0)} registers, "
            f"max {max((r['shared'] for r in results), default=0)} B shared; "
            f"{seconds:.0f} s ({hits} cached)")


def table(job_list, results) -> str:
    """Per-compile table and a per-kernel summary (registers and shared memory, min..max)."""
    lines = ["kernel | arch | launch | constexprs | warps | stages | regs | spill st/ld | stack | shared | verdict"]
    for j, r in zip(job_list, results):
        consts = " ".join(f"{k}={v}" for k, v in j.constexprs if k.startswith("BLOCK"))
        lines.append(f"{j.name} | sm_{j.arch} | {j.label} | {consts} | {j.num_warps} | {j.num_stages} | {r['regs']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {r['stack']} | {r['shared']} | {verdict(j, r) or 'ok'}")
    lines += ["", "kernel | arch | compiles | registers min..max | shared B min..max | spilling"]
    groups = {}
    for j, r in zip(job_list, results):
        groups.setdefault((j.name, j.arch), []).append(r)
    for (name, arch), rs in sorted(groups.items()):
        regs = [r["regs"] for r in rs]
        shared = [r["shared"] for r in rs]
        spill = sum(1 for r in rs if r["spill_stores"] or r["spill_loads"] or r["stack"])
        lines.append(f"{name} | sm_{arch} | {len(rs)} | {min(regs)}..{max(regs)} | {min(shared)}..{max(shared)} | {spill}")
    return "\n".join(lines)


def update_spills(job_list, results, path=None) -> int:
    """Add the spilling flow-step compiles to the spill table that :func:`~sta.kernels.configs.keep_configs`
    reads (and reload it); returns how many were new. The table keeps ptxas's figures for the record."""
    path = path or configs.SPILLS_PATH
    try:
        with open(path) as f:
            table_ = json.load(f)
    except FileNotFoundError:
        table_ = {"about": "Flow-step compiles that spill registers (ptxas, through triton's AOT compile); "
                           "keep_configs skips them. Written by python -m sta.kernels.aot --update-spills.",
                  "spills": []}
    known = configs.load_spills(path)
    new = []
    for job, res in zip(job_list, results):
        if not verdict(job, res).startswith("spills") or job.module != flow_step_kernels.__name__:
            continue
        consts = dict(job.constexprs)
        key = configs.spill_key(job.name, job.arch, consts, job.num_warps, job.num_stages)
        if key in known:
            continue
        known.add(key)
        new.append(dict({"kernel": job.name, "arch": job.arch}, **{k: consts.get(k) for k in configs.SPILL_META},
                        BLOCK_H=consts["BLOCK_H"], BLOCK_D=consts["BLOCK_D"], num_warps=job.num_warps,
                        num_stages=job.num_stages, regs=res["regs"], spill_stores=res["spill_stores"],
                        spill_loads=res["spill_loads"], stack=res["stack"]))
    if new:
        table_["spills"] = sorted(table_["spills"] + new, key=lambda e: (e["kernel"], e["arch"], str(e)))
        with open(path + ".tmp", "w") as f:
            json.dump(table_, f, indent=1)
            f.write("\n")
        os.replace(path + ".tmp", path)
        configs.SPILLS = configs.load_spills(path)  # what keep_configs reads
    return len(new)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--log", help="write the per-compile and per-kernel tables here")
    parser.add_argument("--json", help="write the jobs and results here")
    parser.add_argument("--no-cache", action="store_true", help="compile everything")
    parser.add_argument("--update-spills", action="store_true",
                        help="add every kept config that spills to the spill table (sta/kernels/aot_spills.json) and "
                             "compile again until the kept configs are spill-free or no option is left")
    args = parser.parse_args(argv)
    cache = None if args.no_cache else os.environ.get(
        "STA_AOT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "sta", "triton_aot.json"))
    start = time.perf_counter()
    job_list = jobs()
    results, hits = run(job_list, args.jobs, cache)
    while args.update_spills and update_spills(job_list, results):
        job_list = jobs()
        results, more = run(job_list, args.jobs, cache)
        hits += more
    line = summary(job_list, results, time.perf_counter() - start, hits)
    if args.log:
        with open(args.log, "w") as f:
            f.write(line + "\n\n" + table(job_list, results) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(job._asdict(), **res, verdict=verdict(job, res)) for job, res in zip(job_list, results)],
                      f, indent=1)
    print(line)
    return 1 if any(verdict(j, r) for j, r in zip(job_list, results)) else 0


if __name__ == "__main__":
    sys.exit(main())
