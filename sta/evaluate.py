"""Evaluation of a trained run (docs/maths.md section 6): ``sta evaluate RUN_DIR`` -> RUN_DIR/eval.json.

Metrics, on the run's test split (sequences the model never saw, split by source image):

* ``nelbo_per_sequence`` / ``nelbo_per_frame``: the negative ELBO of docs/maths.md 4.3 in nats (one
  posterior sample per sequence, the final Gumbel-sigmoid temperature, slab on), and each term.
* ``nll_x0_iw``: minus the importance-weighted bound of log p(x_0) (``iw_samples`` samples).
* ``equivariance_error``: encode x_0 (posterior mean), infer the coefficients from consecutive
  frames (hard spikes, speed = slab location), roll z forward with the flow, decode (mean image),
  mean per-image L1 error against the true frames 1..T; overall on the combination split and per
  transformation on the single-transformation split (frame t+1 counts for the transformation
  active at step t).
* ``identification_accuracy``: on the single-transformation split, the accuracy of the best
  one-to-one matching (Hungarian, scipy) between learned fields (argmax of the spike posterior
  per step) and true transformations; chance is 1/K. ``identification_f1``: on the combination
  split, micro F1 of the predicted active set (spike posterior > 1/2) mapped through that matching.
  ``identification_counts[k][j]``: single-transformation steps of true transformation j whose
  argmax field is k (what the matching is computed from: which transformations a model confuses);
  ``identification_per_transformation``: per true transformation, the fraction of its steps whose
  argmax field is the one matched to it.
  For "dense" the score is the inferred speed (active if > 1/2), for "slowvae" |g| (see below);
  "static" and "betavae" have no coefficients, so both are None (n/a).
* How a model without fields is rolled forward: "linear" moves z along its learned directions;
  "slowvae" along the K principal directions of its latent steps, with coefficients projected from
  the encodings of consecutive frames (sta.models.slowvae); "static" and "betavae" do not move.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch
from torch import Tensor

from .train import load_data, load_run, progress_bar, schedules

__all__ = ["evaluate", "equivariance_errors", "identification_counts", "match_counts", "match_fields", "format_table"]


def _chunks(x: Tensor, batch_size: int, bar=None):
    """``x.split(batch_size)``, advancing the progress ``bar`` (if any) by each chunk's sequences."""
    for chunk in x.split(batch_size):
        yield chunk
        if bar is not None:
            bar.update(chunk.shape[0])


@torch.no_grad()
def equivariance_errors(model, x: Tensor, batch_size: int = 64, bar=None) -> Tensor:
    """Per-image L1 error of the rolled-forward prediction: ``x: (N, T+1, C, S, S) -> (N, T)``.
    bar: an optional progress bar advanced by the sequences done."""
    out = []
    for chunk in _chunks(x, batch_size, bar):
        mu, _ = model.encode(chunk[:, 0])
        g, _ = model.infer_coefficients(chunk)
        z = model.rollout(mu, g)  # (B, T+1, D)
        pred = model.mean_image(z[:, 1:].flatten(0, 1)).view_as(chunk[:, 1:])
        out.append((pred - chunk[:, 1:]).abs().flatten(2).mean(2))
    return torch.cat(out)


@torch.no_grad()
def field_scores(model, x: Tensor, batch_size: int = 64, bar=None) -> Tensor:
    """Per-step activation score of each learned field: ``(N, T, K)`` (the kind's score from
    ``infer_coefficients``: spike probability, the speed for "dense", |coefficient| for "slowvae";
    with double control, the larger of the potential and rotational scores)."""
    scores = torch.cat([model.infer_coefficients(chunk)[1] for chunk in _chunks(x, batch_size, bar)])
    return model.coefficients.per_field(scores)


def identification_counts(pred: Tensor, true: Tensor, num_fields: int, num_true: int) -> Tensor:
    """``(num_fields, num_true)`` float64: counts[k, j] = steps of true transformation j whose
    learned field is k; pred, true: ``(M,)`` int labels of single-transformation steps."""
    counts = torch.zeros(num_fields, num_true, dtype=torch.float64)
    counts.index_put_((pred, true), torch.ones(pred.shape[0], dtype=torch.float64), accumulate=True)
    return counts


def match_fields(pred: Tensor, true: Tensor, num_fields: int, num_true: int) -> tuple[list, float]:
    """Best one-to-one matching of learned fields to true transformations.

    pred, true: ``(M,)`` int labels (learned field, true transformation) of single-transformation
    steps. Returns ``(assignment, accuracy)``: assignment[k] = the true transformation matched to
    field k (or None), accuracy = fraction of steps whose field is matched to their transformation.
    """
    return match_counts(identification_counts(pred, true, num_fields, num_true))


def match_counts(counts: Tensor) -> tuple[list, float]:
    """:func:`match_fields` on the counts of :func:`identification_counts`."""
    num_fields, num_true = counts.shape
    try:
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(-counts.numpy())
        pairs = list(zip(rows.tolist(), cols.tolist()))
    except ImportError:  # brute force over permutations (small K only)
        import itertools

        best, pairs = -1.0, []
        for perm in itertools.permutations(range(num_true), min(num_fields, num_true)):
            value = sum(counts[k, j].item() for k, j in enumerate(perm))
            if value > best:
                best, pairs = value, list(enumerate(perm))
    assignment = [None] * num_fields
    for k, j in pairs:
        assignment[k] = j
    matched = sum(counts[k, j].item() for k, j in pairs)
    return assignment, matched / max(counts.sum().item(), 1)


def _f1(scores: Tensor, active: Tensor, assignment: list, threshold: float = 0.5) -> float:
    """Micro F1 of predicted vs true active sets; scores: (N, T, K), active: (N, T, K_true)."""
    predicted = torch.zeros_like(active, dtype=torch.bool)
    for k, j in enumerate(assignment):
        if j is not None:
            predicted[..., j] |= scores[..., k] > threshold
    truth = active > 0.5
    tp = (predicted & truth).sum().item()
    fp = (predicted & ~truth).sum().item()
    fn = (~predicted & truth).sum().item()
    return 2 * tp / max(2 * tp + fp + fn, 1)


@torch.no_grad()
def evaluate(run_dir: str, iw_samples: int = 64, batch_size: int = 64, write: bool = True,
             progress: bool = False) -> dict:
    """Compute every metric of a run directory; writes RUN_DIR/eval.json and returns the dict.

    progress: a bar on stderr naming the metric being computed (the quick preset's evaluation
    takes about a minute on 2 CPU cores)."""
    config, model, ckpt = load_run(run_dir)
    torch.manual_seed(config.seed + 12345)  # the ELBO and IW bound are stochastic: fix their noise
    x, ds = load_data(config, "test")
    xs, ds_single = load_data(config, "test", single=True)
    active = ds.tensors()["active"]
    active_single = ds_single.tensors()["active"]
    names = list(ds.transformations)
    T = x.shape[1] - 1
    temperature = schedules(config, ckpt["step"]).temperature
    # the bar counts sequences through each pass: ELBO, IW bound, equivariance (combinations, single);
    # the identification passes are added when the model has coefficients
    bar = progress_bar(3 * x.shape[0] + xs.shape[0], "evaluate", progress)

    bar.set_description_str("evaluate: ELBO")
    sums, n = {}, 0
    for chunk in _chunks(x, batch_size, bar):
        terms = model.elbo(chunk, temperature=temperature, slab=True).scalars()
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + value * chunk.shape[0]
        n += chunk.shape[0]
    terms = {key: value / n for key, value in sums.items()}
    bar.set_description_str(f"evaluate: IW bound ({iw_samples} samples)")
    iw = torch.cat([model.iw_bound(chunk[:, 0], iw_samples) for chunk in _chunks(x, batch_size, bar)])

    bar.set_description_str("evaluate: equivariance")
    err = equivariance_errors(model, x, batch_size, bar)
    err_single = equivariance_errors(model, xs, batch_size, bar)
    which = active_single.argmax(-1)  # (N, T) the one true transformation of each step
    per_transformation = {name: err_single[which == j].mean().item() for j, name in enumerate(names)}

    result = {
        "run_dir": os.path.abspath(run_dir),
        "model": config.model.model,
        "dataset": config.dataset,
        "step": ckpt["step"],
        "test_sequences": int(x.shape[0]),
        "frames_per_sequence": T + 1,
        "nelbo_per_sequence": terms["nelbo"],
        "nelbo_per_frame": terms["nelbo"] / (T + 1),
        "elbo_terms": terms,
        "nll_x0_iw": -iw.mean().item(),
        "iw_samples": iw_samples,
        "equivariance_error": err.mean().item(),
        "equivariance_error_single": err_single.mean().item(),
        "equivariance_error_per_transformation": per_transformation,
        "identification_accuracy": None,
        "identification_chance": 1.0 / len(names),
        "identification_f1": None,
        "identification_counts": None,
        "identification_per_transformation": None,
        "field_assignment": None,
    }
    if model.has_transitions:  # static, betavae: no coefficients, identification n/a
        bar.total += xs.shape[0] + x.shape[0]
        bar.set_description_str("evaluate: identification")
        scores_single = field_scores(model, xs, batch_size, bar)
        counts = identification_counts(scores_single.argmax(-1).flatten(), which.flatten(),
                                       scores_single.shape[-1], len(names))
        assignment, accuracy = match_counts(counts)
        per_transformation = {}
        for j, name in enumerate(names):
            matched = [k for k, jj in enumerate(assignment) if jj == j]
            total = counts[:, j].sum().item()
            per_transformation[name] = counts[matched, j].sum().item() / total if total else None
        scores = field_scores(model, x, batch_size, bar)
        result.update(identification_accuracy=accuracy, identification_f1=_f1(scores, active, assignment),
                      identification_counts=[[int(c) for c in row] for row in counts.tolist()],
                      identification_per_transformation=per_transformation,
                      field_assignment=[None if j is None else names[j] for j in assignment])
    bar.close()
    if write:
        with open(os.path.join(run_dir, "eval.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result


def _fmt(value: Optional[float], digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.1f}"


def format_table(result: dict) -> str:
    """The metrics of one evaluation as an aligned text table."""
    rows = [
        ("negative ELBO / sequence (nats)", _fmt(result["nelbo_per_sequence"], 6)),
        ("negative ELBO / frame (nats)", _fmt(result["nelbo_per_frame"], 6)),
        (f"-IW bound log p(x_0), {result['iw_samples']} samples", _fmt(result["nll_x0_iw"], 6)),
        ("equivariance error (L1, combinations)", _fmt(result["equivariance_error"])),
    ]
    for name, value in result["equivariance_error_per_transformation"].items():
        rows.append((f"  single {name}", _fmt(value)))
    rows += [
        (f"identification accuracy (chance {result['identification_chance']:.2f})",
         _fmt(result["identification_accuracy"])),
    ]
    for name, value in (result.get("identification_per_transformation") or {}).items():
        rows.append((f"  single {name}", _fmt(value)))
    rows += [("identification F1 (combinations)", _fmt(result["identification_f1"]))]
    for key in ("recon", "kl_z0", "kl_path", "kl_spike", "kl_slab", "hj", "div"):
        rows.append((f"  ELBO term {key}", _fmt(result["elbo_terms"][key], 6)))
    width = max(len(r[0]) for r in rows)
    head = f"{result['model']} on {result['dataset']}, step {result['step']}, {result['test_sequences']} test sequences"
    return "\n".join([head] + [f"{name:<{width}}  {value}" for name, value in rows])
