"""Compare the models of docs/maths.md 6 (every kind in sta.models.MODELS) on one dataset, over several seeds.

Trains each model with the same preset for every seed, evaluates it (sta.evaluate) and writes one
row per (model, seed), with the machine, versions, git sha and run times, to
benchmarks/results/models_<dataset>.csv, and a Markdown summary (mean and spread over seeds, every
seed's equivariance error, and on how many seeds sta beats each baseline) to
models_<dataset>.md.

    python benchmarks/bench_models.py                       # quick preset, digits, 6 models x 3 seeds
    python benchmarks/bench_models.py --seeds 0 --steps 200 --models sta static   # a shorter look

Runs go two at a time by default (``--jobs 2``, one torch thread each): on 2 CPU cores that is
about 1.7x the throughput of one run with two threads. Run directories go to --runs (default
runs/bench-<dataset>-<preset>/<model>-s<seed>); rerunning retrains.
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from _harness import cpu_model, git_sha  # noqa: E402
from sta.evaluate import evaluate  # noqa: E402
from sta.model import MODELS  # noqa: E402
from sta.train import apply_overrides, preset, train  # noqa: E402

#: Slowest first, so that the last run to finish is a short one (quick preset on 2 vCPUs, two runs
#: at a time with one thread each, mean train time: dense 286 s, sta 283, linear 245, static 241;
#: slowvae encodes every frame, betavae costs what static does). Kinds not listed go last.
_ORDER = ("dense", "sta", "linear", "slowvae", "static", "betavae")


def run_one(name: str, seed: int, dataset: str, preset_name: str, steps, runs: str, threads: int) -> dict:
    """Train and evaluate one (model, seed); returns its CSV row."""
    torch.set_num_threads(threads)
    overrides = [f'model.model="{name}"', f'dataset="{dataset}"', f"seed={seed}"]
    if steps is not None:
        overrides.append(f"steps={steps}")
    config = apply_overrides(preset(preset_name), overrides)
    out = os.path.join(runs, f"{name}-s{seed}")
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    train(config, out, progress=False)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    result = evaluate(out)
    eval_s = time.perf_counter() - start
    per = result["equivariance_error_per_transformation"]

    def rounded(value, digits):
        return None if value is None else round(value, digits)

    row = {
        "model": name,
        "seed": seed,
        "dataset": dataset,
        "preset": preset_name,
        "steps": result["step"],
        "test_sequences": result["test_sequences"],
        "nelbo_per_sequence": round(result["nelbo_per_sequence"], 2),
        "nelbo_per_frame": round(result["nelbo_per_frame"], 2),
        "nll_x0_iw": round(result["nll_x0_iw"], 2),
        "equivariance_error": round(result["equivariance_error"], 5),
        **{f"equivariance_{k}": round(v, 5) for k, v in per.items()},
        "identification_accuracy": rounded(result["identification_accuracy"], 4),
        "identification_chance": round(result["identification_chance"], 4),
        "identification_f1": rounded(result["identification_f1"], 4),
        "train_s": round(train_s, 1),
        "eval_s": round(eval_s, 1),
        "threads": threads,
    }
    print({k: row[k] for k in ("model", "seed", "equivariance_error", "identification_accuracy", "train_s")},
          flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each gets cores // jobs threads)")
    parser.add_argument("--runs", default=None, help="directory for the run directories")
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs: expected >= 1, got {args.jobs}")

    runs = args.runs or os.path.join(ROOT, "runs", f"bench-{args.dataset}-{args.preset}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // args.jobs)
    tasks = sorted(((m, s) for m in args.models for s in args.seeds),
                   key=lambda task: (_ORDER.index(task[0]) if task[0] in _ORDER else len(_ORDER), task[1]))
    start = time.perf_counter()
    if args.jobs == 1:
        rows = [run_one(m, s, args.dataset, args.preset, args.steps, runs, threads) for m, s in tasks]
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
            futures = [pool.submit(run_one, m, s, args.dataset, args.preset, args.steps, runs, threads)
                       for m, s in tasks]
            rows = [f.result() for f in futures]
    wall_s = time.perf_counter() - start
    rows.sort(key=lambda r: (args.models.index(r["model"]), r["seed"]))
    provenance = {"machine": f"{cpu_model()}, {cores} cores", "torch": torch.__version__, "git": git_sha()}
    rows = [{**row, **provenance} for row in rows]

    os.makedirs(args.results, exist_ok=True)
    base = os.path.join(args.results, f"models_{args.dataset}")
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(base + ".md", "w") as f:
        f.write(markdown(rows, args, wall_s))
    print(open(base + ".md").read())
    return 0


def _summary(values: list) -> str:
    """``mean ± sd`` over seeds (``mean`` for one seed); "n/a" where the metric does not apply."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    digits = 4 if max(abs(v) for v in values) < 10 else 1
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown(rows: list, args, wall_s: float) -> str:
    """The summary table (mean ± sd over seeds), every seed's equivariance error, and the verdict."""
    r0 = rows[0]
    models = [m for m in args.models if any(r["model"] == m for r in rows)]
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["model"], r["seed"]): r for r in rows}
    command = (f"python benchmarks/bench_models.py --dataset {args.dataset} --preset {args.preset}"
               f" --seeds {' '.join(map(str, seeds))} --jobs {args.jobs}"
               + (f" --steps {args.steps}" if args.steps else ""))
    lines = [
        f"Models on `{args.dataset}`, preset `{args.preset}` ({r0['steps']} steps), seeds {seeds}, "
        f"{r0['test_sequences']} test sequences. Machine: {r0['machine']}, {args.jobs} runs at a time with "
        f"{r0['threads']} torch thread(s) each; torch {r0['torch']}; git {r0['git']}; wall time "
        f"{wall_s / 60:.0f} min.",
        f"Command: `{command}`",
        "",
        f"Mean ± sd over {len(seeds)} seed(s):",
        "",
        "| model | -ELBO / sequence (nats) | -IW log p(x0) | equivariance L1 | "
        f"identification acc. (chance {r0['identification_chance']:.2f}) | F1 (combinations) | train time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in models:
        col = lambda key: [by[m, s][key] for s in seeds if (m, s) in by]  # noqa: E731
        lines.append(f"| {m} | {_summary(col('nelbo_per_sequence'))} | {_summary(col('nll_x0_iw'))} | "
                     f"{_summary(col('equivariance_error'))} | {_summary(col('identification_accuracy'))} | "
                     f"{_summary(col('identification_f1'))} | {_summary(col('train_s'))} |")
    lines += ["", "Equivariance L1 per seed (lower is better):", "",
              "| model | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|" + "---:|" * len(seeds)]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(
            f"{by[m, s]['equivariance_error']:.4f}" if (m, s) in by else "n/a" for s in seeds) + " |")
    if "sta" in models:
        lines.append("")
        for other in models:
            if other == "sta":
                continue
            wins = [s for s in seeds if (other, s) in by and (("sta", s) in by)
                    and by["sta", s]["equivariance_error"] < by[other, s]["equivariance_error"]]
            lines.append(f"sta has a lower equivariance error than {other} on {len(wins)} of {len(seeds)} seed(s).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
