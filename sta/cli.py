"""Command line: ``sta <command>`` (also ``python -m sta <command>``).

Commands:
  demo      time one flow_step on every available backend and print a table
  info      versions, devices and backend availability (same as ``python -m sta.info``)
  train     train a model (``--preset quick`` by default); ``torchrun ... -m sta train`` for several processes
  evaluate  metrics of a run directory -> RUN_DIR/eval.json and a table
  plot      figures of a run directory -> RUN_DIR/plots/*.png, *.gif
  run       train + evaluate + plot in one command (default preset)

Exit status: 0 done; 2 a user error (bad option, config or run directory), one line on stderr;
1 the training diverged (non-finite loss or gradients, see ``max_nonfinite_steps`` in
:class:`sta.train.TrainConfig`), one line on stderr naming the step, the first non-finite term and the
last good checkpoint (``sta train --out RUN --resume --set lr=...`` continues from it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _demo(args) -> int:
    import torch

    from . import FieldBank, flow_step
    from .backends import Request, all_backends

    torch.manual_seed(0)
    fields = FieldBank(args.dim, args.fields, args.fields, args.hidden)
    z = torch.randn(args.batch, args.dim)
    active = torch.zeros(args.batch, args.fields)
    for b in range(args.batch):  # `--active` fields on per sample, speeds ~ 1
        active[b, torch.randperm(args.fields)[: args.active]] = 1.0
    g_pot, g_rot = active * torch.rand_like(active).add(0.5), active * torch.rand_like(active).add(0.5)
    request = Request("flow_step", z.device, z.dtype, requires_grad=True)
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


def _train_config(args):
    from .train import apply_overrides, preset

    config = preset(args.preset)
    overrides = list(args.set or [])
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    if args.model is not None:
        overrides.append(f"model.model={json.dumps(args.model)}")
    if args.dataset is not None:
        overrides.append(f"dataset={json.dumps(args.dataset)}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.precision is not None:
        overrides.append(f"precision={json.dumps(args.precision)}")
    if args.compile:
        overrides.append("compile=true")
    return apply_overrides(config, overrides).validate()


def _default_out(config) -> str:
    return os.path.join("runs", f"{config.model.model}-{config.dataset}-{config.preset}")


def _train(args) -> int:
    from .train import train

    config = _train_config(args)
    out = args.out or _default_out(config)
    stored = os.path.join(out, "config.json")
    if os.path.exists(stored) and not args.resume:
        raise _CLIError(f"{out!r} already holds a run; pass --resume to continue it or choose another --out")
    if args.resume and os.path.exists(stored):
        # the run's own config, not the (default) preset's: its steps would silently extend the run
        from .train import read_config

        config = read_config(stored)
        if args.steps is not None:
            config.steps = args.steps
        config.validate()
        update = _resume_update(config, args.set or [])
    else:
        update = None
    if int(os.environ.get("RANK", "0")) == 0:  # at the start: the run can be watched (metrics.jsonl)
        print(f"run directory: {out}", flush=True)
    train(config, out, resume=args.resume, progress=not args.quiet, update=update)
    return 0


def _resume_update(stored, overrides: list) -> dict:
    """The ``--set`` entries of a ``--resume`` as ``train(update=...)``: only RESUME_KEYS may change."""
    from .train import RESUME_KEYS, apply_overrides

    old, new = stored.to_dict(), apply_overrides(stored, overrides).to_dict()
    changed = sorted(k for k in new if new[k] != old[k])
    refused = [k for k in changed if k not in RESUME_KEYS]
    if refused:
        raise _CLIError(f"--set: {refused} cannot change when resuming a run; allowed: {list(RESUME_KEYS)}")
    return {k: new[k] for k in changed}


def _evaluate(args) -> int:
    from .evaluate import evaluate, format_table

    result = evaluate(args.run_dir, iw_samples=args.iw_samples, progress=not args.quiet)
    print(format_table(result))
    print(f"wrote {os.path.join(args.run_dir, 'eval.json')}")
    return 0


def _plot(args) -> int:
    from .plots import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def _run(args) -> int:
    args.resume = False
    _train(args)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    out = args.out or _default_out(_train_config(args))
    args.run_dir, args.iw_samples = out, 64
    _evaluate(args)
    return _plot(args)


class _CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _add_train_arguments(parser) -> None:
    parser.add_argument("--preset", default="quick", help="named configuration: quick (default), paper, tiny")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides the preset)")
    parser.add_argument("--out", default=None, help="run directory (default runs/MODEL-DATASET-PRESET)")
    parser.add_argument("--model", default=None,
                        help="a model kind (sta.models.MODELS): sta (default), static, linear, dense, betavae, slowvae")
    parser.add_argument("--dataset", default=None, help="digits (default), shapes, sprites or mnist")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="fp32 (default) or bf16: the conv networks under bf16 autocast, the flow in float32")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the ELBO (minutes of compiling first; see TrainConfig.compile)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override any config entry, e.g. --set model.latent=8 --set batch_size=16")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


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
    train = sub.add_parser("train", help="train a model into a run directory")
    _add_train_arguments(train)
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.set_defaults(run=_train)
    evaluate = sub.add_parser("evaluate", help="metrics of a run -> RUN_DIR/eval.json")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--iw-samples", type=int, default=64, help="samples of the importance-weighted bound")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(run=_evaluate)
    plot = sub.add_parser("plot", help="figures of a run -> RUN_DIR/plots/")
    plot.add_argument("run_dir")
    plot.set_defaults(run=_plot)
    run = sub.add_parser("run", help="train + evaluate + plot (default preset)")
    _add_train_arguments(run)
    run.set_defaults(run=_run)
    args = parser.parse_args(argv)
    from .data import MissingExtraError
    from .train import ConfigError, TrainingDiverged

    try:
        return args.run(args)
    except TrainingDiverged as err:
        print(f"sta {args.command}: error: {err}", file=sys.stderr)
        return 1
    except (_CLIError, ConfigError, MissingExtraError) as err:
        print(f"sta {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
