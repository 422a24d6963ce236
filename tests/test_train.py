"""Training (sta/train.py, sta/distributed.py): the same loss curve on every backend, exact resume
after SIGKILL, atomic checkpoints, and data-parallel training over two gloo processes.

Every run uses the ``tiny`` preset (D=6, H=8, 16x16 digits, T=3, batch 8): ~30 ms a step on one
thread. Tiny ops run on one thread: OpenMP threads spin-wait against other processes on a shared
2-core machine and make them ~100x slower.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import sta.ops
from sta.backends import all_backends
from sta.train import (ConfigError, apply_overrides, batch_indices, checkpoint_path, load_run, preset,
                       save_atomic, schedules, train)
from tests.tolerances import TRAINING, assert_close

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Tiny ops: one thread (fixture in conftest.py) avoids OpenMP spin contention on a shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides):
    config = preset("tiny")
    return apply_overrides(config, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def subprocess_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("STA_BACKEND", None)
    return env


# ----------------------------------------------------------------------------------------------
# Convergence: the same loss curve with every backend
# ----------------------------------------------------------------------------------------------

def _available_backends():
    """Every backend that can run on this machine (the torch reference first)."""
    return [b.name for b in all_backends() if not b.unavailable()]


# The Triton interpreter runs one flow_step of the tiny model in ~0.15 s, ~1 s per training step
# (8 flow_steps + backward), so it trains 6 steps (~7 s) instead of 24; compiled backends run 24.
def _steps_for(backend: str) -> int:
    interpreted = backend == "triton" and not torch.cuda.is_available()
    return 6 if interpreted else 24


_REFERENCE = {}


def _device_for(backend: str) -> str:
    """GPU backends train on the GPU when there is one (the Triton interpreter runs on the CPU)."""
    return "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"


def reference_run(steps, device, tmp_dir):
    """The torch-reference run of ``steps`` steps on ``device``, once per module: (metrics, final state_dict)."""
    if (steps, device) not in _REFERENCE:
        run_dir = os.path.join(tmp_dir, f"reference{steps}{device}")
        model = train(tiny(steps=steps, device=device, **{"model.backend": "torch"}), run_dir, progress=False)
        _REFERENCE[steps, device] = read_metrics(run_dir), {k: v.clone() for k, v in model.state_dict().items()}
    return _REFERENCE[steps, device]


@pytest.mark.parametrize("backend", [b for b in _available_backends() if b != "torch"])
def test_same_loss_curve_on_every_backend(backend, tmp_path_factory, tmp_path, monkeypatch):
    """The model asks for backend "auto"; STA_BACKEND forces one. A spy on sta.ops.select records
    which backend really ran every flow_step. Curves and final parameters match the reference."""
    steps, device = _steps_for(backend), _device_for(backend)
    if device == "cuda":  # cuDNN's fastest conv backward kernels are not run-to-run deterministic
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    ref_metrics, ref_state = reference_run(steps, device, str(tmp_path_factory.getbasetemp()))
    chosen = []
    original = sta.ops.select

    def spy(request, name):
        impl = original(request, name)
        chosen.append((name, impl.name))
        return impl

    monkeypatch.setattr(sta.ops, "select", spy)
    monkeypatch.setenv("STA_BACKEND", backend)
    config = tiny(steps=steps, device=device)
    assert config.model.backend == "auto"
    model = train(config, str(tmp_path / "run"), progress=False)
    assert chosen and {name for name, _ in chosen} == {"auto"}, "the model must call flow_step(backend='auto')"
    assert {impl for _, impl in chosen} == {backend}, f"STA_BACKEND={backend} ran {set(i for _, i in chosen)}"

    metrics = read_metrics(str(tmp_path / "run"))
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert metrics[-1]["loss"] < metrics[0]["loss"], "the run did not train"
    for key in ("loss", "recon", "kl_z0", "kl_path", "kl_spike", "kl_slab", "hj"):
        got = torch.tensor([m[key] for m in metrics], dtype=torch.float64)
        want = torch.tensor([m[key] for m in ref_metrics], dtype=torch.float64)
        assert_close(got, want, tol=TRAINING, what=f"{backend} {key} curve")
    for name, value in model.state_dict().items():
        assert_close(value, ref_state[name], tol=TRAINING, what=f"{backend} final {name}")


def test_backend_choice_is_in_the_config(monkeypatch):
    """ModelConfig.backend names a backend for the whole model (no environment needed)."""
    monkeypatch.delenv("STA_BACKEND", raising=False)
    from sta.model import ModelConfig, STAModel

    chosen = []
    original = sta.ops.select
    monkeypatch.setattr(sta.ops, "select", lambda request, name: chosen.append(name) or original(request, name))
    config = ModelConfig(channels=1, image_size=8, transitions=2, latent=4, num_fields=2, hidden=4, conv=4,
                         backend="cpu" if "cpu" in _available_backends() else "torch")
    STAModel(config).elbo(torch.rand(2, 3, 1, 8, 8))
    assert chosen and set(chosen) == {config.backend}


# ----------------------------------------------------------------------------------------------
# Checkpoints: SIGKILL + --resume reaches the uninterrupted parameters; atomic writes
# ----------------------------------------------------------------------------------------------

KILL_STEPS = 60  # tiny preset, checkpoint every 10 steps: ~2 s of training after the first checkpoint


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    reference = train(tiny(steps=KILL_STEPS), str(tmp_path / "reference"), progress=False)
    ref_metrics = read_metrics(str(tmp_path / "reference"))

    run_dir = str(tmp_path / "killed")
    ckpt = checkpoint_path(run_dir)
    cmd = [sys.executable, "-m", "sta", "train", "--preset", "tiny", "--steps", str(KILL_STEPS), "--out", run_dir,
           "--quiet"]
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not os.path.exists(ckpt) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {err.decode()[-2000:]}"
    killed_at = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < killed_at < KILL_STEPS
    assert max(m["step"] for m in read_metrics(run_dir)) < KILL_STEPS

    resumed = subprocess.run(cmd + ["--resume"], cwd=str(tmp_path), env=subprocess_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    config, model, state = load_run(run_dir)
    assert state["step"] == KILL_STEPS and config.steps == KILL_STEPS
    for name, value in reference.state_dict().items():
        assert_close(model.state_dict()[name], value, tol=TRAINING, what=f"resumed {name}")
    for key in ("exp_avg", "exp_avg_sq"):  # the optimizer resumed too
        ref_opt = torch.load(checkpoint_path(str(tmp_path / "reference")), weights_only=False)["optimizer"]
        for i, s in ref_opt["state"].items():
            assert_close(state["optimizer"]["state"][i][key], s[key], tol=TRAINING, what=f"adam {key} {i}")
    # metrics.jsonl: every step exactly once, the same curve as the uninterrupted run
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, KILL_STEPS + 1))
    assert_close(torch.tensor([m["loss"] for m in metrics]), torch.tensor([m["loss"] for m in ref_metrics]),
                 tol=TRAINING, what="resumed loss curve")


def test_resume_in_process_continues_exactly(tmp_path):
    """A 20-step run that dies right after its step-10 checkpoint, resumed in the same process,
    equals the uninterrupted 20-step run (the schedules depend on ``steps``, so both use 20)."""
    full = train(tiny(steps=20), str(tmp_path / "full"), progress=False)
    import sta.train as train_module

    class Crash(Exception):
        pass

    original = train_module.save_atomic

    def crash_after_save(obj, path):
        original(obj, path)
        raise Crash  # dies right after the step-10 checkpoint is on disk

    train_module.save_atomic = crash_after_save
    try:
        with pytest.raises(Crash):
            train(tiny(steps=20), str(tmp_path / "run"), progress=False)
    finally:
        train_module.save_atomic = original
    assert torch.load(checkpoint_path(str(tmp_path / "run")), weights_only=False)["step"] == 10
    resumed = train(tiny(steps=20), str(tmp_path / "run"), resume=True, progress=False)
    for name, value in full.state_dict().items():
        assert_close(resumed.state_dict()[name], value, tol=TRAINING, what=f"resumed {name}")


def test_partial_checkpoint_never_replaces_a_good_one(tmp_path, monkeypatch):
    """A writer that dies mid-write (here: torch.save raises after half the bytes) leaves the
    previous checkpoint intact and loadable, and removes its temp file."""
    import sta.train as train_module

    path = str(tmp_path / "last.pt")
    good = {"model": {"w": torch.arange(1000.0)}, "step": 10}
    save_atomic(good, path)
    real_save = torch.save

    def dying_save(obj, f):
        import io

        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(train_module.torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"model": {"w": torch.zeros(1000)}, "step": 20}, path)
    monkeypatch.setattr(train_module.torch, "save", real_save)
    loaded = torch.load(path, weights_only=False)
    assert loaded["step"] == 10 and torch.equal(loaded["model"]["w"], good["model"]["w"])
    assert os.listdir(tmp_path) == ["last.pt"], f"temp files left behind: {os.listdir(tmp_path)}"


def test_stale_temp_file_from_a_killed_writer_is_ignored(tmp_path):
    """A SIGKILL during a checkpoint write leaves ``last.pt.tmpPID`` (garbage); resume uses last.pt."""
    run_dir = str(tmp_path / "run")
    train(tiny(steps=10), run_dir, progress=False)
    with open(checkpoint_path(run_dir) + ".tmp999999", "wb") as f:
        f.write(b"\x80\x02garbage")
    model = train(tiny(steps=12), run_dir, resume=True, progress=False)
    assert torch.load(checkpoint_path(run_dir), weights_only=False)["step"] == 12
    assert model is not None


def test_resume_drops_a_metrics_line_cut_short_by_the_kill(tmp_path):
    run_dir = str(tmp_path / "run")
    train(tiny(steps=10), run_dir, progress=False)
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 11, "time": 0.5, "lo')  # SIGKILL in the middle of a write
    train(tiny(steps=12), run_dir, resume=True, progress=False)
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 13))


def test_schedules_kl_warmup_temperature_and_slab():
    config = tiny(steps=100, kl_warmup=0.2, slab_start=0.5)
    at = {step: schedules(config, step) for step in (0, 10, 19, 20, 49, 50, 99)}
    assert [at[s].kl_weight for s in (0, 10, 19, 20, 99)] == [0.0, 0.5, 0.95, 1.0, 1.0]
    assert [at[s].slab for s in (0, 49, 50, 99)] == [False, False, True, True]
    temperatures = [at[s].temperature for s in sorted(at)]
    assert temperatures == sorted(temperatures, reverse=True) and temperatures[0] > temperatures[-1]
    assert schedules(tiny(steps=100, kl_warmup=0.0), 0).kl_weight == 1.0  # off
    with pytest.raises(ConfigError, match=r"kl_warmup: expected a fraction in \[0, 1\], got 1.5"):
        tiny(kl_warmup=1.5).validate()


def test_kl_warmup_is_logged_and_reaches_one(tmp_path):
    train(tiny(steps=10, kl_warmup=0.5), str(tmp_path), progress=False)
    weights = [m["kl_weight"] for m in read_metrics(str(tmp_path))]
    assert weights == [min(1.0, s / 5) for s in range(10)]


def test_bad_resume_and_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a run directory"):
        train(tiny(steps=2), str(tmp_path / "nothing"), resume=True, progress=False)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ConfigError, match="steps: expected a positive int"):
        tiny(steps=-1).validate()
    with pytest.raises(ConfigError, match="unknown key"):
        tiny(**{"model.width": 3})


# ----------------------------------------------------------------------------------------------
# Data parallel: two gloo processes
# ----------------------------------------------------------------------------------------------

def test_batch_indices_split_the_global_batch():
    full = batch_indices(5, 32, 8, seed=3)
    parts = [batch_indices(5, 32, 8, seed=3, rank=r, world=2) for r in range(2)]
    assert sorted(torch.cat(parts).tolist()) == sorted(full.tolist())
    assert len(set(parts[0].tolist()) & set(parts[1].tolist())) == 0
    # an epoch visits every index once (32 / 8 = 4 steps per epoch)
    epoch = torch.cat([batch_indices(s, 32, 8, seed=3) for s in range(4)])
    assert sorted(epoch.tolist()) == list(range(32))
    assert not torch.equal(batch_indices(4, 32, 8, seed=3), batch_indices(0, 32, 8, seed=3))  # new permutation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data_parallel_worker(rank, world, port, run_dir, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model = train(tiny(steps=12), run_dir, progress=False)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_gloo_processes_keep_identical_parameters(tmp_path):
    import torch.multiprocessing as mp

    run_dir, out_dir = str(tmp_path / "run"), str(tmp_path)
    initial = train(tiny(steps=1, lr=1e-12), str(tmp_path / "init"), progress=False).state_dict()
    mp.spawn(_data_parallel_worker, args=(2, _free_port(), run_dir, out_dir), nprocs=2, join=True)
    states = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), f"{name} differs between ranks"
    moved = [name for name in states[0] if not torch.allclose(states[0][name], initial[name])]
    assert moved, "no parameter changed: the ranks did not train"
    ckpt = torch.load(checkpoint_path(run_dir), weights_only=False)
    assert ckpt["step"] == 12 and len(ckpt["rng"]) == 2  # both ranks' RNG states, written by rank 0
    for name, value in ckpt["model"].items():
        assert torch.equal(value, states[0][name])
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 13))


def test_torchrun_cli_two_processes(tmp_path):
    """The documented launch: ``torchrun --nproc_per_node=2 -m sta train`` (gloo on the CPU); rank 0
    writes one run directory whose checkpoint holds both ranks' RNG states."""
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           "-m", "sta", "train", "--preset", "tiny", "--steps", "4", "--out", run_dir, "--quiet"]
    result = subprocess.run(cmd, cwd=str(tmp_path), env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run directory:") == 1, "only rank 0 reports"
    ckpt = torch.load(checkpoint_path(run_dir), weights_only=False)
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]
