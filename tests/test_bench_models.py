"""benchmarks/bench_models.py end to end on the tiny preset: rows per (model, seed), the summary."""
import csv
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("jobs", [1, 2])
def test_bench_models_writes_a_row_per_model_and_seed(tmp_path, jobs):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("STA_BACKEND", None)
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "bench_models.py"), "--preset", "tiny", "--steps", "3",
           "--models", "sta", "static", "linear", "--seeds", "0", "1", "--jobs", str(jobs),
           "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "results" / "models_digits.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["seed"]) for r in rows] == [(m, s) for m in ("sta", "static", "linear") for s in ("0", "1")]
    for r in rows:
        assert r["steps"] == "3" and float(r["equivariance_error"]) > 0 and r["git"] and r["machine"]
        assert (r["identification_accuracy"] == "") == (r["model"] == "static")
        assert os.path.exists(tmp_path / "runs" / f"{r['model']}-s{r['seed']}" / "eval.json")
    md = (tmp_path / "results" / "models_digits.md").read_text()
    for m in ("sta", "static", "linear"):
        assert f"| {m} | " in md
    assert " ± " in md  # two seeds: mean ± sd
    sta = {r["seed"]: float(r["equivariance_error"]) for r in rows if r["model"] == "sta"}
    lin = {r["seed"]: float(r["equivariance_error"]) for r in rows if r["model"] == "linear"}
    wins = sum(sta[s] < lin[s] for s in sta)
    assert f"sta has a lower equivariance error than linear on {wins} of 2 seed(s)." in md


def test_bench_models_rejects_bad_jobs(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_models.py"), "--jobs", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--jobs: expected >= 1" in proc.stderr
