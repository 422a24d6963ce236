"""Command line: ``sta <command>`` (also ``python -m sta <command>``).

Commands:
  demo    time one flow_step on every available backend and print a table
  info    versions, devices and backend availability (same as ``python -m sta.info``)
"""
from __future__ import annotations

import argparse
import sys
import time


def _demo(args) -> int:
    import torch

    from . import FieldBank, flow_step
    from .backends import all_backends, StepRequest

    torch.manual_seed(0)
    fields = FieldBank(args.dim, args.fields, args.fields, args.hidden)
    z = torch.randn(args.batch, args.dim)
    active = torch.zeros(args.batch, args.fields)
    for b in range(args.batch):  # `--active` fields on per sample, speeds ~ 1
        active[b, torch.randperm(args.fields)[: args.active]] = 1.0
    g_pot, g_rot = active * torch.rand_like(active).add(0.5), active * torch.rand_like(active).add(0.5)
    request = StepRequest(z.device, z.dtype, args.batch, args.dim, args.hidden, args.fields, args.fields,
                          "hamiltonian", frozenset({"z", "div"}), True)
    print(f"flow_step, B={args.batch} D={args.dim} H={args.hidden} K={args.fields}+{args.fields} "
          f"({args.active} active per sample), forward+backward, float32, CPU")
    print(f"{'backend':8s} {'median ms':>10s} {'max |dz| vs torch':>18s}")
    reference = None
    for backend in all_backends():
        reasons = backend.why_not(request)
        if reasons:
            print(f"{backend.name:8s} {'-':>10s}   unavailable: {reasons[0]}")
            continue
        times = []
        for _ in range(args.repeats):
            zz = z.clone().requires_grad_(True)
            start = time.perf_counter()
            out = flow_step(zz, 0.5, g_pot, g_rot, fields, backend=backend.name)
            (out.z.square().sum() + out.div.sum()).backward()
            times.append(time.perf_counter() - start)
        if reference is None:
            reference = out.z.detach()
        err = (out.z.detach() - reference).abs().max().item()
        print(f"{backend.name:8s} {1e3 * sorted(times)[len(times) // 2]:10.3f} {err:18.2e}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sta", description="Sparse Transformation Analysis")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="time one flow_step on every available backend")
    demo.add_argument("--batch", type=int, default=128)
    demo.add_argument("--dim", type=int, default=226)
    demo.add_argument("--hidden", type=int, default=226)
    demo.add_argument("--fields", type=int, default=5)
    demo.add_argument("--active", type=int, default=2)
    demo.add_argument("--repeats", type=int, default=20)
    demo.set_defaults(run=_demo)
    info = sub.add_parser("info", help="versions, devices and backend availability")
    info.set_defaults(run=lambda args: print(__import__("sta.info", fromlist=["report"]).report()) or 0)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
