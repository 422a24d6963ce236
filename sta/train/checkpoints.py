"""Checkpoints of a run directory: atomic writes, every rank's RNG state, loading a trained run.

``checkpoints/last.pt`` holds ``{"model", "optimizer", "step", "rng" (one entry per rank),
"config", "elapsed"}``; it is written only from finite parameters (:mod:`sta.train.loop`).
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from ..models import STAModel
from .config import ConfigError, TrainConfig, read_config

__all__ = ["rng_state", "set_rng_state", "save_atomic", "checkpoint_path", "load_checkpoint", "load_run"]


def rng_state() -> dict:
    """This process's torch / numpy / python (and CUDA) RNG state, for a checkpoint."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Restore a state from :func:`rng_state` (a resumed run draws the same noise)."""
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
    """The one checkpoint of a run directory: ``RUN/checkpoints/last.pt``."""
    return os.path.join(run_dir, "checkpoints", "last.pt")


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
