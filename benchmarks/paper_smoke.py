"""Smoke run of the ``paper`` preset at the authors' network sizes on ``mnist``: does it train, how
long is a step, how much memory does it take.

The paper preset unchanged (arch "authors", D 324, K 3, T 8, Adam 1e-4, warm-up and schedules
over ``--steps``) except the batch (``--batch``, the paper's is 128) and the number of generated
sequences (``--sequences``, enough for one pass: no batch seen twice). One torch thread.

    python benchmarks/paper_smoke.py                       # 200 steps, batch 4
    python benchmarks/paper_smoke.py --report RUN_DIR      # rewrite the table from a run's metrics

Writes ``benchmarks/results/paper_smoke_mnist.md``: parameter counts, the loss and ELBO terms over
the run (first / last 20 steps averaged), wall seconds per step (from metrics.jsonl, the whole
step), CPU seconds per step (process time of training minus that of building the data and model
once beforehand), peak resident memory (``resource.getrusage``), machine, load and git sha.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import REPO_ROOT, provenance  # noqa: E402

OUT = os.path.join(REPO_ROOT, "benchmarks", "results", "paper_smoke_mnist.md")
TERMS = ("loss", "nelbo", "recon", "kl_z0", "kl_path", "kl_spike", "kl_slab", "hj")


def _config(steps: int, batch: int, sequences: int):
    from sta.train import preset

    config = preset("paper")
    config.steps, config.batch_size, config.num_sequences = steps, batch, sequences
    config.eval_sequences, config.log_every, config.checkpoint_every = 16, 1, steps
    return config.validate()


def _summary(metrics: list, window: int = 20) -> list:
    first, last = metrics[:window], metrics[-window:]
    rows = []
    for term in TERMS:
        a, b = statistics.fmean(m[term] for m in first), statistics.fmean(m[term] for m in last)
        rows.append(f"| {term} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
    return rows


def report(run_dir: str, measured: dict) -> str:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    steps = len(metrics)
    wall = [b["time"] - a["time"] for a, b in zip(metrics, metrics[1:])]
    window = min(20, max(steps // 4, 1))
    lines = [
        "# `paper` preset smoke run on `mnist` (the authors' network sizes)",
        "",
        f"`python benchmarks/paper_smoke.py --steps {measured.get('steps', steps)} --batch {config['batch_size']} "
        f"--sequences {config['num_sequences']}` (one torch thread).",
        "",
        f"- machine: {measured.get('machine', '?')}; load average at the start {measured.get('load', '?')} "
        "(other jobs shared the cores: wall time is a multiple of CPU time)",
        f"- git sha {measured.get('git_sha', '?')}, torch {measured.get('torch', '?')}, {measured.get('date', '?')}",
        f"- config: dataset {config['dataset']}, arch {config['model']['arch']}, latent {config['model']['latent']}, "
        f"K {config['model']['num_fields']}, hidden {config['model']['hidden']}, posterior width "
        f"{config['model']['conv']}, T {config['T']}, batch {config['batch_size']} (the paper's: 128), "
        f"lr {config['lr']}, kl_warmup {config['kl_warmup']}, slab_start {config['slab_start']} of {steps} steps",
        f"- parameters: {measured.get('parameters', '?')}",
        f"- steps run: {steps}; skipped (non-finite): {sum(bool(m.get('skipped')) for m in metrics)}",
        f"- wall seconds per step: median {statistics.median(wall):.2f} (p10 "
        f"{sorted(wall)[len(wall) // 10]:.2f}, p90 {sorted(wall)[9 * len(wall) // 10]:.2f})" if wall else "",
        f"- CPU seconds per step: {measured['cpu_per_step']:.2f} (process time of `train()` minus building the data "
        "and model once; it includes the checkpoints at step 0 and at the end and the per-step finite checks)"
        if "cpu_per_step" in measured else "- CPU seconds per step: not measured (report from a run's metrics)",
        f"- peak resident memory: {measured['peak_rss_mb']:.0f} MB (ru_maxrss, whole process)"
        if "peak_rss_mb" in measured else "- peak resident memory: not measured",
        "",
        f"Mean of the first and last {window} steps (nats per sequence; `loss` is what is minimised, with the KL",
        "warm-up weight, `nelbo` the unweighted bound):",
        "",
        f"| term | first {window} | last {window} | change |",
        "|---|---|---|---|",
        *_summary(metrics, window),
        "",
        f"A smoke test, not a result: {steps} steps at batch {config['batch_size']} are "
        f"{steps * config['batch_size']:,} sequences, {steps * config['batch_size'] / 12.8e6:.3%} of the paper's",
        "100k steps at batch 128; no metric of the trained model is claimed. The run used the working tree",
        "of the git sha above (``-dirty``: uncommitted changes of parallel work were present).",
        "",
    ]
    return "\n".join(line for line in lines if line is not None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--sequences", type=int, default=None, help="default: steps * batch")
    parser.add_argument("--report", default=None, metavar="RUN_DIR", help="only rewrite the table from RUN_DIR")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.report:
        text = report(args.report, {})
    else:
        from sta.models import STAModel
        from sta.models.nets_authors import parameter_counts
        from sta.train import load_data, train

        config = _config(args.steps, args.batch, args.sequences or args.steps * args.batch)
        measured = provenance(torch.device("cpu"))
        measured["load"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
        measured["steps"] = args.steps
        # the data and the model once, to subtract their CPU time from the training call's
        t0 = time.process_time()
        _, ds = load_data(config, "train")
        model = STAModel(replace(config.model, channels=ds.channels, image_size=ds.image_size, transitions=ds.T))
        counts = parameter_counts(model)
        setup = time.process_time() - t0
        del model
        measured["parameters"] = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items())
        run_dir = tempfile.mkdtemp(prefix="paper_smoke_")
        t0 = time.process_time()
        train(config, run_dir, progress=sys.stderr.isatty())
        measured["cpu_per_step"] = (time.process_time() - t0 - setup) / args.steps
        measured["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        text = report(run_dir, measured)
        print(f"run directory: {run_dir}", file=sys.stderr)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
