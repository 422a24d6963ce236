"""Evaluation (sta/evaluate.py): eval.json has every metric with sane values, the importance-
weighted bound obeys Jensen and sits below the negative ELBO, and the identification metrics
recover a known matching exactly.

Runs are the ``tiny`` preset (16 test sequences of 16x16 digits, T=3), trained in-process.
"""
import json
import math
import os

import pytest
import torch

import sta.evaluate as evaluate_module
from sta.evaluate import _f1, equivariance_errors, evaluate, format_table, identification_counts, match_fields
from sta.model import MODELS, ModelConfig, STAModel
from sta.train import apply_overrides, load_data, load_run, preset, train

KEYS = {"run_dir", "model", "dataset", "step", "test_sequences", "frames_per_sequence", "nelbo_per_sequence",
        "nelbo_per_frame", "elbo_terms", "nll_x0_iw", "iw_samples", "equivariance_error",
        "equivariance_error_single", "equivariance_error_per_transformation", "identification_accuracy",
        "identification_chance", "identification_f1", "identification_counts", "identification_per_transformation",
        "field_assignment"}
TERMS = {"recon", "kl_z0", "kl_path", "kl_spike", "kl_slab", "hj", "div", "nelbo", "loss", "evaluated"}


# Tiny ops: one thread (fixture in conftest.py) avoids OpenMP spin contention on a shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


_RUNS = {}


def tiny_run(model: str, root) -> str:
    """A 20-step tiny run of ``model`` (once per module)."""
    if model not in _RUNS:
        run_dir = os.path.join(str(root), f"run-{model}")
        config = apply_overrides(preset("tiny"), ["steps=20", f'model.model="{model}"'])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            train(config, run_dir, progress=False)
        finally:
            torch.set_num_threads(threads)
        _RUNS[model] = run_dir
    return _RUNS[model]


@pytest.mark.parametrize("model", MODELS)
def test_eval_json_keys_and_sane_values(model, tmp_path_factory):
    run_dir = tiny_run(model, tmp_path_factory.getbasetemp())
    result = evaluate(run_dir, iw_samples=16)
    with open(os.path.join(run_dir, "eval.json")) as f:
        stored = json.load(f)
    assert stored == json.loads(json.dumps(result)), "eval.json differs from the returned metrics"
    assert set(stored) == KEYS and set(stored["elbo_terms"]) == TERMS
    config, _, _ = load_run(run_dir)
    _, ds = load_data(config, "test")
    names = list(ds.transformations)

    assert stored["model"] == model and stored["dataset"] == "digits" and stored["step"] == 20
    assert stored["test_sequences"] == config.eval_sequences and stored["frames_per_sequence"] == config.T + 1
    terms = stored["elbo_terms"]
    assert all(math.isfinite(v) for v in terms.values())
    assert stored["nelbo_per_sequence"] == terms["nelbo"]
    assert stored["nelbo_per_frame"] == pytest.approx(terms["nelbo"] / (config.T + 1))
    assert terms["nelbo"] == pytest.approx(terms["recon"] + terms["kl_z0"] + terms["kl_path"] + terms["kl_spike"]
                                           + terms["kl_slab"], rel=1e-5)
    # -IW bound of log p(x_0) <= E[recon_0 + KL(z_0)] (the one-sample bound of x_0, by Jensen)
    # <= recon + kl_z0 (the recon of frames 1..T is >= 0: Bernoulli NLL of [0, 1] pixels)
    assert math.isfinite(stored["nll_x0_iw"]) and stored["nll_x0_iw"] > 0
    assert stored["nll_x0_iw"] <= terms["recon"] + terms["kl_z0"]
    assert stored["iw_samples"] == 16

    for key in ("equivariance_error", "equivariance_error_single"):
        assert 0.0 <= stored[key] <= 1.0, f"{key} = {stored[key]} (mean L1 of images in [0, 1])"
    per = stored["equivariance_error_per_transformation"]
    assert list(per) == names and all(0.0 <= v <= 1.0 for v in per.values())
    assert stored["identification_chance"] == pytest.approx(1.0 / len(names))
    if model in ("static", "betavae"):  # no coefficients: identification is the one metric that is n/a
        assert stored["identification_accuracy"] is None and stored["identification_f1"] is None
        assert stored["field_assignment"] is None
        assert stored["identification_counts"] is None and stored["identification_per_transformation"] is None
    else:
        assert 0.0 <= stored["identification_accuracy"] <= 1.0
        assert 0.0 <= stored["identification_f1"] <= 1.0
        assignment = stored["field_assignment"]
        assert len(assignment) == config.model.num_fields
        matched = [a for a in assignment if a is not None]
        assert len(set(matched)) == len(matched) and set(matched) <= set(names)
        counts = stored["identification_counts"]  # every single-transformation step counted once
        assert len(counts) == config.model.num_fields and sum(map(sum, counts)) == stored["test_sequences"] * (
            stored["frames_per_sequence"] - 1)
        per = stored["identification_per_transformation"]
        assert list(per) == names and all(v is None or 0.0 <= v <= 1.0 for v in per.values())
    table = format_table(result)
    assert f"{model} on digits, step 20" in table and "equivariance error" in table
    assert ("n/a" in table) == (model in ("static", "betavae")), "every metric that applies is reported"


def test_evaluation_is_deterministic(tmp_path_factory):
    run_dir = tiny_run("sta", tmp_path_factory.getbasetemp())
    a = evaluate(run_dir, iw_samples=4, write=False)
    b = evaluate(run_dir, iw_samples=4, write=False)
    assert a == b


def test_identification_recovers_a_known_matching(tmp_path_factory, monkeypatch):
    """Scores that are the true activity with fields permuted (field k = transformation perm[k])
    give accuracy 1, F1 1 and exactly that assignment: the matching and F1 end to end."""
    run_dir = tiny_run("sta", tmp_path_factory.getbasetemp())
    config, _, _ = load_run(run_dir)
    x, ds = load_data(config, "test")
    xs, ds_single = load_data(config, "test", single=True)
    names = list(ds.transformations)
    perm = [2, 0, 1]  # field k switches on with transformation perm[k]

    def oracle_scores(model, frames, batch_size=64, bar=None):
        for data in (ds, ds_single):
            if torch.equal(frames, data.tensors()["x"].float()):
                return data.tensors()["active"][..., perm].float()
        raise AssertionError("field_scores called on unexpected frames")

    monkeypatch.setattr(evaluate_module, "field_scores", oracle_scores)
    result = evaluate(run_dir, iw_samples=2, write=False)
    assert result["identification_accuracy"] == 1.0
    assert result["identification_f1"] == 1.0
    assert result["field_assignment"] == [names[j] for j in perm]
    assert result["identification_per_transformation"] == {name: 1.0 for name in names}
    counts = result["identification_counts"]  # field k sees only transformation perm[k]
    which = ds_single.tensors()["active"].argmax(-1).flatten()
    for k in range(3):
        assert counts[k] == [int((which == j).sum()) if j == perm[k] else 0 for j in range(3)]


def test_match_fields_and_f1_by_hand():
    true = torch.tensor([0, 0, 1, 1, 2, 2, 2, 1])
    pred = torch.tensor([1, 1, 2, 2, 0, 0, 3, 0])  # 4 fields, 3 transformations; 2 steps disagree
    assignment, accuracy = match_fields(pred, true, num_fields=4, num_true=3)
    assert assignment == [2, 0, 1, None]
    assert accuracy == pytest.approx(6 / 8)
    # rows: fields, columns: true transformations
    assert identification_counts(pred, true, 4, 3).tolist() == [[0, 1, 2], [2, 0, 0], [0, 2, 0], [0, 0, 1]]
    # F1: scores (N=1, T=2, K=4), truth (1, 2, 3); field 0 -> transformation 2, field 1 -> 0
    scores = torch.tensor([[[0.9, 0.8, 0.1, 0.0], [0.2, 0.0, 0.0, 0.9]]])
    active = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]])
    # predicted: step 0 {2, 0} (both true), step 1 {} (field 3 is unmatched); truth step 1 {1}
    assert _f1(scores, active, assignment) == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))


def test_iw_bound_is_jensen_tight_over_the_same_draws():
    """log mean exp(w_s) >= mean w_s on the same S draws; with S = 1 it is the one-sample ELBO."""
    config = ModelConfig(channels=1, image_size=8, transitions=2, latent=4, num_fields=2, hidden=4, conv=4)
    model = STAModel(config).eval()
    x0 = torch.rand(5, 1, 8, 8)
    S = 8
    bound = model.iw_bound(x0, samples=S, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    singles = torch.stack([model.iw_bound(x0, samples=1, generator=gen) for _ in range(S)])  # the same draws
    assert torch.allclose(bound, torch.logsumexp(singles, 0) - math.log(S), atol=1e-4)
    assert (bound >= singles.mean(0) - 1e-4).all()
    assert (singles.max(0).values > singles.min(0).values).all(), "the draws are not random"


def test_equivariance_error_of_a_static_model_on_still_frames():
    """Static model, frames that never change: every step's error is the L1 error of the
    reconstruction of x_0 (the same for every t)."""
    config = ModelConfig(model="static", channels=1, image_size=8, transitions=3, latent=4, conv=4)
    model = STAModel(config).eval()
    x0 = torch.rand(6, 1, 8, 8)
    x = x0[:, None].expand(6, 4, 1, 8, 8).contiguous()
    err = equivariance_errors(model, x, batch_size=4)
    with torch.no_grad():
        recon = (model.mean_image(model.encode(x0)[0]) - x0).abs().flatten(1).mean(1)
    assert err.shape == (6, 3)
    assert torch.allclose(err, recon[:, None].expand(6, 3), atol=1e-6)
