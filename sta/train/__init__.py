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

Modules: :mod:`~sta.train.config` (:class:`TrainConfig`, presets, ``--set`` overrides),
:mod:`~sta.train.loop` (:func:`train`: data order, schedules, the non-finite guard),
:mod:`~sta.train.checkpoints` (atomic checkpoints, RNG states, :func:`load_run`) and
:mod:`~sta.train.metrics` (``metrics.jsonl`` lines, the progress bar). Import from ``sta.train``.
"""
from .checkpoints import checkpoint_path, load_checkpoint, load_run, save_atomic
from .config import PRECISIONS, PRESETS, ConfigError, TrainConfig, apply_overrides, preset, read_config
from .loop import RESUME_KEYS, Schedule, TrainingDiverged, batch_indices, load_data, schedules, train
from .metrics import progress_bar

__all__ = ["TrainConfig", "PRESETS", "PRECISIONS", "RESUME_KEYS", "preset", "apply_overrides", "read_config",
           "train", "load_run", "load_checkpoint", "checkpoint_path", "save_atomic", "load_data",
           "batch_indices", "Schedule", "schedules", "progress_bar", "ConfigError", "TrainingDiverged"]
