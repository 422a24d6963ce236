"""How much gradient sparse training drops: ``ModelConfig.spike_floor`` over one training run.

A relaxed spike below the floor becomes an exact zero in the flow's coefficients, so its
(sample, transition, field) pair is not evaluated and that spike gets no reconstruction gradient.
This script trains one run with the floor (the ``quick`` preset by default), keeps a copy of every
periodic checkpoint, and at each takes a few training batches and computes the gradient of the
training loss twice with the same batch and the same noise: with the floor, and with
``spike_floor = 0`` (every pair evaluated). It reports, per checkpoint:

* the fraction of pairs skipped (coefficient exactly 0 with the floor),
* ``lost = |grad_0 - grad_floor| / |grad_0|`` over all parameters (L2 norms), and over the
  posterior network's and the fields' parameters alone (what the skipped pairs' gradient reaches
  first: the spikes come from the posterior, the skipped pairs are field evaluations),
* the cosine between the two gradients.

Only ``checkpoint_every`` differs from ``sta train --set model.spike_floor=F``; it does not change
the run (checkpoints read the RNG state, they do not draw from it). Results go to
benchmarks/results/spike_floor_gradient_<dataset>.md.

    python benchmarks/spike_floor_gradient.py --floor 0.01 --seed 0           # digits, quick preset
    python benchmarks/spike_floor_gradient.py --floor 0.01 --steps 200 --every 50  # a short look
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import shutil
import sys
import time
from dataclasses import replace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from _harness import cpu_model, git_sha  # noqa: E402
import sta.train.loop as loop  # noqa: E402
from sta.train import apply_overrides, load_run, preset, train  # noqa: E402
from sta.train.checkpoints import load_checkpoint  # noqa: E402
from sta.train.loop import batch_indices, load_data, schedules  # noqa: E402


def train_keeping_checkpoints(config, run_dir: str) -> list:
    """Train ``config`` into ``run_dir``, keeping a copy of every checkpoint; returns their paths."""
    save = loop.save_atomic

    def save_and_keep(obj, path):
        save(obj, path)
        shutil.copyfile(path, os.path.join(os.path.dirname(path), f"step-{obj['step']:06d}.pt"))

    loop.save_atomic = save_and_keep
    try:
        train(config, run_dir, progress=False)
    finally:
        loop.save_atomic = save
    return sorted(glob.glob(os.path.join(run_dir, "checkpoints", "step-*.pt")))


def gradients(model, x, schedule, floor: float, noise_seed: int) -> tuple[dict, float]:
    """``({parameter name: gradient}, fraction of pairs evaluated)`` of the training loss at ``x``
    with ``spike_floor = floor`` and the noise of ``noise_seed``."""
    model.config = replace(model.config, spike_floor=floor)
    model.zero_grad(set_to_none=True)
    terms = model.elbo(x, temperature=schedule.temperature, slab=schedule.slab, kl_weight=schedule.kl_weight,
                       generator=torch.Generator().manual_seed(noise_seed))
    terms.loss.backward()
    grads = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
             for n, p in model.named_parameters()}
    return grads, float(terms.evaluated)


def compare(run_dir: str, checkpoint: str, floor: float, batches: int) -> dict:
    """The gradient with and without the floor at one checkpoint of the run, over ``batches`` batches."""
    config, model, _ = load_run(run_dir)
    ckpt = load_checkpoint(checkpoint)
    model.load_state_dict(ckpt["model"])
    step = ckpt["step"]
    model.train()
    x_all, _ = load_data(config, "train")
    schedule = schedules(config, step)
    lost, lost_posterior, lost_fields, cosine, evaluated = [], [], [], [], []
    for i in range(batches):
        x = x_all[batch_indices(step + i, x_all.shape[0], config.batch_size, config.seed)]
        full, _ = gradients(model, x, schedule, 0.0, noise_seed=1000 + i)
        sparse, frac = gradients(model, x, schedule, floor, noise_seed=1000 + i)

        def norm(names, grads):
            return math.sqrt(sum(float(grads[n].square().sum()) for n in names))

        names = list(full)
        diff = {n: full[n] - sparse[n] for n in names}
        posterior = [n for n in names if n.startswith("posterior.")]
        fields = [n for n in names if n.startswith("fields.")]
        lost.append(norm(names, diff) / max(norm(names, full), 1e-30))
        lost_posterior.append(norm(posterior, diff) / max(norm(posterior, full), 1e-30))
        lost_fields.append(norm(fields, diff) / max(norm(fields, full), 1e-30))
        dot = sum(float((full[n] * sparse[n]).sum()) for n in names)
        cosine.append(dot / max(norm(names, full) * norm(names, sparse), 1e-30))
        evaluated.append(frac)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"step": step, "skipped": 1.0 - mean(evaluated), "lost": mean(lost),
            "lost_posterior": mean(lost_posterior), "lost_fields": mean(lost_fields), "cosine": mean(cosine),
            "lost_max": max(lost)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--floor", type=float, default=0.01, help="model.spike_floor of the run")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--every", type=int, default=250, help="steps between measured checkpoints")
    parser.add_argument("--batches", type=int, default=4, help="training batches per checkpoint")
    parser.add_argument("--run", default=None, help="run directory (default runs/spike-floor-<dataset>-s<seed>)")
    parser.add_argument("--out", default=None, help="Markdown file (default benchmarks/results/spike_floor_gradient_<dataset>.md)")
    args = parser.parse_args(argv)
    if not 0.0 < args.floor < 1.0:
        parser.error(f"--floor: expected a float in (0, 1), got {args.floor}")
    if args.every < 1 or args.batches < 1:
        parser.error("--every and --batches: expected >= 1")

    overrides = [f'dataset="{args.dataset}"', f"seed={args.seed}", f"model.spike_floor={args.floor}", "threads=1"]
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    config = apply_overrides(preset(args.preset), overrides + [f"checkpoint_every={args.every}"])
    run_dir = args.run or os.path.join(os.path.dirname(HERE), "runs", f"spike-floor-{args.dataset}-s{args.seed}")
    shutil.rmtree(run_dir, ignore_errors=True)
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = []
    for checkpoint in train_keeping_checkpoints(config, run_dir):
        row = compare(run_dir, checkpoint, args.floor, args.batches)
        rows.append(row)
        print(f"step {row['step']:5d}: skipped {row['skipped']:.3f}, gradient lost {row['lost']:.4f} "
              f"(posterior {row['lost_posterior']:.4f}, fields {row['lost_fields']:.4f}, max {row['lost_max']:.4f}), "
              f"cosine {row['cosine']:.5f}", flush=True)
    out = args.out or os.path.join(HERE, "results", f"spike_floor_gradient_{args.dataset}.md")
    lines = [
        f"# Gradient dropped by `spike_floor = {args.floor}` over one run",
        "",
        f"`{args.dataset}`, preset `{args.preset}` ({config.steps} steps), seed {args.seed}, one torch thread; "
        f"{args.batches} training batches per checkpoint, the same batch and noise with and without the floor. "
        f"Machine: {cpu_model()}; torch {torch.__version__}; git {git_sha()}; {(time.perf_counter() - start) / 60:.0f} min.",
        f"Command: `python benchmarks/spike_floor_gradient.py --floor {args.floor} --dataset {args.dataset} "
        f"--preset {args.preset} --seed {args.seed} --every {args.every} --batches {args.batches}"
        + (f" --steps {args.steps}" if args.steps is not None else "") + "`",
        "",
        "lost = |grad(floor 0) - grad(floor)| / |grad(floor 0)| over all parameters (mean over the batches; "
        "max: the largest batch); posterior, fields: the same over those parameters; skipped: "
        "fraction of (sample, transition, field) pairs not evaluated.",
        "",
        "| step | pairs skipped | gradient lost | lost (max) | lost, posterior | lost, fields | cosine |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['step']} | {r['skipped']:.3f} | {r['lost']:.4f} | {r['lost_max']:.4f} | "
              f"{r['lost_posterior']:.4f} | {r['lost_fields']:.4f} | {r['cosine']:.5f} |" for r in rows]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
