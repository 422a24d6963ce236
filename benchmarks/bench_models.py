"""Compare the four models of SPEC 7 (sta, static, linear, dense) on one dataset.

Trains each model with the same preset and seed, evaluates it (sta.evaluate) and writes one row
per model, with the machine, versions, git sha and run times, to
benchmarks/results/models_<dataset>.csv and a Markdown table models_<dataset>.md.

    python benchmarks/bench_models.py                       # quick preset, digits, all four models
    python benchmarks/bench_models.py --steps 200 --models sta static   # a shorter look

Run directories go to --runs (default runs/bench-<dataset>-<preset>); rerunning retrains.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from _harness import cpu_model, git_sha  # noqa: E402
from sta.evaluate import evaluate  # noqa: E402
from sta.model import MODELS  # noqa: E402
from sta.train import apply_overrides, preset, train  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=None, help="directory for the run directories")
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)

    runs = args.runs or os.path.join(ROOT, "runs", f"bench-{args.dataset}-{args.preset}")
    machine = f"{cpu_model()}, {torch.get_num_threads()} threads"
    rows = []
    for name in args.models:
        overrides = [f'model.model="{name}"', f'dataset="{args.dataset}"', f"seed={args.seed}"]
        if args.steps is not None:
            overrides.append(f"steps={args.steps}")
        config = apply_overrides(preset(args.preset), overrides)
        out = os.path.join(runs, name)
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        train(config, out, progress=True)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        result = evaluate(out)
        eval_s = time.perf_counter() - start
        per = result["equivariance_error_per_transformation"]
        row = {
            "model": name,
            "dataset": args.dataset,
            "preset": args.preset,
            "steps": result["step"],
            "test_sequences": result["test_sequences"],
            "nelbo_per_sequence": round(result["nelbo_per_sequence"], 2),
            "nelbo_per_frame": round(result["nelbo_per_frame"], 2),
            "nll_x0_iw": round(result["nll_x0_iw"], 2),
            "equivariance_error": round(result["equivariance_error"], 5),
            **{f"equivariance_{k}": round(v, 5) for k, v in per.items()},
            "identification_accuracy": None if result["identification_accuracy"] is None
            else round(result["identification_accuracy"], 4),
            "identification_chance": round(result["identification_chance"], 4),
            "identification_f1": None if result["identification_f1"] is None else round(result["identification_f1"], 4),
            "train_s": round(train_s, 1),
            "eval_s": round(eval_s, 1),
            "machine": machine,
            "torch": torch.__version__,
            "git": git_sha(),
        }
        rows.append(row)
        print({k: row[k] for k in ("model", "nelbo_per_sequence", "equivariance_error", "identification_accuracy",
                                   "train_s")}, flush=True)

    os.makedirs(args.results, exist_ok=True)
    base = os.path.join(args.results, f"models_{args.dataset}")
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(base + ".md", "w") as f:
        f.write(_markdown(rows, args))
    print(open(base + ".md").read())
    return 0


def _markdown(rows, args) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v}"

    r0 = rows[0]
    lines = [
        f"Models on `{args.dataset}`, preset `{args.preset}` ({r0['steps']} steps, seed {args.seed}), "
        f"{r0['test_sequences']} test sequences. Machine: {r0['machine']}; torch {r0['torch']}; git {r0['git']}.",
        f"Command: `python benchmarks/bench_models.py --dataset {args.dataset} --preset {args.preset}"
        + (f" --steps {args.steps}" if args.steps else "") + "`",
        "",
        "| model | -ELBO / sequence (nats) | -ELBO / frame | -IW log p(x0) | equivariance L1 | "
        f"identification acc. (chance {r0['identification_chance']:.2f}) | F1 (combinations) | train time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['nelbo_per_sequence']} | {r['nelbo_per_frame']} | {r['nll_x0_iw']} | "
                     f"{r['equivariance_error']} | {fmt(r['identification_accuracy'])} | "
                     f"{fmt(r['identification_f1'])} | {r['train_s']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
