"""Training (sta/train/, sta/distributed.py): the same loss curve on every backend, exact resume
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
from sta.train import (ConfigError, TrainingDiverged, apply_overrides, batch_indices, checkpoint_path, load_run,
                       preset, save_atomic, schedules, train)
from tests.tolerances import TRAINING, assert_close

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Tiny ops: one thread (fixture in conftest.py) avoids OpenMP spin contention on a shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides):
    config = preset("tiny")
    return apply_overrides(config, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def _no_constants(name):
    raise ValueError(f"metrics.jsonl holds {name}, which is not JSON")


def read_metrics(run_dir):
    """Every line of metrics.jsonl, parsed as strict JSON (NaN / Infinity tokens raise)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line, parse_constant=_no_constants) for line in f if line.strip()]


def assert_finite_checkpoint(run_dir, step):
    """The checkpoint on disk loads, is at ``step`` and holds only finite parameters and buffers."""
    _, model, ckpt = load_run(run_dir)
    assert ckpt["step"] == step
    for name, value in model.state_dict().items():
        assert torch.isfinite(value).all(), f"non-finite {name} in the checkpoint"


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


def spy_on_dispatch(monkeypatch, record):
    """Call ``record(name, impl)`` for every backend dispatch: flow_step and flow_path (the sta
    model's posterior path) both dispatch through ``sta.ops.select_backend`` -> ``select``."""
    def spy(request, name, _original=sta.ops.select):
        impl = _original(request, name)
        record(name, impl.name)
        return impl

    monkeypatch.setattr(sta.ops, "select", spy)


def _device_for(backend: str) -> str:
    """GPU backends train on the GPU when there is one (the Triton interpreter runs on the CPU)."""
    return "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"


def reference_run(steps, device, tmp_dir):
    """The torch-reference run of ``steps`` steps on ``device``, once per module: (metrics, final state_dict)."""
    if (steps, device) not in _REFERENCE:
        run_dir = os.path.join(tmp_dir, f"reference{steps}{device}")
        model = train(tiny(steps=steps, device=device, **{"model.backend": "torch", "model.spike_floor": 0.0}),
                      run_dir, progress=False)
        _REFERENCE[steps, device] = read_metrics(run_dir), {k: v.clone() for k, v in model.state_dict().items()}
    return _REFERENCE[steps, device]


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in _available_backends() if b != "torch"])
def test_same_loss_curve_on_every_backend(backend, tmp_path_factory, tmp_path, monkeypatch):
    """The model asks for backend "auto"; STA_BACKEND forces one. A spy on the dispatch records
    which backend really ran every flow step. Curves and final parameters match the reference."""
    steps, device = _steps_for(backend), _device_for(backend)
    if device == "cuda":  # cuDNN's fastest conv backward kernels are not run-to-run deterministic
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    ref_metrics, ref_state = reference_run(steps, device, str(tmp_path_factory.getbasetemp()))
    chosen = []
    spy_on_dispatch(monkeypatch, lambda name, impl: chosen.append((name, impl)))
    monkeypatch.setenv("STA_BACKEND", backend)
    # spike_floor 0 on both sides: with a floor, a spike within the backends' last-bit differences
    # of it is skipped by one and not the other, and the runs part (a different gradient, not an error)
    config = tiny(steps=steps, device=device, **{"model.spike_floor": 0.0})
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
    spy_on_dispatch(monkeypatch, lambda name, impl: chosen.append(name))
    config = ModelConfig(channels=1, image_size=8, transitions=2, latent=4, num_fields=2, hidden=4, conv=4,
                         backend="cpu" if "cpu" in _available_backends() else "torch")
    STAModel(config).elbo(torch.rand(2, 3, 1, 8, 8))
    assert chosen and set(chosen) == {config.backend}


# ----------------------------------------------------------------------------------------------
# Checkpoints: SIGKILL + --resume reaches the uninterrupted parameters; atomic writes
# ----------------------------------------------------------------------------------------------

KILL_STEPS = 60  # tiny preset, checkpoint every 10 steps: ~2 s of training after the first checkpoint


@pytest.mark.slow
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
    while proc.poll() is None and time.monotonic() < deadline:  # until a checkpoint after step 0
        if os.path.exists(ckpt) and torch.load(ckpt, weights_only=False)["step"] > 0:
            break
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
    import sta.train.loop as train_loop  # the loop calls save_atomic from its own namespace

    class Crash(Exception):
        pass

    original = train_loop.save_atomic

    def crash_after_save(obj, path):
        original(obj, path)
        if obj["step"] == 10:
            raise Crash  # dies right after the step-10 checkpoint is on disk

    train_loop.save_atomic = crash_after_save
    try:
        with pytest.raises(Crash):
            train(tiny(steps=20), str(tmp_path / "run"), progress=False)
    finally:
        train_loop.save_atomic = original
    assert torch.load(checkpoint_path(str(tmp_path / "run")), weights_only=False)["step"] == 10
    resumed = train(tiny(steps=20), str(tmp_path / "run"), resume=True, progress=False)
    for name, value in full.state_dict().items():
        assert_close(resumed.state_dict()[name], value, tol=TRAINING, what=f"resumed {name}")


def test_partial_checkpoint_never_replaces_a_good_one(tmp_path, monkeypatch):
    """A writer that dies mid-write (here: torch.save raises after half the bytes) leaves the
    previous checkpoint intact and loadable, and removes its temp file."""
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

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"model": {"w": torch.zeros(1000)}, "step": 20}, path)
    monkeypatch.setattr(torch, "save", real_save)
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


# ----------------------------------------------------------------------------------------------
# Non-finite steps: skipped, then the run stops; the checkpoint stays good; resume works
# ----------------------------------------------------------------------------------------------

def poison_batches(monkeypatch, bad_steps):
    """The training batches of the 0-based loop steps ``bad_steps`` become one NaN sequence (an extra
    training sequence that no other step draws), so their loss is NaN from the first ELBO term."""
    import sta.train.loop as train_loop  # the loop calls both from its own namespace

    real_load, real_indices = train_loop.load_data, train_loop.batch_indices

    def load_data(config, split="train", **kwargs):
        x, ds = real_load(config, split, **kwargs)
        return (torch.cat([x, torch.full_like(x[:1], float("nan"))]) if split == "train" else x), ds

    def indices(step, n, *args, **kwargs):
        idx = real_indices(step, n - 1, *args, **kwargs)
        return torch.full_like(idx, n - 1) if step in bad_steps else idx

    monkeypatch.setattr(train_loop, "load_data", load_data)
    monkeypatch.setattr(train_loop, "batch_indices", indices)


def test_a_nonfinite_step_is_skipped_and_logged_as_null(tmp_path, monkeypatch):
    """Two isolated NaN batches (steps 3 and 6): both skipped, the run completes with finite
    parameters, metrics.jsonl is strict JSON with null for the NaN terms."""
    poison_batches(monkeypatch, {2, 5})
    run_dir = str(tmp_path / "run")
    train(tiny(steps=12), run_dir, progress=False)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert [m["step"] for m in metrics if m["skipped"]] == [3, 6]
    for m in metrics:
        assert (m["recon"] is None and m["loss"] is None) == m["skipped"], m
    assert_finite_checkpoint(run_dir, 12)


def test_consecutive_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    """NaN batches from step 12 on, max_nonfinite_steps=3: the run stops at step 14 with one line;
    checkpoints/last.pt stays the step-10 one; resuming from it (clean data) gives the parameters of
    an uninterrupted run."""
    full = train(tiny(steps=20), str(tmp_path / "full"), progress=False)
    with monkeypatch.context() as patch:
        poison_batches(patch, set(range(11, 20)))
        run_dir = str(tmp_path / "run")
        with pytest.raises(TrainingDiverged) as err:
            train(tiny(steps=20, max_nonfinite_steps=3), run_dir, progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert message == (f"training stopped at step 14: 3 consecutive non-finite steps (max_nonfinite_steps=3), "
                       f"the first at step 12: ELBO term recon = nan; last good checkpoint: "
                       f"{checkpoint_path(run_dir)} (step 10)")
    assert_finite_checkpoint(run_dir, 10)
    assert [m["step"] for m in read_metrics(run_dir) if m["skipped"]] == [12, 13, 14]
    resumed = train(tiny(steps=20), run_dir, resume=True, progress=False)
    for name, value in full.state_dict().items():
        assert_close(resumed.state_dict()[name], value, tol=TRAINING, what=f"resumed {name}")
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 21))


def test_a_nonfinite_gradient_is_named(tmp_path, monkeypatch):
    """A finite loss with a NaN gradient (injected after the gradient averaging) is skipped too,
    and the message names the parameter."""
    import sta.distributed

    real = sta.distributed.average_gradients
    calls = []

    def average_gradients(params, world):
        params = list(params)
        real(params, world)
        calls.append(1)
        if len(calls) >= 3:
            params[1].grad[0] = float("nan")

    monkeypatch.setattr(sta.distributed, "average_gradients", average_gradients)
    with pytest.raises(TrainingDiverged, match=r"at step 4: 2 consecutive non-finite steps .*the first at step 3: "
                                               r"gradient of \S+ = nan; last good checkpoint: .* \(step 0\)$"):
        train(tiny(steps=20, max_nonfinite_steps=2), str(tmp_path / "run"), progress=False)
    assert_finite_checkpoint(str(tmp_path / "run"), 0)


def test_an_update_that_breaks_a_parameter_stops_at_once(tmp_path, monkeypatch):
    """A finite gradient that overflows a parameter cannot be skipped: the run stops at that step
    and the checkpoint on disk (step 10) keeps its finite parameters."""
    real_step = torch.optim.Adam.step
    calls = []

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 12:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    run_dir = str(tmp_path / "run")
    with pytest.raises(TrainingDiverged, match=r"^training stopped at step 12: the update made parameter \S+ = inf; "
                                               r"last good checkpoint: .* \(step 10\)$"):
        train(tiny(steps=20), run_dir, progress=False)
    assert_finite_checkpoint(run_dir, 10)


def test_a_diverged_run_resumes_with_a_smaller_lr(tmp_path):
    """lr=1000 diverges within a few steps (the issue's reproduction); the step-0 checkpoint is the
    last good one, and resuming it with ``update={"lr": 3e-3}`` is the run that used 3e-3 from the start."""
    run_dir = str(tmp_path / "run")
    with pytest.raises(TrainingDiverged, match=r"ELBO term \w+ = (nan|inf|-inf); last good checkpoint: .*\(step 0\)"):
        train(tiny(lr=1000.0), run_dir, progress=False)
    assert_finite_checkpoint(run_dir, 0)
    assert any(m["skipped"] for m in read_metrics(run_dir))
    resumed = train(tiny(), run_dir, resume=True, progress=False, update={"lr": 3e-3})
    assert json.load(open(os.path.join(run_dir, "config.json")))["lr"] == 3e-3
    fresh = train(tiny(), str(tmp_path / "fresh"), progress=False)
    for name, value in fresh.state_dict().items():
        assert_close(resumed.state_dict()[name], value, tol=TRAINING, what=f"resumed {name}")
    with pytest.raises(ConfigError, match=r"update: \['model'\] cannot change when resuming"):
        train(tiny(), run_dir, resume=True, progress=False, update={"model": {}})
    with pytest.raises(ConfigError, match="update: only with resume=True"):
        train(tiny(), str(tmp_path / "other"), progress=False, update={"lr": 1e-3})


@pytest.mark.parametrize("stored", ["elapsed", "old checkpoint"])
def test_metrics_time_continues_after_resume(tmp_path, stored):
    """``time`` goes on from the checkpoint's elapsed time (a checkpoint without one, written before
    it was stored: from the last logged time), not from 0."""
    run_dir = str(tmp_path / "run")
    train(tiny(steps=10), run_dir, progress=False)
    if stored == "old checkpoint":
        ckpt = torch.load(checkpoint_path(run_dir), weights_only=False)
        del ckpt["elapsed"]
        save_atomic(ckpt, checkpoint_path(run_dir))
    train(tiny(steps=20), run_dir, resume=True, progress=False)
    times = [m["time"] for m in read_metrics(run_dir)]
    assert len(times) == 20 and times == sorted(times) and times[10] > times[9] > 0, times


def test_progress_bar_draws_the_final_line_once_with_every_term(tmp_path, capsys):
    train(tiny(steps=5), str(tmp_path / "run"), progress=True)
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    final = [line for line in lines if "5/5" in line]
    assert len(final) == 1, lines
    for term in ("loss", "recon", "kl_z0", "kl_path", "kl_spike", "kl_slab", "hj", "div"):
        assert f" {term}=" in final[0], final[0]


def test_bad_resume_and_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a run directory"):
        train(tiny(steps=2), str(tmp_path / "nothing"), resume=True, progress=False)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ConfigError, match="steps: expected a positive int"):
        tiny(steps=-1).validate()
    with pytest.raises(ConfigError, match="unknown key"):
        tiny(**{"model.width": 3})
    with pytest.raises(ConfigError, match="compile: expected true or false"):
        tiny(compile="yes").validate()


def test_compile_switch_trains_through_torch_compile(tmp_path, monkeypatch):
    """TrainConfig.compile hands model.elbo to torch.compile once and trains with what it returns
    (the compile itself takes ~45 s on the tiny preset: measured in benchmarks/bench_train.py)."""
    compiled = []

    def spy(fn, **kwargs):
        compiled.append(fn)

        def run(*args, **kw):
            run.calls += 1
            return fn(*args, **kw)

        run.calls = 0
        compiled.append(run)
        return run

    monkeypatch.setattr(torch, "compile", spy)
    eager = train(tiny(steps=3), str(tmp_path / "eager"), progress=False)
    assert not compiled
    model = train(tiny(steps=3, compile=True), str(tmp_path / "compiled"), progress=False)
    assert len(compiled) == 2 and compiled[0].__self__ is model and compiled[0].__name__ == "elbo"
    assert compiled[1].calls == 3
    for p, q in zip(model.parameters(), eager.parameters()):  # the same run: only the call path differs
        assert torch.equal(p, q)


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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_training_pins_the_thread_count(monkeypatch):
    """TrainConfig.threads (default 1) holds inside every training step whatever the caller set, and
    the caller's setting is restored afterwards; None leaves torch's setting alone."""
    from sta.models.base import STAModel

    seen = []
    real_elbo = STAModel.elbo

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_elbo(self, *args, **kwargs)

    monkeypatch.setattr(STAModel, "elbo", spy)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        train(apply_overrides(preset("tiny"), ["steps=2"]), progress=False)
        assert seen == [1, 1] and torch.get_num_threads() == 2
        seen.clear()
        train(apply_overrides(preset("tiny"), ["steps=2", "threads=null"]), progress=False)
        assert seen == [2, 2]
    finally:
        torch.set_num_threads(before)
    assert preset("quick").threads == 1 and preset("paper").threads is None
    with pytest.raises(ConfigError, match="threads: expected None or a positive int, got 0"):
        apply_overrides(preset("tiny"), ["threads=0"]).validate()
