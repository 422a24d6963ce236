"""Seconds per STA training iteration: the number a user's training time is made of.

One iteration = ``model.elbo(x)`` forward + backward + an Adam step, on random frames of the
model's image size (the data loader is not timed). For every size x batch x variant the script
reports the median seconds per iteration (p20/p80), a per-phase split, the fraction of
(sample, transition, field) pairs the flow evaluated (the ELBO's ``evaluated``), the peak
memory of one iteration (``peak_mb``: tensors alive at once, the cpu backend's pooled buffers
included) and the free blocks the cpu backend's buffer pool keeps after it (``pool_mb``: held for
the next iteration, so the process's footprint is at most the sum).

Sizes (``--sizes``; image 28x28x3, T = 8, the ``quick`` preset's conv width unless noted):

    paper    D 324,  K 3,  hidden 64    (the paper preset's latent and field sizes)
    d512     D 512,  K 16, hidden 512
    d1024    D 1024, K 32, hidden 1024

Variants (``--variants``), each a set of ``ModelConfig`` overrides, so a new training option is one
line in ``VARIANTS``:

    reference   backend "torch", spike_floor 0, the path as T per-step flow_step calls (every
                field parameter, M = A W^T included, re-formed at every step) and the conv
                networks in NCHW layout: how sta trained before the training-speed work
    fast        the package defaults (backend "auto": the fastest available backend; spike_floor
                0.01: relaxed spikes below 1e-2 are skipped; on random frames at initialisation few
                spikes are that small, after training about half are)
    bf16        fast + the conv networks under bf16 autocast (TrainConfig.precision = "bf16")
    compiled    fast + ``torch.compile(model.elbo)`` (TrainConfig.compile); its first iteration (the
                compile) is reported apart, and the phase split is not measured (the hooks that
                time the phases would break the compiled graph): path+loss is the whole forward

Phases: ``encoder``, ``posterior`` and ``decoder`` are the forward time inside those modules
(forward hooks); ``path+loss`` is the rest of the forward (the latent path through the flow ops,
the priors and the ELBO terms); ``backward`` and ``optimizer`` are timed around their calls.

    python benchmarks/bench_train.py                        # all sizes, batch 32 and 128
    python benchmarks/bench_train.py --sizes paper --batches 32 --reps 3

Writes ``benchmarks/results/train_<device>.csv`` and ``.md`` with machine, threads and git sha.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from contextlib import contextmanager
from typing import NamedTuple, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import RESULTS_DIR, peak_memory_mb, print_table, provenance, write_csv  # noqa: E402

from sta import _extension  # noqa: E402
from sta.model import ModelConfig, STAModel  # noqa: E402
from sta.models import networks  # noqa: E402
from sta.path import chained_flow_path  # noqa: E402

SIZES = {
    "paper": dict(latent=324, num_fields=3, hidden=64),
    "d512": dict(latent=512, num_fields=16, hidden=512),
    "d1024": dict(latent=1024, num_fields=32, hidden=1024),
}
class Variant(NamedTuple):
    """How a variant trains: ``ModelConfig`` overrides and the switches that are not config fields."""

    overrides: dict
    network_dtype: Optional[torch.dtype] = None  # the conv networks under autocast to this dtype
    per_step: bool = False                       # the path as T per-step flow_step calls
    compiled: bool = False                       # torch.compile(model.elbo)
    nchw: bool = False                           # conv networks in NCHW layout (as before channels-last)


VARIANTS = {
    "reference": Variant(dict(backend="torch", spike_floor=0.0), per_step=True, nchw=True),
    "fast": Variant(dict()),
    "bf16": Variant(dict(), network_dtype=torch.bfloat16),
    "compiled": Variant(dict(), compiled=True),
}


@contextmanager
def conv_layout(nchw: bool):
    """Build and run the conv networks in NCHW layout (the reference variant)."""
    original = networks.MEMORY_FORMAT
    networks.MEMORY_FORMAT = torch.contiguous_format if nchw else original
    try:
        yield
    finally:
        networks.MEMORY_FORMAT = original


@contextmanager
def per_step_path(enabled: bool):
    """Run the model kinds' flow_path as T per-step flow_step calls (the reference variant)."""
    patched = []
    if enabled:
        for name, module in list(sys.modules.items()):
            if name.startswith("sta.models") and hasattr(module, "flow_path"):
                patched.append((module, module.flow_path))
                module.flow_path = chained_flow_path
    try:
        yield
    finally:
        for module, original in patched:
            module.flow_path = original
PHASES = ("encoder", "posterior", "path+loss", "decoder", "backward", "optimizer")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseClock:
    """Accumulates forward seconds per named submodule (forward pre/post hooks)."""

    def __init__(self, model: torch.nn.Module, names, device: torch.device):
        self.device, self.seconds, self._start, self.handles = device, {}, {}, []
        for name in names:
            module = getattr(model, name, None)
            if module is None:
                continue
            self.handles.append(module.register_forward_pre_hook(self._pre(name)))
            self.handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(module, args):
            _sync(self.device)
            self._start[name] = time.perf_counter()
        return hook

    def _post(self, name):
        def hook(module, args, out):
            _sync(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self._start.pop(name)
        return hook

    def reset(self) -> None:
        self.seconds = {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def bench_one(size: str, batch: int, variant: str, device: torch.device, reps: int, seed: int = 0) -> dict:
    """Median seconds per iteration and its phase split for one configuration."""
    with conv_layout(VARIANTS[variant].nchw):
        return _bench_one(size, batch, variant, device, reps, seed)


def _bench_one(size: str, batch: int, variant: str, device: torch.device, reps: int, seed: int) -> dict:
    empty_pool(device)  # each configuration fills the cpu backend's buffer pool itself (pool_mb is its own)
    torch.manual_seed(seed)
    overrides, network_dtype, per_step, compiled, _ = VARIANTS[variant]
    config = ModelConfig(model="sta", channels=3, image_size=28, transitions=8, conv=16,
                         **SIZES[size], **overrides)
    model = STAModel(config).to(device).train()
    model.network_dtype = network_dtype
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, config.transitions + 1, 3, 28, 28, generator=torch.Generator().manual_seed(seed)).to(device)
    clock = None if compiled else PhaseClock(model, ("encoder", "posterior", "decoder"), device)
    if compiled:  # each configuration compiles afresh (and cannot exhaust dynamo's recompile limit)
        torch._dynamo.reset()
    elbo = torch.compile(model.elbo) if compiled else model.elbo

    def iteration(phases: dict) -> None:
        if clock:
            clock.reset()
        _sync(device)
        t0 = time.perf_counter()
        terms = elbo(x, temperature=0.5)
        phases.setdefault("evaluated", []).append(terms.evaluated.detach())
        _sync(device)
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        optimizer.step()
        _sync(device)
        t3 = time.perf_counter()
        inside = sum(clock.seconds.values()) if clock else 0.0
        for name in ("encoder", "posterior", "decoder"):
            phases.setdefault(name, []).append(clock.seconds.get(name, 0.0) if clock else math.nan)
        phases.setdefault("path+loss", []).append(t1 - t0 - inside)
        phases.setdefault("backward", []).append(t2 - t1)
        phases.setdefault("optimizer", []).append(t3 - t2)
        phases.setdefault("total", []).append(t3 - t0)

    with per_step_path(per_step):
        first: dict = {}
        iteration(first)  # warm-up: first-call costs (extension load, allocator, a compile) are not the steady state
        phases: dict = {}
        for _ in range(reps):
            iteration(phases)
        if clock:
            clock.remove()
        peak = peak_memory_mb(lambda: iteration({}), device)
    totals = sorted(phases["total"])
    row = {
        "size": size, "D": config.latent, "K": config.num_fields, "H": config.hidden, "batch": batch,
        "variant": variant, "backend": config.backend,
        "s_per_iter": statistics.median(totals),
        "p20": totals[int(0.2 * (len(totals) - 1))], "p80": totals[int(round(0.8 * (len(totals) - 1)))],
        "pairs_evaluated": float(torch.stack(phases["evaluated"]).mean()), "peak_mb": peak,
        "pool_mb": pool_cached_mb(device), "reps": reps,
        "first_iter_s": first["total"][0],
    }
    for name in PHASES:
        row[f"{name}_s"] = statistics.median(phases[name])
    return row


def _cpu_pool(device: torch.device):
    """sta.backends.cpu (its buffer pool's handles) when ``device`` is the CPU and the extension is
    loaded, else None."""
    if device.type != "cpu" or _extension.load() is None:
        return None
    from sta.backends import cpu
    return cpu


def empty_pool(device: torch.device) -> None:
    pool = _cpu_pool(device)
    if pool is not None:
        pool.empty_cache()


def pool_cached_mb(device: torch.device) -> float:
    """MiB of free blocks the cpu backend's buffer pool holds after the iteration: memory the process
    keeps beyond ``peak_mb`` (which counts the pool's blocks only while tensors use them)."""
    pool = _cpu_pool(device)
    return 0.0 if pool is None else pool.memory_stats()["cached"] / 2 ** 20


def markdown(rows: list, info: dict, command: str) -> str:
    head = ("| size | batch | variant | s / iteration [p20, p80] | x reference | path+loss share | "
            "pairs evaluated | peak MB | pool MB | first iteration s | " + " | ".join(f"{p} s" for p in PHASES) + " |")
    lines = [f"# Seconds per training iteration ({info['machine']})", "",
             f"`{command}`; torch {info['torch']}, git {info['git_sha']}, {info['date']}.", "",
             head, "|" + "---|" * (10 + len(PHASES))]
    ref = {(r["size"], r["batch"]): r["s_per_iter"] for r in rows if r["variant"] == "reference"}
    for r in rows:
        base = ref.get((r["size"], r["batch"]))
        speedup = f"{base / r['s_per_iter']:.2f}x" if base else "n/a"
        share = r["path+loss_s"] / r["s_per_iter"]
        lines.append(f"| {r['size']} (D {r['D']}, K {r['K']}, H {r['H']}) | {r['batch']} | {r['variant']} | "
                     f"{r['s_per_iter']:.3f} [{r['p20']:.3f}, {r['p80']:.3f}] | {speedup} | {share:.0%} | "
                     f"{r['pairs_evaluated']:.2f} | {r['peak_mb']:.0f} | {r['pool_mb']:.0f} | {r['first_iter_s']:.1f} | "
                     + " | ".join("-" if math.isnan(r[f"{p}_s"]) else f"{r[f'{p}_s']:.3f}" for p in PHASES) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--variants", nargs="+", default=["reference", "fast"], choices=list(VARIANTS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: comparable runs)")
    parser.add_argument("--reps", type=int, default=3, help="timed iterations per configuration")
    parser.add_argument("--out", default=None, help="CSV path (default benchmarks/results/train_<device>.csv)")
    args = parser.parse_args(argv)
    if args.reps < 1 or any(b < 1 for b in args.batches) or args.threads < 1:
        parser.error("--reps, --batches and --threads must be positive")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for size in args.sizes:
        for batch in args.batches:
            for variant in args.variants:  # reference and fast alternate per configuration
                row = bench_one(size, batch, variant, device, args.reps)
                print(f"{size} B={batch} {variant}: {row['s_per_iter']:.3f} s/iter "
                      f"(path+loss {row['path+loss_s']:.3f} s)", flush=True)
                rows.append(row)
    info = provenance(device)
    out = args.out or os.path.join(RESULTS_DIR, f"train_{device.type}.csv")
    write_csv(out, rows, info)
    command = "python benchmarks/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(markdown(rows, info, command.strip()))
    print_table(rows, ["size", "batch", "variant", "s_per_iter", "pairs_evaluated", "peak_mb"], title="")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
