"""The command line (sta/cli.py): ``sta train / evaluate / plot / run`` in a temporary directory
produce their files; bad configurations exit non-zero with one line on stderr and no traceback.

The commands run as real subprocesses (the installed console script and ``python -m sta``), with
one OpenMP thread (tiny ops spin-wait against other processes on a shared 2-core machine).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOTS = ["loss_curves.png", "reconstructions.png", "latent_flows.png", "grid_transport_field0.png",
         "traversal_field0.png", "traversal_field0.gif"]


def sta(*args, cwd, timeout=300):
    """Run ``python -m sta ARGS`` in ``cwd``; returns the CompletedProcess (text)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("STA_BACKEND", None)
    return subprocess.run([sys.executable, "-m", "sta", *args], cwd=str(cwd), env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


def assert_user_error(result, pattern):
    """Exit status 2, exactly one line on stderr that names the problem, no traceback."""
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr[-2000:]}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line message, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr and pattern in lines[0], lines[0]
    assert lines[0].startswith("sta "), lines[0]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``sta train --preset quick --steps 5`` (the default preset, shortened) in a fresh directory."""
    cwd = tmp_path_factory.mktemp("cli")
    result = sta("train", "--preset", "quick", "--steps", "5", "--out", "run", "--quiet", cwd=cwd)
    assert_ok(result)
    return cwd, cwd / "run", result


@pytest.mark.slow
def test_train_writes_config_metrics_and_checkpoint(quick_run):
    cwd, run, result = quick_run
    assert result.stdout.splitlines()[0] == "run directory: run"  # first, so the run can be watched
    assert result.stdout.count("run directory:") == 1
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == "quick" and config["steps"] == 5 and config["dataset"] == "digits"
    assert config["model"]["model"] == "sta" and config["model"]["backend"] == "auto"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [5]  # log_every 10: only the final step is logged
    for key in ("loss", "recon", "kl_z0", "kl_path", "kl_spike", "kl_slab", "hj", "div", "nelbo"):
        assert key in metrics[0]
    import torch

    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["step"] == 5 and {"model", "optimizer", "rng", "config"} <= set(ckpt)
    assert not [f for f in os.listdir(run / "checkpoints") if f != "last.pt"], "temp files left behind"


@pytest.mark.slow
def test_evaluate_then_plot(quick_run):
    cwd, run, _ = quick_run
    result = sta("evaluate", "run", "--iw-samples", "4", cwd=cwd)
    assert_ok(result)
    assert "equivariance error" in result.stdout and "identification accuracy" in result.stdout
    frames = result.stderr.replace("\r", "\n").splitlines()  # the progress bar, one frame per redraw
    for stage in ("ELBO", "IW bound (4 samples)", "equivariance", "identification"):
        assert any(f"evaluate: {stage}" in f for f in frames), f"no progress for {stage}:\n{result.stderr}"
    assert len([f for f in frames if "100%" in f]) == 1, f"the final bar line is drawn more than once:\n{result.stderr}"
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["step"] == 5 and evaluation["iw_samples"] == 4

    result = sta("plot", "run", cwd=cwd)
    assert_ok(result)
    written = result.stdout.split()
    for name in PLOTS + ["traversal_field1.png", "traversal_field2.png"]:
        path = run / "plots" / name
        assert path.exists() and path.stat().st_size > 1000, f"{name} missing or empty"
        assert os.path.join("run", "plots", name) in written
    with open(run / "plots" / "grid_transport_field0.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_console_script_and_run_command(tmp_path):
    """``sta run`` (train + evaluate + plot) through the installed console script when present."""
    exe = shutil.which("sta")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("STA_BACKEND", None)
    cmd = [exe] if exe else [sys.executable, "-m", "sta"]
    result = subprocess.run(cmd + ["run", "--preset", "tiny", "--steps", "3", "--out", "r", "--quiet"], cwd=str(tmp_path),
                            env=env, capture_output=True, text=True, timeout=300)
    assert_ok(result)
    assert result.stdout.splitlines()[0] == "run directory: r"
    run = tmp_path / "r"
    for name in ["config.json", "metrics.jsonl", "eval.json", os.path.join("checkpoints", "last.pt")] + \
            [os.path.join("plots", p) for p in PLOTS]:
        assert (run / name).exists(), f"sta run did not write {name}"
    assert json.loads((run / "eval.json").read_text())["step"] == 3


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


@pytest.mark.slow
def test_diverged_training_exits_non_zero_with_one_line(tmp_path, monkeypatch, capsys):
    """The issue's reproduction, ``sta train --preset tiny --set lr=1000``: exit status 1 and one
    line naming the step and the first non-finite term (after the progress bar); the checkpoint on
    disk loads with finite parameters; metrics.jsonl is strict JSON; ``--resume --set lr=...``
    continues from the checkpoint; a --set that would change the model is refused."""
    import torch

    from sta.cli import main
    from sta.train import load_run

    result = sta("train", "--preset", "tiny", "--set", "lr=1000", "--out", "run", cwd=tmp_path)
    assert result.returncode == 1, f"exit {result.returncode}: {result.stderr[-2000:]}"
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and sum("error" in line for line in lines) == 1, result.stderr
    assert lines[-1].startswith("sta train: error: training stopped at step "), lines[-1]
    assert "consecutive non-finite steps" in lines[-1] and "the first at step 2: ELBO term " in lines[-1]
    assert lines[-1].endswith(f"last good checkpoint: {os.path.join('run', 'checkpoints', 'last.pt')} (step 0)")

    _, model, ckpt = load_run(str(tmp_path / "run"))
    assert ckpt["step"] == 0 and all(torch.isfinite(v).all() for v in model.state_dict().values())
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    metrics = [json.loads(line, parse_constant=_no_constants) for line in text.splitlines()]
    assert metrics[0]["skipped"] is False and metrics[-1]["skipped"] is True and metrics[-1]["loss"] is None

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["train", "--preset", "tiny", "--set", "lr=1000", "--out", "again", "--quiet"])
        captured = capsys.readouterr()
        assert code == 1 and len(captured.err.strip().splitlines()) == 1, captured.err  # --quiet: only the line

        code = main(["train", "--out", "run", "--resume", "--set", "model.latent=8", "--quiet"])
        captured = capsys.readouterr()
        assert_user_error(subprocess.CompletedProcess([], code, captured.out, captured.err),
                          "--set: ['model'] cannot change when resuming a run")
        assert main(["train", "--out", "run", "--resume", "--set", "lr=0.003", "--quiet"]) == 0
        from sta.plots import plot_loss_curves

        assert os.path.getsize(plot_loss_curves("again/metrics.jsonl", "curves.png")) > 1000  # nulls skipped
    finally:
        torch.set_num_threads(threads)
    _, model, ckpt = load_run("run")
    assert ckpt["step"] == 20 and all(torch.isfinite(v).all() for v in model.state_dict().values())
    metrics = [json.loads(line, parse_constant=_no_constants) for line in open("run/metrics.jsonl")]
    assert [m["step"] for m in metrics] == list(range(1, 21)) and not any(m["skipped"] for m in metrics)
    assert json.loads(open("run/config.json").read())["lr"] == 0.003


BAD = [
    (["train", "--preset", "huge"], "unknown preset 'huge'"),
    (["train", "--preset", "tiny", "--steps", "-5"], "steps: expected a positive int, got -5"),
    (["train", "--preset", "tiny", "--steps", "0"], "steps: expected a positive int, got 0"),
    (["train", "--preset", "tiny", "--set", "model.latent=-1"], "latent: expected a positive int"),
    (["train", "--preset", "tiny", "--set", "nonsense=1"], "unknown key 'nonsense'"),
    (["train", "--preset", "tiny", "--set", "lr"], "expected KEY=VALUE"),
    (["train", "--preset", "tiny", "--model", "transformer"], "model: expected one of"),
    (["train", "--preset", "tiny", "--dataset", "emnist"], "dataset: expected one of"),
    (["train", "--preset", "tiny", "--resume", "--out", "missing"], "not a run directory"),
    (["train", "--preset", "tiny", "--set", "image_size=3"], "image_size: expected None or an int >= 8"),
    (["train", "--preset", "tiny", "--set", "batch_size=100"], "batch_size: 100 is larger than num_sequences"),
    (["train", "--preset", "tiny", "--set", "lr=fast"], "lr: expected a finite number, got 'fast'"),
    (["train", "--preset", "tiny", "--set", "model=3"], "model: expected a mapping"),
    (["run", "--preset", "huge"], "unknown preset 'huge'"),
    (["evaluate", "missing"], "run directory 'missing' does not exist"),
    (["plot", "missing"], "run directory 'missing' does not exist"),
    (["evaluate", "."], "is not a run directory (no config.json)"),
]


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [BAD[0], BAD[1], BAD[10]], ids=["preset", "steps", "run_dir"])
def test_bad_configs_exit_with_one_line_in_a_process(args, message, tmp_path):
    """The three cases of the issue through a real process: exit status and stderr as a user sees them."""
    assert_user_error(sta(*args, cwd=tmp_path), message)


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_configs_exit_with_one_line(args, message, tmp_path, monkeypatch, capsys):
    """Every user error, in-process (each subprocess costs seconds of torch import)."""
    from sta.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(args)
    captured = capsys.readouterr()
    assert_user_error(subprocess.CompletedProcess(args, code, captured.out, captured.err), message)


def test_existing_run_and_missing_checkpoint(tmp_path, monkeypatch, capsys):
    """Training into an existing run without --resume is refused; a run without a checkpoint cannot
    be evaluated or plotted."""
    from sta.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"preset": "tiny"}))
    for args, message in [(["train", "--preset", "tiny", "--out", "run"], "already holds a run"),
                          (["evaluate", "run"], "has no checkpoint"), (["plot", "run"], "has no checkpoint")]:
        code = main(args)
        captured = capsys.readouterr()
        assert_user_error(subprocess.CompletedProcess(args, code, captured.out, captured.err), message)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_damaged_run_directory(tmp_path, monkeypatch, capsys):
    """A config.json that is not JSON and a checkpoint that is not a checkpoint: one-line errors."""
    import torch

    from sta.cli import main
    from sta.train import preset

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text("{not json")
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    (tmp_path / "b" / "config.json").write_text(json.dumps(preset("tiny").to_dict()))
    (tmp_path / "b" / "checkpoints" / "last.pt").write_bytes(b"\x80\x02 truncated")
    cases = [(["evaluate", "a"], "not a readable config"), (["plot", "b"], "unreadable checkpoint"),
             (["train", "--preset", "tiny", "--out", "b", "--resume"], "unreadable checkpoint")]
    torch.save({"weights": 1}, tmp_path / "c.pt")
    (tmp_path / "c" / "checkpoints").mkdir(parents=True)
    (tmp_path / "c" / "config.json").write_text(json.dumps(preset("tiny").to_dict()))
    os.replace(tmp_path / "c.pt", tmp_path / "c" / "checkpoints" / "last.pt")
    cases.append((["evaluate", "c"], "not a checkpoint written by sta train"))
    for args, message in cases:
        code = main(args)
        captured = capsys.readouterr()
        assert_user_error(subprocess.CompletedProcess(args, code, captured.out, captured.err), message)


def test_cuda_device_without_cuda_is_a_config_error(monkeypatch, capsys, tmp_path):
    import torch

    from sta.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["train", "--preset", "tiny", "--set", "device=cuda", "--out", "r"])
    captured = capsys.readouterr()
    assert_user_error(subprocess.CompletedProcess([], code, captured.out, captured.err), "sees no CUDA device")


@pytest.mark.slow  # trains, evaluates and plots (2-5 s)
@pytest.mark.parametrize("overrides,transport", [
    (['model.model="dense"', 'model.control="double"', 'model.rotational="mlp"'], True),
    (['model.model="linear"'], False),
    (['model.model="static"'], False),
])
def test_plot_every_model(overrides, transport, tmp_path, monkeypatch):
    """``sta plot`` on the other models (in-process): the grid transport needs learned fields, so
    linear (constant directions) and static (no dynamics) skip it; static has no traversals either."""
    import torch

    from sta.cli import main
    from sta.train import apply_overrides, preset, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(apply_overrides(preset("tiny"), ["steps=2"] + overrides), str(tmp_path / "run"), progress=False)
        assert main(["plot", str(tmp_path / "run")]) == 0
    finally:
        torch.set_num_threads(threads)
    written = set(os.listdir(tmp_path / "run" / "plots"))
    assert {"loss_curves.png", "reconstructions.png"} <= written
    assert ("grid_transport_field0.png" in written) == transport
    assert ("latent_flows.png" in written) == ("static" not in overrides[0])


@pytest.mark.slow
def test_plot_titles_name_the_matched_transformations_and_scale_arrows(tmp_path, monkeypatch):
    """latent_flows.png titles name the transformation eval.json matched to each field (none when
    eval.json is stale), its arrows span ~a grid cell, and the grid-transport figure carries a colour
    bar per row and titles of at least 10 pt. Recorded through spies on matplotlib's Axes / Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import torch
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from sta.plots import plot_run
    from sta.train import apply_overrides, preset, train

    calls = {"title": [], "quiver": [], "colorbar": [], "suptitle": []}
    for cls, name in [(Axes, "set_title"), (Axes, "quiver"), (Figure, "colorbar"), (Figure, "suptitle")]:
        real = getattr(cls, name)

        def spy(self, *args, _real=real, _key=name.replace("set_", ""), **kwargs):
            calls[_key].append((args, kwargs))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = str(tmp_path / "run")
        train(apply_overrides(preset("tiny"), ["steps=2"]), run, progress=False)
        with open(os.path.join(run, "eval.json"), "w") as f:
            json.dump({"step": 2, "field_assignment": ["rotation", None, "hue"]}, f)
        plot_run(run)
        titles = [args[0] for args, _ in calls["title"]]
        flows = [t for t in titles if "unit speed, t = 0" in t]
        assert [t.split("\n")[0] for t in flows] == ["field 0 (matched: rotation)", "field 1 (unmatched)",
                                                     "field 2 (matched: hue)"], titles
        (x, y, u, v, _), kwargs = calls["quiver"][0]
        spacing = min(abs(x[0, 1] - x[0, 0]), abs(y[1, 0] - y[0, 0]))
        longest = float((u ** 2 + v ** 2).max() ** 0.5) / kwargs["scale"]  # in data units (scale_units="xy")
        assert kwargs["scale_units"] == "xy" and abs(longest - 0.9 * spacing) < 1e-4 * spacing, (longest, spacing)
        labels = [kwargs.get("label") for _, kwargs in calls["colorbar"]]
        assert {"density on the grid", "particle log-density log q"} <= set(labels), labels
        assert all(kwargs.get("fontsize", 10) >= 10 for _, kwargs in calls["title"]), calls["title"]
        assert calls["suptitle"][-1][0][0] == "field 0 (matched: rotation), unit speed"

        with open(os.path.join(run, "eval.json"), "w") as f:  # evaluated at another step: not these weights
            json.dump({"step": 1, "field_assignment": ["rotation", None, "hue"]}, f)
        calls["title"].clear()
        plot_run(run)
        assert [args[0].split("\n")[0] for args, _ in calls["title"] if "unit speed, t = 0" in args[0]] == \
            [f"field {k} (unmatched)" for k in range(3)]
    finally:
        torch.set_num_threads(threads)


def test_resume_without_steps_continues_to_the_runs_own_steps(tmp_path, monkeypatch):
    """``sta train --out RUN --resume`` (no --preset, no --steps) finishes the run as configured;
    it used to take the default preset's 1000 steps and silently extend a 3-step run."""
    import torch

    from sta.cli import main

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--preset", "tiny", "--steps", "3", "--out", "run", "--quiet"]) == 0
        assert main(["train", "--out", "run", "--resume", "--quiet"]) == 0
        assert torch.load("run/checkpoints/last.pt", weights_only=False)["step"] == 3
        assert json.loads((tmp_path / "run" / "config.json").read_text())["steps"] == 3
        assert main(["train", "--out", "run", "--resume", "--steps", "5", "--quiet"]) == 0  # extend on purpose
        assert torch.load("run/checkpoints/last.pt", weights_only=False)["step"] == 5
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # trains and plots (~4 s)
def test_plot_a_killed_run(tmp_path, capsys):
    """A run killed mid-write of metrics.jsonl still plots (the cut line is skipped)."""
    import torch

    from sta.cli import main
    from sta.train import apply_overrides, preset, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = str(tmp_path / "run")
        train(apply_overrides(preset("tiny"), ["steps=2", "log_every=1"]), run, progress=False)
        with open(os.path.join(run, "metrics.jsonl"), "a") as f:
            f.write('{"step": 3, "lo')
        assert main(["plot", run]) == 0
    finally:
        torch.set_num_threads(threads)
    assert os.path.exists(os.path.join(run, "plots", "loss_curves.png"))
