"""Training: dataclass configs with named presets, a resumable loop, data-parallel over processes.

    sta train [--preset quick] [--steps N] [--out RUN_DIR] [--resume] [--model sta] [--dataset digits]
    torchrun --nproc_per_node=2 -m sta train ...

A run directory holds ``config.json`` (the full :class:`TrainConfig`), ``metrics.jsonl`` (one JSON
line per logged step with every ELBO term; strict JSON: a NaN/Inf value is written as null),
``checkpoints/last.pt`` (written atomically: temp file + ``os.replace``; a fresh run writes one at
step 0) and, after ``sta evaluate`` / ``sta plot``, ``eval.json`` and ``plots/``.

Non-finite steps. A step whose loss (any ELBO term) or gradient holds a NaN/Inf is skipped: no
parameter update, logged with ``"skipped": true``. ``max_nonfinite_steps`` consecutive skipped steps
stop the run with :class:`TrainingDiverged`, whose one-line message names the step and the first
non-finite ELBO term (or ``gradient of <parameter>``). A checkpoint is written only from finite
parameters, so ``checkpoints/last.pt`` is always the last good state; ``train(..., resume=True,
update={"lr": ...})`` (``sta train --out RUN --resume --set lr=...``) continues from it.

Reproducibility. The data order is a pure function of (seed, step): epoch e uses the permutation
drawn from ``seed`` and e, and step i takes the i-th batch of it, rank r every world-th index. The
model's noise (z_0, spikes, speeds) comes from the global torch RNG, seeded per rank. A
checkpoint stores the model, the optimizer, the step and every rank's torch / numpy / python RNG
state, so ``--resume`` continues exactly where the run stopped (the test checks the parameters of
a resumed run against an uninterrupted one).
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields as dataclass_fields, replace
from typing import NamedTuple, Optional

from tqdm import tqdm

import numpy as np
import torch

from . import distributed
from .model import MODELS, ModelConfig, STAModel

__all__ = ["TrainConfig", "PRESETS", "RESUME_KEYS", "preset", "apply_overrides", "train", "load_run",
           "ConfigError", "TrainingDiverged"]


class ConfigError(ValueError):
    """A bad configuration (unknown preset, key or value); the CLI prints it on one line."""


class TrainingDiverged(RuntimeError):
    """The loss or gradients stayed non-finite for ``max_nonfinite_steps`` consecutive steps (or an
    update made a parameter non-finite). The message is one line: the step, the first non-finite
    ELBO term or gradient, and the last good checkpoint, which holds finite parameters."""


#: TrainConfig.precision -> the dtype the networks run in under autocast (None: no autocast)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class TrainConfig:
    """Everything a run needs. ``model`` holds the :class:`ModelConfig`; the data-dependent model
    sizes (channels, image_size, transitions) are filled in from the dataset.

    preset: name it started from.  dataset: one of sta.data.DATASETS.  T: transitions per sequence.
    image_size: None = the dataset's default.  num_sequences / eval_sequences: train / test sizes.
    steps: optimizer steps.  batch_size: global batch (split over ranks).  lr: Adam learning rate.
    slab_start: fraction of the run before which speeds are fixed at 1 (spike-only phase).
    kl_warmup: fraction of the run over which the weight of the KL terms in the loss rises linearly
        from 0 to 1 (KL warm-up; 0 = off). The logged nelbo is always the unweighted bound.
    anneal_speedup: the temperature at step i is ``temperature_schedule(i * anneal_speedup)``, so a
        short run can reach the annealed regime of the authors' 100k-step schedule.
    checkpoint_every / log_every: in steps.  grad_clip: max global grad norm (None = off).
    max_nonfinite_steps: a step with a NaN/Inf loss term or gradient is skipped (no update); this
        many consecutive skipped steps stop the run (TrainingDiverged). 5: a one-off bad batch or
        Gumbel sample is stepped over, while a diverged run (lr too large: every later step is NaN)
        stops within seconds instead of training on NaN.
    device: "auto", "cpu" or "cuda".  seed: everything random derives from it.
    precision: "fp32" or "bf16": the encoder, decoder and posterior networks run under bf16
        autocast (their outputs are cast back to float32); the fields, divergences, log-densities
        and ELBO sums stay float32 on every backend (:attr:`sta.models.base.STAModel.network_dtype`).
    """

    preset: str = "quick"
    dataset: str = "digits"
    model: ModelConfig = field(default_factory=ModelConfig)
    T: int = 8
    image_size: Optional[int] = None
    num_sequences: int = 1000
    eval_sequences: int = 200
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    slab_start: float = 0.3
    kl_warmup: float = 0.0
    anneal_speedup: float = 1.0
    checkpoint_every: int = 250
    log_every: int = 10
    grad_clip: Optional[float] = 1000.0
    max_nonfinite_steps: int = 5
    device: str = "cpu"
    seed: int = 0
    precision: str = "fp32"

    def validate(self) -> "TrainConfig":
        from .data import DATASETS

        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset: expected one of {DATASETS}, got {self.dataset!r}")
        for name in ("T", "num_sequences", "eval_sequences", "steps", "batch_size", "checkpoint_every", "log_every",
                     "max_nonfinite_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}: expected a positive int, got {value!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision: expected one of {tuple(PRECISIONS)}, got {self.precision!r}")
        if self.batch_size > self.num_sequences:
            raise ConfigError(f"batch_size: {self.batch_size} is larger than num_sequences ({self.num_sequences})")
        numbers = {"lr": self.lr, "slab_start": self.slab_start, "kl_warmup": self.kl_warmup,
                   "anneal_speedup": self.anneal_speedup}
        if self.grad_clip is not None:
            numbers["grad_clip"] = self.grad_clip
        for name, value in numbers.items():  # strings from --set would fail later with a TypeError
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr: expected a positive float, got {self.lr!r}")
        for name in ("slab_start", "kl_warmup"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}: expected a fraction in [0, 1], got {getattr(self, name)!r}")
        if self.anneal_speedup <= 0 or (self.grad_clip is not None and self.grad_clip <= 0):
            raise ConfigError("anneal_speedup and grad_clip: expected > 0 (grad_clip None = off)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device: expected 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device: 'cuda' requested but torch {torch.__version__} sees no CUDA device")
        from .data import SPECS

        min_size = SPECS[self.dataset].min_size
        if self.image_size is not None and (isinstance(self.image_size, bool) or not isinstance(self.image_size, int)
                                            or self.image_size < min_size):
            raise ConfigError(f"image_size: expected None or an int >= {min_size} for {self.dataset}, "
                              f"got {self.image_size!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        known = {f.name for f in dataclass_fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"config: unknown keys {unknown}")
        if not isinstance(d.get("model", {}), dict):
            raise ConfigError(f"model: expected a mapping of ModelConfig entries, got {d['model']!r}")
        try:
            d["model"] = ModelConfig.from_dict(d.get("model", {}))
            return cls(**d)
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None


def _quick() -> TrainConfig:
    # Sized so one model trains in about 5 minutes on 2 CPU cores (see benchmarks/bench_models.py).
    # 2000 steps, not 1000 (digits, seed 0): equivariance error sta 0.085 -> 0.070, linear
    # 0.079 -> 0.064, static 0.134 -> 0.128.
    # anneal_speedup 25 reaches the same final temperature (0.22) as 50 did over 1000 steps.
    # kl_warmup 0.2: without it, sta with seed 1 switched every spike off within 130 steps and never
    # recovered (equivariance 0.133, the static model's; at sigma = 1 the diffusion prior charges
    # each active field ~(T - t) nats of path KL, more than an untrained field gains in
    # reconstruction). With it, sta seeds 0 / 1: 0.0675 / 0.0653 (seed 0 was 0.0697 without).
    # field_weight_scale 0.1 (ModelConfig default) on top: 0.0616 / 0.0614, linear 0.0625 / 0.0633.
    return TrainConfig(
        preset="quick",
        model=ModelConfig(latent=16, num_fields=3, hidden=32, conv=16),
        T=8, image_size=28, num_sequences=1000, steps=2000, batch_size=32, lr=1e-3,
        slab_start=0.3, kl_warmup=0.2, anneal_speedup=25.0, checkpoint_every=250,
    )


def _paper() -> TrainConfig:
    # The authors' MNIST experiment: real MNIST (extra sta[mnist]), their networks (arch "authors":
    # 70.9M parameters in the VAE, 6.7M in the posterior at width conv = 100), latent 324, K = 3,
    # T = 8 transitions, batch 128, Adam 1e-4. Smoke run: benchmarks/results/paper_smoke_mnist.md.
    # kl_warmup 0.1 guards against the spike collapse measured on the quick preset (see _quick);
    # not measured at this size (100k steps are beyond a CPU session).
    return TrainConfig(
        preset="paper", dataset="mnist",
        model=ModelConfig(latent=324, num_fields=3, hidden=324, conv=100, arch="authors"),
        T=8, image_size=28, num_sequences=10000, eval_sequences=1000, steps=100000, batch_size=128,
        lr=1e-4, slab_start=0.5, kl_warmup=0.1, anneal_speedup=1.0, checkpoint_every=2000, log_every=50,
    )


def _tiny() -> TrainConfig:
    # For tests and smoke runs: seconds on one core.
    return TrainConfig(
        preset="tiny",
        model=ModelConfig(latent=6, num_fields=3, hidden=8, conv=8),
        T=3, image_size=16, num_sequences=32, eval_sequences=16, steps=20, batch_size=8, lr=3e-3,
        slab_start=0.5, anneal_speedup=1000.0, checkpoint_every=10, log_every=1,
    )


PRESETS = {"quick": _quick, "paper": _paper, "tiny": _tiny}


def preset(name: str) -> TrainConfig:
    """A fresh copy of the named preset (``quick`` is the default)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """``["steps=5", "model.latent=8", "image_size=none"]`` -> a new config (values parsed as JSON
    when they parse, else kept as strings)."""
    d = config.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set: expected KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = None if raw.lower() == "none" else raw
        target, parts = d, key.split(".")
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):
                raise ConfigError(f"--set: unknown key {key!r}")
            target = target[part]
        if parts[-1] not in target:
            raise ConfigError(f"--set: unknown key {key!r}")
        target[parts[-1]] = value
    return TrainConfig.from_dict(d)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def load_data(config: TrainConfig, split: str = "train", single: bool = False, num_sequences=None):
    """The dataset of a run: ``(x: (N, T+1, C, S, S) float32, dataset)``."""
    from .data import make_dataset

    n = num_sequences or (config.num_sequences if split == "train" else config.eval_sequences)
    seed = config.seed if split == "train" else config.seed + 1
    ds = make_dataset(config.dataset, split=split, num_sequences=n, T=config.T,
                      image_size=config.image_size, seed=seed, single=single)
    return ds.tensors()["x"].float(), ds


def batch_indices(step: int, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """The indices rank ``rank`` trains on at ``step``: a pure function of its arguments.

    Epoch e is the permutation of ``range(n)`` drawn with seed ``(seed, e)``; incomplete final
    batches are dropped. Rank r takes every world-th index of the global batch.
    """
    per_epoch = max(n // batch_size, 1)
    epoch, offset = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    batch = perm[offset * batch_size:(offset + 1) * batch_size]
    return batch[rank::world]


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj, path: str) -> None:
    """torch.save to a temp file in the same directory, then os.replace (atomic on POSIX).

    A failed write removes its temp file and leaves ``path`` untouched; a killed writer leaves
    only a stale ``path.tmpPID``, which nothing reads.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def checkpoint_path(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints", "last.pt")


def read_config(path: str) -> TrainConfig:
    """The :class:`TrainConfig` stored in a run's ``config.json`` (ConfigError if unreadable)."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not a readable config ({err})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return TrainConfig.from_dict(d)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """A checkpoint written by :func:`train` (ConfigError, not a pickle traceback, if it is damaged)."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated / foreign file: unpickling raises many types
        first = (str(err).strip().splitlines() or [""])[0]
        raise ConfigError(f"{path}: unreadable checkpoint ({type(err).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "step", "rng"} <= set(ckpt):
        raise ConfigError(f"{path}: not a checkpoint written by sta train")
    return ckpt


def load_run(run_dir: str, map_location="cpu") -> tuple[TrainConfig, STAModel, dict]:
    """``(config, model with the last checkpoint's weights, checkpoint dict)`` of a run directory."""
    config_file = os.path.join(run_dir, "config.json")
    if not os.path.isdir(run_dir):
        raise ConfigError(f"run directory {run_dir!r} does not exist")
    if not os.path.exists(config_file):
        raise ConfigError(f"{run_dir!r} is not a run directory (no config.json)")
    config = read_config(config_file)
    path = checkpoint_path(run_dir)
    if not os.path.exists(path):
        raise ConfigError(f"{run_dir!r} has no checkpoint ({path}); train it first")
    ckpt = load_checkpoint(path, map_location)
    model = STAModel(config.model)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return config, model, ckpt


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

class Schedule(NamedTuple):
    """What changes over a run, at one step."""

    temperature: float  # of the Gumbel-sigmoid spikes
    slab: bool  # speeds sampled from the slab (False: fixed at 1, spike-only phase)
    kl_weight: float  # weight of the KL terms in the loss (KL warm-up), in [0, 1]


def schedules(config: TrainConfig, step: int) -> Schedule:
    """The :class:`Schedule` at ``step``."""
    from .priors import temperature_schedule

    warmup_steps = config.kl_warmup * config.steps
    kl_weight = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    return Schedule(temperature_schedule(int(step * config.anneal_speedup)),
                    step >= config.slab_start * config.steps, kl_weight)


#: What ``train(..., resume=True, update={...})`` may change in a stored run: the optimisation knobs
#: (the model, data, seed and schedules define the run and stay as stored).
RESUME_KEYS = ("lr", "grad_clip", "max_nonfinite_steps", "log_every", "checkpoint_every")


def train(config: TrainConfig, out: Optional[str] = None, resume: bool = False, progress: bool = True,
          update: Optional[dict] = None) -> STAModel:
    """Train ``config`` (writing to run directory ``out`` when given); returns the model.

    resume: continue from ``out/checkpoints/last.pt`` (the stored config.json wins, except
    ``steps``, which may be raised to extend a run). Runs data-parallel when launched by torchrun.
    update: with ``resume``, entries of the stored config to change, keys from :data:`RESUME_KEYS`
    (e.g. ``{"lr": 1e-4}`` to continue a diverged run from its last good checkpoint).
    Raises :class:`TrainingDiverged` after ``config.max_nonfinite_steps`` consecutive non-finite steps.
    """
    config.validate()
    update = dict(update or {})
    if update and not resume:
        raise ConfigError("update: only with resume=True (set the config itself for a new run)")
    bad = sorted(set(update) - set(RESUME_KEYS))
    if bad:
        raise ConfigError(f"update: {bad} cannot change when resuming; allowed: {list(RESUME_KEYS)}")
    ctx = distributed.setup(config.device)
    try:
        return _train(config, out, resume, progress, ctx, update)
    finally:
        distributed.teardown()


def progress_bar(total: int, desc: str, enabled: bool = True, initial: int = 0) -> tqdm:
    """A tqdm bar on stderr that draws its final state once (see :class:`_Bar`)."""
    return _Bar(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, file=sys.stderr,
                bar_format="{desc} {percentage:3.0f}%|{bar:10}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")


class _Bar(tqdm):
    """tqdm draws the final state on the last ``update`` and again in ``close``: two identical lines
    where stderr is a log or a pipe. Here the last update only counts; ``close`` draws it."""

    def update(self, n=1):
        if self.total is not None and self.n + n >= self.total:
            self.n += n
            return None
        return super().update(n)


def _short(value: float) -> str:
    """A loss value in at most 8 characters for the progress bar: 2333, 9.5, 0.1, 4.12e+32, nan."""
    if abs(value) >= 1e5:
        return f"{value:.3g}"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2g}"


#: The bar shows the objective and every ELBO term (nelbo is their sum, in metrics.jsonl).
_BAR_TERMS = ("loss", "recon", "kl_z0", "kl_path", "kl_spike", "kl_slab", "hj", "div")


def _first_nonfinite_term(scalars: dict) -> Optional[str]:
    """``"ELBO term recon = inf"``: the first term of :class:`~sta.model.ELBOTerms` (in its order:
    recon, kl_z0, ..., nelbo, loss) that is NaN or infinite; None when all are finite."""
    for name, value in scalars.items():
        if not math.isfinite(value):
            return f"ELBO term {name} = {value}"
    return None


def _first_nonfinite(named, what: str) -> Optional[str]:
    """``"gradient of fields.W = nan"``: the first ``(name, tensor)`` of ``named`` holding a NaN/Inf
    (``what`` says which kind of tensor); None when all are finite. One device sync."""
    named = [(name, t) for name, t in named if t is not None and t.is_floating_point()]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(t).all() for _, t in named])
    if bool(finite.all()):
        return None
    name, t = named[int((~finite).nonzero()[0, 0])]
    return f"{what} {name} = {t[~torch.isfinite(t)][0].item()}"


def _json_record(record: dict) -> str:
    """One strict-JSON metrics line: NaN/Inf floats become null (``NaN`` is not JSON)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    return json.dumps(clean, allow_nan=False)


def _train(config: TrainConfig, out, resume, progress, ctx, update) -> STAModel:
    if resume:
        if out is None or not os.path.exists(os.path.join(out, "config.json")):
            raise ConfigError(f"--resume: {out!r} is not a run directory (no config.json)")
        stored = read_config(os.path.join(out, "config.json"))
        config = replace(stored, steps=max(config.steps, stored.steps), **update).validate()
    if config.batch_size % ctx.world:
        raise ConfigError(f"batch_size: {config.batch_size} is not divisible by the {ctx.world} processes")

    x_all, ds = load_data(config, "train")
    config.model = replace(config.model, channels=ds.channels, image_size=ds.image_size, transitions=ds.T)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = STAModel(config.model).to(ctx.device)
    model.network_dtype = PRECISIONS[config.precision]
    if ctx.main:  # the sizes of the run, at its start (the paper preset: 78.6M parameters)
        from .models.nets_authors import parameter_counts

        # stdout: stderr carries only the progress bar and, on an error, the CLI's one line
        print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in parameter_counts(model).items()), flush=True)
    distributed.broadcast_parameters(model, ctx.world)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    step, elapsed = 0, 0.0
    torch.manual_seed(config.seed * 7919 + 1 + ctx.rank)
    np.random.seed((config.seed * 7919 + ctx.rank) % 2**32)
    random.seed(config.seed * 7919 + ctx.rank)

    ckpt_file = checkpoint_path(out) if out else None
    if resume and ckpt_file and os.path.exists(ckpt_file):
        ckpt = load_checkpoint(ckpt_file, ctx.device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:  # the stored groups carry the old lr; `update` may change it
            group["lr"] = config.lr
        step = ckpt["step"]
        elapsed = ckpt.get("elapsed")  # metrics.jsonl `time` continues after a resume
        if len(ckpt["rng"]) != ctx.world:
            raise ConfigError(f"--resume: the checkpoint was written by {len(ckpt['rng'])} processes, "
                              f"this run has {ctx.world}")
        _set_rng_state(ckpt["rng"][ctx.rank])
    if ctx.main and out:
        os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2)
        last_time = _truncate_metrics(os.path.join(out, "metrics.jsonl"), step)
        if elapsed is None:  # a checkpoint written before "elapsed" was stored: the last logged time
            elapsed = last_time or 0.0

    start = time.perf_counter() - (elapsed or 0.0)
    last_good = step if resume and ckpt_file and os.path.exists(ckpt_file) else None

    def where() -> str:
        if not out:
            return "no run directory, nothing saved"
        return f"last good checkpoint: {ckpt_file} (step {last_good})" if last_good is not None else "no checkpoint"

    def checkpoint(at: int) -> None:
        nonlocal last_good
        # Never replace the last good checkpoint with non-finite parameters (every rank checks: the
        # parameters are identical, so every rank raises together).
        bad = _first_nonfinite(model.state_dict().items(), "parameter")
        if bad is not None:
            raise TrainingDiverged(f"training stopped at step {at}: {bad}; {where()}")
        states = distributed.gather_objects(_rng_state(), ctx.world)
        if ctx.main and out:
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": at,
                         "rng": states, "config": config.to_dict(),
                         "elapsed": time.perf_counter() - start}, ckpt_file)
        last_good = at

    if step == 0:
        checkpoint(0)  # a run that diverges before its first periodic checkpoint still has a good one

    bar = progress_bar(config.steps, f"{config.model.model} {config.dataset}", progress and ctx.main, step)
    metrics_file = open(os.path.join(out, "metrics.jsonl"), "a") if (ctx.main and out) else None
    nonfinite, first_nonfinite, skipped_total = 0, None, 0
    model.train()
    try:
        while step < config.steps:
            idx = batch_indices(step, x_all.shape[0], config.batch_size, config.seed, ctx.rank, ctx.world)
            x = x_all[idx].to(ctx.device)
            temperature, slab, kl_weight = schedules(config, step)
            terms = model.elbo(x, temperature=temperature, slab=slab, kl_weight=kl_weight)
            optimizer.zero_grad(set_to_none=True)
            terms.loss.backward()
            scalars = terms.scalars()
            bad = _first_nonfinite_term(scalars)
            if bad is not None and ctx.world > 1:
                # Poison this rank's gradients so the average is NaN on every rank: all ranks then
                # skip the same step without an extra collective (the others report the gradient).
                for p in model.parameters():
                    p.grad = torch.full_like(p, math.nan)
            distributed.average_gradients(model.parameters(), ctx.world)
            if bad is None:
                bad = _first_nonfinite(((n, p.grad) for n, p in model.named_parameters()), "gradient of")
            step += 1
            if bad is None:
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                nonfinite, first_nonfinite = 0, None
                broken = _first_nonfinite(model.named_parameters(), "parameter")
                if broken is not None:  # a finite gradient overflowed a parameter: nothing to skip
                    raise TrainingDiverged(f"training stopped at step {step}: the update made {broken}; {where()}")
            else:
                optimizer.zero_grad(set_to_none=True)
                nonfinite, skipped_total = nonfinite + 1, skipped_total + 1
                first_nonfinite = first_nonfinite or (step, bad)
            if metrics_file and (step % config.log_every == 0 or step == config.steps or bad is not None):
                record = {"step": step, "time": round(time.perf_counter() - start, 3),
                          "temperature": temperature, "slab": slab, "kl_weight": kl_weight,
                          "skipped": bad is not None, **scalars}
                metrics_file.write(_json_record(record) + "\n")
                metrics_file.flush()
            bar.set_postfix_str(" ".join(f"{k}={_short(scalars[k])}" for k in _BAR_TERMS)
                                + (f" skipped={skipped_total}" if skipped_total else ""), refresh=False)
            bar.update(1)
            if nonfinite >= config.max_nonfinite_steps:
                at, what = first_nonfinite
                raise TrainingDiverged(
                    f"training stopped at step {step}: {nonfinite} consecutive non-finite steps "
                    f"(max_nonfinite_steps={config.max_nonfinite_steps}), the first at step {at}: {what}; {where()}")
            if step % config.checkpoint_every == 0 or step == config.steps:
                checkpoint(step)
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    model.eval()
    return model


def _truncate_metrics(path: str, step: int) -> Optional[float]:
    """Drop logged lines after ``step`` (a resumed run logs them again), and a line cut short by a
    kill mid-write (it would not parse). Returns the ``time`` of the last line kept (None if none)."""
    if not os.path.exists(path):
        return None

    def keep(line: str) -> bool:
        try:
            return line.endswith("\n") and json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False

    with open(path) as f:
        lines = [line for line in f if keep(line)]
    with open(path, "w") as f:
        f.writelines(lines)
    return json.loads(lines[-1]).get("time") if lines else None
