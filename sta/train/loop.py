"""The training loop: data order, schedules, the non-finite guard, data-parallel steps.

:func:`train` runs one process's share of a run (``torchrun`` starts one per rank, see
:mod:`sta.distributed`); the run directory it writes is described in :mod:`sta.train`.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import replace
from typing import NamedTuple, Optional

import numpy as np
import torch

from .. import distributed
from ..models import STAModel
from .checkpoints import checkpoint_path, load_checkpoint, rng_state, save_atomic, set_rng_state
from .config import PRECISIONS, ConfigError, TrainConfig, read_config
from .metrics import bar_postfix, json_record, progress_bar, truncate_metrics

__all__ = ["TrainingDiverged", "RESUME_KEYS", "train", "load_data", "batch_indices", "Schedule", "schedules"]


class TrainingDiverged(RuntimeError):
    """The loss or gradients stayed non-finite for ``max_nonfinite_steps`` consecutive steps (or an
    update made a parameter non-finite). The message is one line: the step, the first non-finite
    ELBO term or gradient, and the last good checkpoint, which holds finite parameters."""


def load_data(config: TrainConfig, split: str = "train", single: bool = False, num_sequences=None):
    """The dataset of a run: ``(x: (N, T+1, C, S, S) float32, dataset)``."""
    from ..data import make_dataset

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


class Schedule(NamedTuple):
    """What changes over a run, at one step."""

    temperature: float  # of the Gumbel-sigmoid spikes
    slab: bool  # speeds sampled from the slab (False: fixed at 1, spike-only phase)
    kl_weight: float  # weight of the KL terms in the loss (KL warm-up), in [0, 1]


def schedules(config: TrainConfig, step: int) -> Schedule:
    """The :class:`Schedule` at ``step``."""
    from ..priors import temperature_schedule

    warmup_steps = config.kl_warmup * config.steps
    kl_weight = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    return Schedule(temperature_schedule(int(step * config.anneal_speedup)),
                    step >= config.slab_start * config.steps, kl_weight)


#: What ``train(..., resume=True, update={...})`` may change in a stored run: the optimisation knobs
#: (the model, data, seed and schedules define the run and stay as stored).
RESUME_KEYS = ("lr", "grad_clip", "max_nonfinite_steps", "log_every", "checkpoint_every", "compile")


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
    caller_threads = torch.get_num_threads()
    try:
        return _train(config, out, resume, progress, ctx, update)
    finally:
        torch.set_num_threads(caller_threads)
        distributed.teardown()


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


def _train(config: TrainConfig, out, resume, progress, ctx, update) -> STAModel:
    if resume:
        if out is None or not os.path.exists(os.path.join(out, "config.json")):
            raise ConfigError(f"--resume: {out!r} is not a run directory (no config.json)")
        stored = read_config(os.path.join(out, "config.json"))
        config = replace(stored, steps=max(config.steps, stored.steps), **update).validate()
    if config.batch_size % ctx.world:
        raise ConfigError(f"batch_size: {config.batch_size} is not divisible by the {ctx.world} processes")

    if config.threads is not None:  # pinned: a seed gives one result (TrainConfig.threads)
        torch.set_num_threads(config.threads)
    x_all, ds = load_data(config, "train")
    config.model = replace(config.model, channels=ds.channels, image_size=ds.image_size, transitions=ds.T)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = STAModel(config.model).to(ctx.device)
    model.network_dtype = PRECISIONS[config.precision]
    if ctx.main:  # the sizes of the run, at its start (the paper preset: 78.6M parameters)
        from ..models.nets_authors import parameter_counts

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
        set_rng_state(ckpt["rng"][ctx.rank])
    if ctx.main and out:
        os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2)
        last_time = truncate_metrics(os.path.join(out, "metrics.jsonl"), step)
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
        states = distributed.gather_objects(rng_state(), ctx.world)
        if ctx.main and out:
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": at,
                         "rng": states, "config": config.to_dict(),
                         "elapsed": time.perf_counter() - start}, ckpt_file)
        last_good = at

    if step == 0:
        checkpoint(0)  # a run that diverges before its first periodic checkpoint still has a good one

    # torch.compile: the first steps compile (and recompile once the schedule's floats vary and once
    # the slab phase starts), later steps reuse the graphs.
    elbo = torch.compile(model.elbo) if config.compile else model.elbo
    bar = progress_bar(config.steps, f"{config.model.model} {config.dataset}", progress and ctx.main, step)
    metrics_file = open(os.path.join(out, "metrics.jsonl"), "a") if (ctx.main and out) else None
    nonfinite, first_nonfinite, skipped_total = 0, None, 0
    model.train()
    try:
        while step < config.steps:
            idx = batch_indices(step, x_all.shape[0], config.batch_size, config.seed, ctx.rank, ctx.world)
            x = x_all[idx].to(ctx.device)
            temperature, slab, kl_weight = schedules(config, step)
            terms = elbo(x, temperature=temperature, slab=slab, kl_weight=kl_weight)
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
                metrics_file.write(json_record(record) + "\n")
                metrics_file.flush()
            bar.set_postfix_str(bar_postfix(scalars, skipped_total), refresh=False)
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
