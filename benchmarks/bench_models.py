"""Compare the models of docs/maths.md 6 (every kind in sta.models.MODELS) on one dataset, over several seeds.

Trains each model with the same preset for every seed, evaluates it (sta.evaluate) and writes one
row per (model, seed), with the machine, versions, git sha and run times, to
benchmarks/results/models_<dataset>.csv, and a Markdown summary (mean, sd and a 95% bootstrap
interval per metric, every seed's equivariance error and identification accuracy, and paired per-seed
comparisons of sta with each baseline) to models_<dataset>.md. Both are rewritten after every
finished run, seeds in order (all models' seed 0 first), so a bench cut short still compares every
model on the seeds it finished.

    python benchmarks/bench_models.py                       # quick preset, digits, 6 models x 3 seeds
    python benchmarks/bench_models.py --seeds 0 --steps 200 --models sta static   # a shorter look
    python benchmarks/bench_models.py --dataset mnist --seeds 0 1 2 3 4 --resume  # continue a cut-short bench
    python benchmarks/bench_models.py --summarize benchmarks/results/models_digits.csv   # rebuild the .md
    python benchmarks/bench_models.py --models sta --variant "floor=model.spike_floor=0.01" \
        --name spike_floor_digits       # an ablation: sta against sta with one setting changed

``--set KEY=VALUE`` (repeatable) applies a ``sta train --set`` override to every run (e.g.
``--set model.spike_floor=0`` reproduces the tables made before that default changed).
A variant (``--variant LABEL=KEY=VALUE[;KEY=VALUE...]``, repeatable) is a model of its own in the
tables, named LABEL: sta (or the kind its overrides set with ``model.model=...``) trained with the
``sta train --set`` overrides given, on the same seeds, and compared per seed with plain sta.

Runs go two at a time by default (``--jobs 2``, one torch thread each): on 2 CPU cores that is
about 1.7x the throughput of one run with two threads. Run directories go to --runs (default
runs/bench-<dataset>-<preset>/<model>-s<seed>); rerunning retrains, except with ``--resume``, which
reuses every finished run of the same configuration (its ``bench.json``) and continues an unfinished
one from its last checkpoint (``sta train --resume``; written every ``checkpoint_every`` steps), so a
bench that was stopped loses at most the steps since each run's last checkpoint.
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _harness import cpu_model, git_sha  # noqa: E402
from sta.evaluate import evaluate  # noqa: E402
from sta.model import MODELS  # noqa: E402
from sta.train import apply_overrides, preset, train  # noqa: E402

#: Slowest first, so that the last run to finish is a short one (quick preset on 2 vCPUs, two runs
#: at a time with one thread each, mean train time: dense 286 s, sta 283, linear 245, static 241;
#: slowvae encodes every frame, betavae costs what static does). Kinds not listed go last.
_ORDER = ("dense", "sta", "linear", "slowvae", "static", "betavae")


def result_row(name: str, seed: int, dataset: str, preset_name: str, result: dict, train_s: float, eval_s: float,
               threads: int, overrides: tuple = (), evaluated=None, common: tuple = ()) -> dict:
    """The CSV row of one finished run from its evaluation (``sta.evaluate`` result / eval.json);
    ``overrides``: a variant's ``--set`` overrides, ``common``: the ``--set`` overrides of every
    run, ``evaluated``: the run's mean fraction of evaluated flow pairs (1 for kinds without fields)."""
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
        "pairs_evaluated": rounded(evaluated, 4),
        "overrides": ";".join(overrides),
        "set": ";".join(common),
    }
    return row


def mean_logged(run_dir: str, key: str) -> Optional[float]:
    """The mean of ``key`` over a run's logged steps (metrics.jsonl), None when it is never logged."""
    values = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            value = json.loads(line).get(key)
            if value is not None:
                values.append(value)
    return statistics.mean(values) if values else None


def variant_overrides(rows: list) -> dict:
    """``{variant label: its overrides}`` of the result rows (plain kinds have none)."""
    return {r["model"]: r["overrides"] for r in rows if r.get("overrides")}


def parse_variant(text: str) -> tuple:
    """``"LABEL=KEY=VALUE;KEY=VALUE"`` -> ``(LABEL, (KEY=VALUE, ...))`` (ValueError naming --variant)."""
    label, sep, rest = text.partition("=")
    overrides = tuple(item.strip() for item in rest.split(";") if item.strip())
    if not sep or not label or not overrides or not all("=" in o for o in overrides):
        raise ValueError(f"--variant: expected LABEL=KEY=VALUE[;KEY=VALUE...], got {text!r}")
    if label in MODELS or not label.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"--variant: the label {label!r} must be a new name of letters, digits, '-', '_', '.'")
    return label, overrides


def _read_json(path: str):
    """The JSON in ``path``, or None when there is no such file."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def run_one(name: str, seed: int, dataset: str, preset_name: str, steps, runs: str, threads: int,
            resume: bool = False, variant: tuple = (), common: tuple = ()) -> dict:
    """Train and evaluate one (model, seed); returns its CSV row. ``name`` is a kind, or a variant's
    label with its overrides in ``variant`` (applied last, on top of kind sta). With ``resume``, a
    run directory that already holds a finished run of the same configuration (its ``bench.json``)
    is reused. ``common``: ``--set`` overrides of every run, applied before the variant's."""
    torch.set_num_threads(threads)
    kind = "sta" if variant else name
    overrides = [f'model.model="{kind}"', f'dataset="{dataset}"', f"seed={seed}", f"threads={threads}"]
    if steps is not None:
        overrides.append(f"steps={steps}")
    overrides += list(common) + list(variant)
    config = apply_overrides(preset(preset_name), overrides)
    out = os.path.join(runs, f"{name}-s{seed}")
    done = os.path.join(out, "bench.json")
    requested = json.loads(json.dumps(asdict(config)))  # before train() fills in the dataset's sizes
    finished = _read_json(done) if resume else None
    if finished is not None and finished["config"] == requested:
        print(f"reusing {out}", flush=True)
        return finished["row"]
    request = os.path.join(out, "bench_request.json")  # what this run directory was started for
    checkpoint = os.path.join(out, "checkpoints", "last.pt")
    earlier_s = 0.0
    continuing = resume and os.path.exists(checkpoint) and _read_json(request) == requested
    if continuing:
        earlier_s = float(torch.load(checkpoint, map_location="cpu", weights_only=False).get("elapsed") or 0.0)
        print(f"continuing {out} from its last checkpoint", flush=True)
    else:
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        with open(request, "w") as f:
            json.dump(requested, f)
    start = time.perf_counter()
    train(config, out, resume=continuing, progress=False)
    train_s = earlier_s + time.perf_counter() - start
    start = time.perf_counter()
    result = evaluate(out)
    eval_s = time.perf_counter() - start
    row = dict(result_row(name, seed, dataset, preset_name, result, train_s, eval_s, threads, variant,
                          mean_logged(out, "evaluated"), common), git=git_sha())
    print({k: row[k] for k in ("model", "seed", "equivariance_error", "identification_accuracy", "train_s")},
          flush=True)
    with open(done + ".tmp", "w") as f:
        json.dump({"config": requested, "row": row}, f)
    os.replace(done + ".tmp", done)
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
    parser.add_argument("--resume", action="store_true",
                        help="reuse the finished runs in --runs (same configuration) instead of retraining them")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="common",
                        help="a `sta train --set` override for every run (repeatable)")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=KEY=VALUE[;KEY=VALUE]",
                        help="also train sta with these `sta train --set` overrides, as model LABEL (repeatable)")
    parser.add_argument("--name", default=None,
                        help="results file name without extension (default models_<dataset>)")
    parser.add_argument("--summarize", metavar="CSV", default=None,
                        help="only write the Markdown summary of an existing results CSV (next to it), no training")
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize, os.path.splitext(args.summarize)[0] + ".md"))
        return 0
    if args.jobs < 1:
        parser.error(f"--jobs: expected >= 1, got {args.jobs}")
    try:
        variants = dict(parse_variant(v) for v in args.variant)
    except ValueError as err:
        parser.error(str(err))
    bad = [o for o in args.common if "=" not in o]
    if bad:
        parser.error(f"--set: expected KEY=VALUE, got {bad[0]!r}")
    names = list(args.models) + list(variants)

    runs = args.runs or os.path.join(ROOT, "runs", f"bench-{args.dataset}-{args.preset}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // args.jobs)
    # Seed-major: every model's seed 0 first, so that a bench cut short still compares all models;
    # within a seed, slowest first. Results are written after every finished run.
    tasks = sorted(((m, s) for m in names for s in args.seeds),
                   key=lambda task: (task[1], _ORDER.index(task[0]) if task[0] in _ORDER else len(_ORDER)))
    provenance = {"machine": f"{cpu_model()}, {cores} cores", "torch": torch.__version__, "git": git_sha(),
                  "jobs": args.jobs}
    os.makedirs(args.results, exist_ok=True)
    base = os.path.join(args.results, args.name or f"models_{args.dataset}")
    rows, start = [], time.perf_counter()

    def finished(row):
        # a reused run keeps the git sha it was trained at
        rows.append({**row, **{k: v for k, v in provenance.items() if k not in row}})
        rows.sort(key=lambda r: (names.index(r["model"]), r["seed"]))
        wall_s = round(time.perf_counter() - start, 1)
        with open(base + ".csv.tmp", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) + ["bench_wall_s"])
            writer.writeheader()
            writer.writerows({**r, "bench_wall_s": wall_s} for r in rows)
        os.replace(base + ".csv.tmp", base + ".csv")
        print(f"{len(rows)} of {len(tasks)} runs done ({wall_s / 60:.0f} min): {base}.csv", flush=True)

    arguments = [(m, s, args.dataset, args.preset, args.steps, runs, threads, args.resume, variants.get(m, ()),
                  tuple(args.common)) for m, s in tasks]
    if args.jobs == 1:
        for a in arguments:
            finished(run_one(*a))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
            for future in as_completed([pool.submit(run_one, *a) for a in arguments]):
                finished(future.result())
    print(summarize(base + ".csv", base + ".md"))
    return 0


#: Bootstrap resamples for the 95% intervals, and the generator seed (the intervals are reproducible).
_BOOT, _BOOT_SEED = 10000, 0
#: (column, label, lower is better) of the metrics the tables report.
METRICS = (("nelbo_per_sequence", "-ELBO / sequence (nats)", True), ("nll_x0_iw", "-IW log p(x0)", True),
           ("equivariance_error", "equivariance L1", True), ("identification_accuracy", "identification acc.", False),
           ("identification_f1", "F1 (combinations)", False))


def bootstrap_interval(values, level: float = 0.95) -> tuple:
    """Percentile bootstrap interval of the mean of ``values`` (one per seed): resample the seeds with
    replacement :data:`_BOOT` times. With 5 seeds it is a rough interval (it cannot be wider than the
    values' range), so the tables also give every seed's value."""
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(_BOOT_SEED)
    means = v[rng.integers(0, len(v), size=(_BOOT, len(v)))].mean(axis=1)
    return float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))


def _number(value) -> Optional[float]:
    """A CSV cell or a row value as a float; None for a metric that does not apply."""
    return None if value in (None, "") else float(value)


def _digits(values) -> int:
    return 4 if max(abs(v) for v in values) < 10 else 1


def _summary(values: list) -> str:
    """``mean ± sd [lo, hi]`` over seeds (95% bootstrap interval); "n/a" where the metric does not apply."""
    values = [v for v in map(_number, values) if v is not None]
    if not values:
        return "n/a"
    d = _digits(values)
    if len(values) == 1:
        return f"{values[0]:.{d}f}"
    lo, hi = bootstrap_interval(values)
    return f"{statistics.mean(values):.{d}f} ± {statistics.stdev(values):.{d}f} [{lo:.{d}f}, {hi:.{d}f}]"


#: Two-sided 95% quantiles of Student's t by degrees of freedom (1.96 beyond 30): the paired t
#: interval is the conservative companion of the bootstrap one at 3-5 seeds.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t_interval(values) -> tuple:
    """Student-t 95% interval of the mean of ``values`` (at least 2)."""
    n = len(values)
    q = _T975.get(n - 1) or next((_T975[k] for k in sorted(_T975) if k >= n - 1), 1.96)
    half = q * statistics.stdev(values) / n ** 0.5
    m = statistics.mean(values)
    return m - half, m + half


def paired(rows: list, metric: str, model: str, other: str) -> Optional[dict]:
    """Per-seed comparison of ``model`` with ``other`` on ``metric``, over the seeds both have:
    the differences model - other, their mean, and 95% intervals of the mean difference (bootstrap
    and Student t; one seed: none)."""
    by = {(r["model"], int(r["seed"])): _number(r[metric]) for r in rows}
    seeds = sorted(s for (m, s) in by if m == model and by[m, s] is not None and by.get((other, s)) is not None)
    if not seeds:
        return None
    diff = [by[model, s] - by[other, s] for s in seeds]
    out = {"seeds": seeds, "diff": diff, "mean": statistics.mean(diff)}
    if len(diff) > 1:
        out["boot"], out["t"] = bootstrap_interval(diff), t_interval(diff)
    return out


def verdict(rows: list, metric: str, label: str, lower_is_better: bool, model: str, other: str) -> str:
    """One line that says only what the per-seed values and the intervals support: a difference is
    called supported when both paired intervals (bootstrap and t) exclude 0."""
    p = paired(rows, metric, model, other)
    if p is None:
        return ""
    n, d = len(p["seeds"]), _digits(p["diff"] + [1e-9])
    better = sum((x < 0) == lower_is_better and x != 0 for x in p["diff"])
    side = "lower" if p["mean"] < 0 else "higher"
    text = (f"{label}, {model} vs {other}: {model} {side} by {abs(p['mean']):.{d}f} on average "
            f"({model} - {other} per seed: {', '.join(f'{x:+.{d}f}' for x in p['diff'])}); better on {better} of {n} seed(s)")
    if n < 2:
        return text + "; one seed, no interval."
    (b_lo, b_hi), (t_lo, t_hi) = p["boot"], p["t"]
    text += f"; paired 95% intervals: bootstrap [{b_lo:+.{d}f}, {b_hi:+.{d}f}], t [{t_lo:+.{d}f}, {t_hi:+.{d}f}]"
    vals = {m: [_number(r[metric]) for r in rows if r["model"] == m and int(r["seed"]) in p["seeds"]] for m in (model, other)}
    (m_lo, m_hi), (o_lo, o_hi) = bootstrap_interval(vals[model]), bootstrap_interval(vals[other])
    apart = " (the models' bootstrap intervals do not overlap)" if (m_hi < o_lo or o_hi < m_lo) else ""
    if b_hi < 0 or b_lo > 0:
        if t_hi < 0 or t_lo > 0:
            return text + f". **Supported**: both intervals exclude 0{apart}."
        return text + f". Not supported: the t interval includes 0{apart}."
    return text + ". Not supported: the intervals include 0."


def markdown(rows: list, models: list, command: str, wall: str) -> str:
    """Mean ± sd [95% bootstrap interval] per model and metric, every seed's equivariance error and
    identification accuracy, and the paired comparisons of sta with each baseline."""
    r0 = rows[0]
    models = [m for m in models if any(r["model"] == m for r in rows)]
    seeds = sorted({int(r["seed"]) for r in rows})
    by = {(r["model"], int(r["seed"])): r for r in rows}
    threads = sorted({str(r["threads"]) for r in rows})
    lines = [
        f"Models on `{r0['dataset']}`, preset `{r0['preset']}` ({r0['steps']} steps), seeds {seeds}, "
        f"{r0['test_sequences']} test sequences. Machine: {r0['machine']}, {'/'.join(threads)} torch thread(s) per "
        f"run; torch {r0['torch']}; git {r0['git']}; {wall}.",
        f"Command: `{command}`",
        "",
        f"Mean ± sd [95% bootstrap interval of the mean, {_BOOT} resamples of the seeds] over {len(seeds)} seed(s):",
        "",
        "| model | " + " | ".join(label + (f" (chance {float(r0['identification_chance']):.2f})"
                                            if key == "identification_accuracy" else "")
                                   for key, label, _ in METRICS) + " | train time (s) | pairs evaluated |",
        "|---|" + "---:|" * (len(METRICS) + 2),
    ]
    for m in models:
        col = lambda key: [by[m, s].get(key) for s in seeds if (m, s) in by]  # noqa: E731 (older CSVs lack columns)
        lines.append(f"| {m} | " + " | ".join(_summary(col(key)) for key, _, _ in METRICS)
                     + f" | {_summary(col('train_s')).split(' [')[0]} | {_summary(col('pairs_evaluated')).split(' [')[0]} |")
    variants = variant_overrides(rows)
    if variants:
        lines += ["", "Variants (sta with `sta train --set` overrides): "
                  + "; ".join(f"`{m}`: `{o}`" for m, o in variants.items()) + "."]
    for key, label in (("equivariance_error", "Equivariance L1 per seed (lower is better)"),
                       ("identification_accuracy", "Identification accuracy per seed")):
        lines += ["", label + ":", "", "| model | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---|" + "---:|" * len(seeds)]
        for m in models:
            cells = [_number(by[m, s][key]) if (m, s) in by else None for s in seeds]
            if all(c is None for c in cells):
                continue
            lines.append(f"| {m} | " + " | ".join("n/a" if c is None else f"{c:.4f}" for c in cells) + " |")
    if "sta" in models:
        lines += ["", "Paired per-seed comparisons (sta - baseline; the verdict states only what the intervals support):", ""]
        for key, label, lower in METRICS[:1] + METRICS[2:4]:
            for other in models:  # -ELBO paired only against variants (the ablations are about it)
                if other != "sta" and (key != METRICS[0][0] or other in variants):
                    text = verdict(rows, key, label, lower, "sta", other)
                    if text:
                        lines.append("- " + text)
    return "\n".join(lines) + "\n"


def summarize(csv_path: str, out_md: str) -> str:
    """Write the Markdown summary of an existing results CSV (no training); returns it."""
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"--summarize: {csv_path} has no rows")
    models = list(dict.fromkeys([m for m in MODELS if any(r["model"] == m for r in rows)]
                                + [r["model"] for r in rows]))
    seeds = sorted({int(r["seed"]) for r in rows})
    r0 = rows[0]
    variants = variant_overrides(rows)
    kinds = [m for m in models if m not in variants]
    cmd = (f"python benchmarks/bench_models.py --dataset {r0['dataset']} --preset {r0['preset']} "
           f"--models {' '.join(kinds)} --seeds {' '.join(map(str, seeds))}"
           + "".join(f" --set {o}" for o in (r0.get("set") or "").split(";") if o)
           + "".join(f' --variant "{m}={o}"' for m, o in variants.items())
           + (f" --name {os.path.splitext(os.path.basename(csv_path))[0]}"
              if os.path.basename(csv_path) != f"models_{r0['dataset']}.csv" else "")
           + (f" --jobs {r0['jobs']}" if r0.get("jobs") else ""))
    if "bench_wall_s" in r0 and r0["bench_wall_s"]:
        wall = f"wall time {float(r0['bench_wall_s']) / 60:.0f} min"
    else:
        total = sum(float(r["train_s"]) + float(r["eval_s"]) for r in rows)
        wall = f"{total / 60:.0f} min of train + eval time over {len(rows)} runs"
    text = markdown(rows, models, cmd, wall)
    with open(out_md, "w") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
