"""benchmarks/bench_models.py end to end on the tiny preset: rows per (model, seed), the summary."""
import csv
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import bench_models  # noqa: E402


@pytest.mark.slow
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
    assert " ± " in md and " [" in md  # two seeds: mean ± sd [bootstrap interval]
    sta = {r["seed"]: float(r["equivariance_error"]) for r in rows if r["model"] == "sta"}
    lin = {r["seed"]: float(r["equivariance_error"]) for r in rows if r["model"] == "linear"}
    wins = sum(sta[s] < lin[s] for s in sta)
    assert "equivariance L1, sta vs linear: " in md
    if jobs == 2:  # --resume reuses every finished run: same rows, no training
        again = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        assert again.stdout.count("reusing ") == 6
        with open(tmp_path / "results" / "models_digits.csv") as f:
            strip = lambda rs: [{k: v for k, v in r.items() if k != "bench_wall_s"} for r in rs]  # noqa: E731
            assert strip(list(csv.DictReader(f))) == strip(rows) and f"better on {wins} of 2 seed(s); paired 95% intervals" in md


def _rows(sta, other, metric="equivariance_error"):
    """Result rows of two models over len(sta) seeds (what the CSV holds, as strings)."""
    base = dict(dataset="digits", preset="quick", steps="10", test_sequences="4", machine="m", torch="t", git="g",
                threads="1", identification_chance="0.33", train_s="1", eval_s="1", nelbo_per_sequence="1",
                nll_x0_iw="1", equivariance_error="0.1", identification_accuracy="", identification_f1="")
    return ([dict(base, model="sta", seed=str(i), **{metric: str(v)}) for i, v in enumerate(sta)]
            + [dict(base, model="linear", seed=str(i), **{metric: str(v)}) for i, v in enumerate(other)])


def test_verdict_needs_both_paired_intervals_to_exclude_zero():
    bm = bench_models
    lo, hi = bm.bootstrap_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert 1.0 < lo < 3.0 < hi < 5.0
    t_lo, t_hi = bm.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])  # mean 3, sd 1.581, t(4) = 2.776
    assert abs(t_hi - 3.0 - 2.776 * 1.5811 / 5 ** 0.5) < 1e-3 and abs(t_lo + t_hi - 6.0) < 1e-12
    clear = bm.verdict(_rows([0.050, 0.051, 0.049, 0.052, 0.050], [0.060, 0.062, 0.059, 0.061, 0.060]),
                       "equivariance_error", "equivariance L1", True, "sta", "linear")
    assert "**Supported**" in clear and "better on 5 of 5" in clear and "do not overlap" in clear
    # lower on every seed, but one seed carries the mean: the bootstrap excludes 0, the t interval does not
    skewed = bm.verdict(_rows([0.0616, 0.0614, 0.0525], [0.0625, 0.0632, 0.0714]),
                        "equivariance_error", "equivariance L1", True, "sta", "linear")
    assert "Not supported: the t interval includes 0" in skewed and "better on 3 of 3" in skewed
    mixed = bm.verdict(_rows([0.05, 0.07, 0.05, 0.07], [0.06, 0.06, 0.06, 0.06]),
                       "equivariance_error", "equivariance L1", True, "sta", "linear")
    assert "Not supported: the intervals include 0" in mixed and "better on 2 of 4" in mixed
    higher = bm.verdict(_rows([0.9, 0.95, 0.92], [0.6, 0.65, 0.62], "identification_accuracy"),
                        "identification_accuracy", "identification acc.", False, "sta", "linear")
    assert "sta higher by 0.3000" in higher and "**Supported**" in higher


@pytest.mark.slow
def test_summarize_rewrites_the_markdown_from_a_csv(tmp_path):
    rows = _rows([0.050, 0.051, 0.049], [0.060, 0.062, 0.059])
    path = tmp_path / "models_digits.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_models.py"), "--summarize", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "models_digits.md").read_text()
    assert "seeds [0, 1, 2]" in md and "| sta | " in md and "equivariance L1, sta vs linear" in md
    assert "| linear | 0.0600 | 0.0620 | 0.0590 |" in md


@pytest.mark.slow
def test_bench_models_rejects_bad_jobs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_models.main(["--jobs", "0"])
    assert exit_info.value.code == 2 and "--jobs: expected >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_variant_is_a_model_of_its_own_compared_with_sta(tmp_path):
    """--variant trains sta with overrides as a model of its own, in the --name file, with the fraction
    of evaluated pairs (below 1 under a spike floor) and a paired comparison with sta."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("STA_BACKEND", None)
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "bench_models.py"), "--preset", "tiny", "--steps", "4",
           "--models", "sta", "--set", "model.spike_floor=0", "--variant", "floor=model.spike_floor=0.5",
           "--seeds", "0", "1", "--jobs", "1",
           "--name", "ablation", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "results" / "ablation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["seed"]) for r in rows] == [("sta", "0"), ("sta", "1"), ("floor", "0"), ("floor", "1")]
    for r in rows:
        evaluated = float(r["pairs_evaluated"])
        assert r["set"] == "model.spike_floor=0"  # --set reaches every run; a variant's overrides come after
        if r["model"] == "sta":
            assert evaluated == 1.0 and r["overrides"] == ""
        else:  # tiny, untrained: about half the relaxed spikes are below 0.5
            assert 0.0 < evaluated < 1.0 and r["overrides"] == "model.spike_floor=0.5"
        config = (tmp_path / "runs" / f"{r['model']}-s{r['seed']}" / "config.json").read_text()
        assert ('"spike_floor": 0.5' in config) == (r["model"] == "floor")
    md = (tmp_path / "results" / "ablation.md").read_text()
    assert "| floor | " in md and "-ELBO / sequence (nats), sta vs floor: " in md
    assert "`floor`: `model.spike_floor=0.5`" in md
    assert '--set model.spike_floor=0 --variant "floor=model.spike_floor=0.5" --name ablation' in md


@pytest.mark.parametrize("text", ["floor", "floor=", "=model.x=1", "sta=model.spike_floor=0.1", "a b=model.x=1",
                                  "floor=model.spike_floor"])
def test_bench_models_rejects_bad_variants(text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_models.main(["--variant", text])
    assert exit_info.value.code == 2 and "--variant: " in capsys.readouterr().err


def test_bench_models_rejects_a_bad_set(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_models.main(["--set", "model.spike_floor"])
    assert exit_info.value.code == 2 and "--set: expected KEY=VALUE" in capsys.readouterr().err


def test_resume_continues_an_unfinished_run_from_its_checkpoint(tmp_path, monkeypatch, capsys, one_thread):
    """--resume: a run stopped after its step-2 checkpoint continues from there (not from step 0)."""
    from dataclasses import replace

    import torch

    real_train = bench_models.train
    calls = []

    def stopped_at_step_2(config, out, resume=False, progress=True):
        calls.append(resume)
        real_train(replace(config, steps=2), out, resume=resume, progress=progress)
        raise KeyboardInterrupt  # the bench was stopped here

    args = ("sta", 0, "digits", "tiny", 4, str(tmp_path / "runs"), 1)
    monkeypatch.setattr(bench_models, "train", stopped_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        bench_models.run_one(*args, resume=True)
    out = tmp_path / "runs" / "sta-s0"
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["step"] == 2
    monkeypatch.setattr(bench_models, "train", lambda *a, **k: calls.append(k["resume"]) or real_train(*a, **k))
    row = bench_models.run_one(*args, resume=True)
    assert calls == [False, True] and "continuing" in capsys.readouterr().out
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["step"] == 4 and row["steps"] == 4
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] < 2 and steps[-1] == 4  # the first segment's log was kept, then continued
