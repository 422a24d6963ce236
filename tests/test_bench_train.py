"""benchmarks/bench_train.py end to end on the smallest size: one row per variant, phases add up."""
import csv
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "bench_train.py")


@pytest.mark.slow
def test_bench_train_writes_rows_and_phase_split(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("STA_BACKEND", None)
    out = tmp_path / "train.csv"
    proc = subprocess.run([sys.executable, SCRIPT, "--sizes", "paper", "--batches", "2", "--reps", "1",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["backend"]) for r in rows] == [("reference", "torch"), ("fast", "auto")]
    for r in rows:
        total = float(r["s_per_iter"])
        phases = sum(float(r[f"{p}_s"]) for p in ("encoder", "posterior", "path+loss", "decoder", "backward",
                                                  "optimizer"))
        assert total > 0 and abs(phases - total) <= 1e-6 + 1e-6 * total
        assert float(r["encoder_s"]) > 0 and float(r["decoder_s"]) > 0 and float(r["posterior_s"]) > 0
        # relaxed spikes are never exactly zero: every pair is evaluated
        assert 0.0 < float(r["pairs_evaluated"]) <= 1.0
        assert float(r["peak_mb"]) > 0 and float(r["pool_mb"]) >= 0 and r["git_sha"] and r["machine"]
    md = (tmp_path / "train.md").read_text()
    assert "| paper (D 324, K 3, H 64) | 2 | fast |" in md and "1.00x" in md


@pytest.mark.slow
def test_bench_train_rejects_bad_reps():
    proc = subprocess.run([sys.executable, SCRIPT, "--reps", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--reps" in proc.stderr
