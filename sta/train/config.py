"""Run configuration: :class:`TrainConfig`, the named presets and ``--set KEY=VALUE`` overrides.

A run's ``config.json`` is ``TrainConfig.to_dict()``; :func:`read_config` reads it back.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields as dataclass_fields
from typing import Optional

import torch

from ..models import ModelConfig

__all__ = ["ConfigError", "PRECISIONS", "TrainConfig", "PRESETS", "preset", "apply_overrides", "read_config"]


class ConfigError(ValueError):
    """A bad configuration (unknown preset, key or value); the CLI prints it on one line."""


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
    threads: torch intra-op threads while training (None = leave torch's setting alone). 1 by
        default, whatever OMP_NUM_THREADS or the core count say: the float sums of a matmul or conv
        are split differently over 1 or 2 threads, and training amplifies the last-bit differences
        (the issue that asked for this measured sta, digits, seed 0: equivariance 0.0616 with one
        thread, 0.0667 with two), so a seed gives one result only at a fixed thread count. On
        2 vCPUs two 1-thread runs at a time had 1.7x the throughput of one 2-thread run. The
        ``paper`` preset (78M parameters) leaves it to torch.
    compile: run ``model.elbo`` through ``torch.compile`` (the flow ops are registered torch ops with
        fake kernels, so the graph holds them as single nodes). Off by default: since the conv nets
        compute in channels-last layout it gains nothing at the paper's sizes (batch 32: 0.166 s
        against 0.162 s eager, benchmarks/results/train_cpu.md) and pays only at D 512, batch 32
        (1.09 s against 1.37 s), after a 25-40 s compile (15 s with a warm cache); it needs a C++
        compiler at run time, and compiled float sums move a seed's result.
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
    threads: Optional[int] = 1
    compile: bool = False

    def validate(self) -> "TrainConfig":
        from ..data import DATASETS

        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset: expected one of {DATASETS}, got {self.dataset!r}")
        for name in ("T", "num_sequences", "eval_sequences", "steps", "batch_size", "checkpoint_every", "log_every",
                     "max_nonfinite_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}: expected a positive int, got {value!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ConfigError(f"threads: expected None or a positive int, got {self.threads!r}")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile: expected true or false, got {self.compile!r}")
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
        from ..data import SPECS

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
        threads=None,
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
