"""Shared benchmark harness: timing, peak memory, provenance, CSV and tables.

Used by every ``benchmarks/bench_<op>.py``. Pieces:

* :func:`measure` -- time a callable: warm-up, then repeats until a count or a time budget is
  reached; returns median and p20/p80 in milliseconds (CUDA is synchronised around each call).
* :func:`peak_memory_mb` -- extra memory a call allocates at its peak (CUDA: the caching
  allocator's counter; CPU: the torch profiler's allocation events).
* :func:`sgemm_peak_gflops` -- the float32 matmul ceiling of this machine, measured now.
* :class:`Providers` -- a registry of named implementations (``@providers.register("name")``),
  so adding a backend to a benchmark is a few lines.
* :func:`provenance`, :func:`write_csv`, :func:`print_table` -- machine, versions and git sha on
  every CSV row; a fixed-width table on stdout.
"""
from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------

@dataclass
class Timing:
    """Milliseconds per call: median and the 20th / 80th percentiles over ``reps`` calls."""

    median: float
    p20: float
    p80: float
    reps: int

    def __str__(self) -> str:
        return f"{self.median:.3f} ms [{self.p20:.3f}, {self.p80:.3f}] (n={self.reps})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(sorted_values: list, q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def measure(fn: Callable[[], object], device: torch.device, warmup: int = 1, reps: int = 10,
            min_reps: int = 3, budget_s: float = 2.0) -> Timing:
    """Time ``fn()``: ``warmup`` calls, then up to ``reps`` timed calls, stopping early once
    ``min_reps`` were done and ``budget_s`` seconds were spent (slow baselines stay affordable)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < reps:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= min_reps and time.perf_counter() - start > budget_s:
            break
    times.sort()
    return Timing(statistics.median(times), _percentile(times, 0.2), _percentile(times, 0.8), len(times))


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak extra memory (MiB) allocated by torch during one call of ``fn`` on ``device``."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The raw allocation records: prof.events() folds every allocation made inside an op into that
    # op and keeps only the frees outside ops as "[memory]" events (torch 2.13), so it reads 0.
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort()
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2 ** 20


def sgemm_peak_gflops(device: torch.device, n: int = 2048, budget_s: float = 3.0) -> float:
    """float32 GEMM throughput (GFLOP/s) of an n x n x n product on ``device``, best of a few runs."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    t = measure(lambda: torch.mm(a, b, out=out), device, warmup=1, reps=10, min_reps=3, budget_s=budget_s)
    return 2 * n ** 3 / (t.p20 * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------
# providers
# ----------------------------------------------------------------------------------------------

@dataclass
class Provider:
    """One implementation in a benchmark. ``build(case) -> fn or None`` (None: not applicable);
    ``devices``: device types it runs on; ``label``: the name printed in tables."""

    name: str
    label: str
    build: Callable
    devices: tuple


class Providers:
    """Registry of the implementations a benchmark compares; order of registration is kept.

    Example::

        providers = Providers()

        @providers.register("cuda", "(h) cuda backend", devices=("cuda",))
        def _cuda(case):
            return lambda: sta.flow_step(case.z, ..., backend="cuda")
    """

    def __init__(self):
        self._items: dict[str, Provider] = {}

    def register(self, name: str, label: Optional[str] = None, devices: Iterable[str] = ("cpu", "cuda")):
        def wrap(build):
            self._items[name] = Provider(name, label or name, build, tuple(devices))
            return build
        return wrap

    def for_device(self, device_type: str) -> list:
        return [p for p in self._items.values() if device_type in p.devices]

    def names(self) -> list:
        return list(self._items)


# ----------------------------------------------------------------------------------------------
# provenance and output
# ----------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def provenance(device: torch.device) -> dict:
    """Machine, versions and git sha, attached to every CSV row."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_sha": git_sha(),
        "machine": f"{cpu_model()} ({os.cpu_count()} cpus, {torch.get_num_threads()} torch threads)",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        info["machine"] += f"; {torch.cuda.get_device_name(device)}"
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = ""
    try:
        import sta

        info["sta"] = sta.__version__
    except Exception:
        info["sta"] = ""
    return info


def write_csv(path: str, rows: list, extra: dict) -> None:
    """Write ``rows`` (dicts) with the ``extra`` provenance columns appended to each."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fields: list = []
    for row in rows:
        for key in list(row) + list(extra):
            if key not in fields:
                fields.append(key)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **extra})


def _fmt(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.2e}" if value != 0 else "0"
    return str(value)


def print_table(rows: list, columns: list, title: str = "") -> str:
    """Print (and return) a fixed-width table of ``rows`` restricted to ``columns``."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells)
    text = "\n".join(lines)
    print(text, flush=True)
    return text
