"""Benchmark of one grid transport step (sta.grid_transport): cell updates per second per backend.

Grids: 512 x 512 (2-D) and 128^3 (3-D), float32, van Leer limiter, zero-flux boundaries, random
non-negative density and face velocities at CFL 0.9. For every backend that can run on the device:

* ``step``: the public op ``sta.grid_transport`` (validation + the CFL check + the kernel);
* ``kernel``: the backend's kernel alone (what the step costs without the per-call CFL reduction).

Achieved bandwidth counts the compulsory traffic (read rho and the d face arrays, write rho) and is
compared with the machine's ceiling, measured in the same run as a large ``copy_`` (read + write).
The Triton interpreter (CPU) is far too slow at these sizes and is reported as skipped. Results:
``benchmarks/results/grid_transport_<device>.csv`` with provenance (versions, git sha, threads).

    python benchmarks/bench_grid_transport.py [--repeats 30] [--device cpu|cuda] [--out PATH]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402

import sta  # noqa: E402
from sta.backends import Request, all_backends  # noqa: E402
from sta.grid import cfl_number  # noqa: E402
from sta.grid.checks import _check_faces  # noqa: E402


def bandwidth_ceiling(device):
    """GB/s of a 256 MiB float32 copy (bytes read + bytes written), median of a few."""
    src = torch.rand(64 * 2 ** 20, device=device)
    dst = torch.empty_like(src)
    t = H.measure(lambda: dst.copy_(src), device, warmup=1, reps=10, budget_s=3.0)
    return 2 * src.numel() * src.element_size() / (t.median * 1e-3) / 1e9


def case(shape, device, dtype=torch.float32):
    """Random non-negative density and face velocities; dt at CFL 0.9 for the van Leer limiter."""
    gen = torch.Generator().manual_seed(0)
    rho = torch.rand(shape, generator=gen, dtype=dtype).to(device)
    faces = []
    for a in range(len(shape)):
        fshape = shape[:a] + (shape[a] + 1,) + shape[a + 1:]
        faces.append(torch.randn(fshape, generator=gen, dtype=dtype).to(device))
    dx = 1.0 / shape[0]
    dt = 0.9 / cfl_number(faces, dx, 1.0)
    return rho, tuple(faces), dx, dt


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    out_path = args.out or os.path.join(H.RESULTS_DIR, f"grid_transport_{device.type}.csv")

    ceiling = bandwidth_ceiling(device)
    rows = []
    for shape in [(512, 512), (128, 128, 128)]:
        rho, faces, dx, dt = case(shape, device)
        cells = rho.numel()
        # compulsory traffic: read rho and every face array, write rho
        bytes_moved = (2 * rho.numel() + sum(u.numel() for u in faces)) * rho.element_size()
        for impl in all_backends("grid_transport"):
            name = impl.name
            base = dict(grid="x".join(map(str, shape)), backend=name, dtype="float32", cells=cells,
                        ceiling_gbs=round(ceiling, 2))
            reasons = impl.why_not(Request("grid_transport", rho.device, rho.dtype))
            if name == "triton" and device.type == "cpu":
                reasons = ["on CPU only the Triton interpreter runs, far too slow at this size (a test vehicle, "
                           "not a fast path)"]
            if reasons:
                rows.append(dict(base, what="skipped", note="; ".join(reasons)))
                continue
            coef = tuple(dt / dx for _ in shape)
            checked = _check_faces(faces, rho, "zero_flux")
            runs = {
                "step": lambda: sta.grid_transport(rho, faces, dx, dt, backend=name),
                "kernel": lambda: impl.transport(rho, checked, coef, False, "van_leer"),
            }
            for what, fn in runs.items():
                with torch.no_grad():
                    t = H.measure(fn, device, warmup=2, reps=args.repeats, budget_s=5.0)
                gbs = bytes_moved / (t.median * 1e-3) / 1e9
                rows.append(dict(base, what=what, median_ms=t.median, p20_ms=t.p20, p80_ms=t.p80, reps=t.reps,
                                 mcells_per_s=cells / (t.median * 1e-3) / 1e6, gbs=gbs,
                                 pct_ceiling=100 * gbs / ceiling, note=""))

    prov = H.provenance(device)
    H.print_table(rows, ["grid", "backend", "what", "median_ms", "p20_ms", "p80_ms", "mcells_per_s", "gbs",
                         "pct_ceiling", "note"],
                  title=f"grid_transport, float32, van Leer, zero-flux -- {prov['machine']}; "
                        f"copy bandwidth ceiling {ceiling:.1f} GB/s")
    H.write_csv(out_path, rows, prov)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
