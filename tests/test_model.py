"""The model kinds (sta/models/) over one base: the ELBO of docs/maths.md 4.3 is finite with every term
reported, its gradient reaches every parameter, a tiny model overfits one batch, and the registry
builds each kind from its name (so ``--model NAME`` and saved runs keep working).

Sizes are tiny (D=6, H=8, 8-channel convs, 8x8 frames, T=3) so the whole file runs in seconds. The
helpers at the top are shared with the one test file of each baseline (test_model_<kind>.py).
"""
import itertools
import json
import math
import os

import pytest
import torch

from sta.model import MODELS, ELBOTerms, ModelConfig, STAModel
from sta.models import KINDS, CoefficientLayout, CoefficientModel, register

# (model, rotational, control): every combination the issue names. Kinds without fields ignore
# rotational/control; they are still built and checked (the config must accept the options and the
# parameters must all be trained).
COMBOS = list(itertools.product(MODELS, ("hamiltonian", "mlp"), ("single", "double")))


# Tiny ops: one thread (fixture in conftest.py) avoids OpenMP spin contention on a shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides) -> ModelConfig:
    kwargs = dict(channels=1, image_size=8, transitions=3, latent=6, num_fields=2, hidden=8, conv=8)
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def tiny_batch(config: ModelConfig, batch: int = 4, seed: int = 0) -> torch.Tensor:
    """Random frames in [0, 1]: ``(batch, T+1, C, S, S)``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, config.transitions + 1, config.channels, config.image_size, config.image_size,
                      generator=gen)


def overfit_one_batch(steps: int = 300, **overrides) -> tuple[float, float, float, float]:
    """Train a fresh ``tiny_config(**overrides)`` model on one batch of 4 binarised digit sequences
    (8x8, T=3) with Adam.

    Returns ``(first loss, last loss, last recon, z_free)``: means of the first 5 and last 10 steps,
    and the reconstruction of the best decoder ignoring z (the per-pixel mean image) per sequence.
    """
    from sta.data import make_dataset

    ds = make_dataset("digits", split="train", num_sequences=4, T=3, image_size=8, seed=0)
    x = (ds.tensors()["x"] > 0.5).float()  # binary frames: the Bernoulli NLL can approach 0
    config = tiny_config(channels=ds.channels, **overrides)
    torch.manual_seed(0)
    net = STAModel(config)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses, recons = [], []
    for _ in range(steps):
        terms = net.elbo(x, temperature=0.5, generator=gen)
        opt.zero_grad()
        terms.loss.backward()
        opt.step()
        losses.append(terms.loss.item())
        recons.append(terms.recon.item())
    p = x.mean((0, 1)).clamp(1e-6, 1 - 1e-6)  # per-pixel mean over every frame
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).sum().item()
    z_free = (config.transitions + 1) * entropy
    return sum(losses[:5]) / 5, sum(losses[-10:]) / 10, sum(recons[-10:]) / 10, z_free


def assert_overfits(recon_fraction: float = 0.6, **overrides) -> None:
    """The loss falls by more than 4x in 300 steps and the reconstruction is < ``recon_fraction`` x
    that of the best decoder ignoring z, so the latent path is really used (not only the decoder bias)."""
    first, last, recon, z_free = overfit_one_batch(**overrides)
    assert last < first / 4, f"loss {first:.1f} -> {last:.1f}: expected a 4x drop on one batch"
    assert recon < recon_fraction * z_free, f"recon {recon:.1f} vs {z_free:.1f} for the best decoder ignoring z"


def cli_train_evaluate_plot(model: str, tmp_path, steps: int = 3) -> tuple[dict, set]:
    """``sta train --model MODEL --preset tiny``, ``sta evaluate``, ``sta plot`` in-process, one torch
    thread; returns (eval.json, the names of the files in plots/)."""
    from sta.cli import main

    run = str(tmp_path / f"run-{model}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--preset", "tiny", "--model", model, "--steps", str(steps), "--out", run,
                     "--quiet"]) == 0
        assert main(["evaluate", run, "--iw-samples", "4"]) == 0
        assert main(["plot", run]) == 0
    finally:
        torch.set_num_threads(threads)
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["model"]["model"] == model
    with open(os.path.join(run, "eval.json")) as f:
        result = json.load(f)
    return result, set(os.listdir(os.path.join(run, "plots")))


@pytest.mark.parametrize("model,rotational,control", COMBOS)
def test_elbo_finite_terms_and_gradient_reaches_every_parameter(model, rotational, control):
    config = tiny_config(model=model, rotational=rotational, control=control)
    net = STAModel(config)
    x = tiny_batch(config)
    terms = net.elbo(x, temperature=0.5, slab=True)

    assert isinstance(terms, ELBOTerms)
    scalars = terms.scalars()
    assert set(scalars) == {"recon", "kl_z0", "kl_path", "kl_spike", "kl_slab", "hj", "div", "nelbo", "loss",
                            "evaluated"}
    assert 0.0 < scalars["evaluated"] <= 1.0  # relaxed spikes below the default floor (0.01) are skipped
    for name, value in terms._asdict().items():
        assert value.dim() == 0, f"{name}: expected a 0-dim tensor, got shape {tuple(value.shape)}"
        assert math.isfinite(scalars[name]), f"{name} = {scalars[name]}"
    # the totals are the documented sums of the reported terms (kl_scale: beta for betavae, else 1)
    nelbo = terms.recon + terms.kl_z0 + terms.kl_path + terms.kl_spike + terms.kl_slab
    kl = nelbo - terms.recon
    assert torch.allclose(terms.nelbo, nelbo)
    assert torch.allclose(terms.loss, terms.recon + net.kl_scale * kl + terms.hj + terms.div)
    assert scalars["recon"] > 0 and scalars["kl_z0"] >= 0  # Bernoulli NLL of [0,1] pixels, Gaussian KL
    assert scalars["kl_spike"] >= 0 and scalars["kl_slab"] >= 0 and scalars["hj"] >= 0 and scalars["div"] >= 0
    assert scalars["kl_path"] > 0  # every kind's path carries a density term (static: T * kl_z0)
    # terms that must be active (non-zero) for each kind, so that "reported" is not "always 0"
    spikes = isinstance(net, CoefficientModel) and net.spikes
    assert (scalars["kl_spike"] > 0) == spikes
    assert (scalars["kl_slab"] > 0) == isinstance(net, CoefficientModel)
    assert (scalars["hj"] > 0) == net.has_fields
    assert (scalars["div"] > 0) == (net.has_fields and rotational == "mlp"), "the divergence penalty: mlp fields only"

    terms.loss.backward()
    names = [name for name, p in net.named_parameters()]
    assert names, "the model has no parameters"
    for name, p in net.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: gradient is identically zero"


def test_kl_weight_scales_only_the_kl_terms_of_the_loss():
    """KL warm-up: loss = recon + w * (kl_z0 + kl_path + kl_spike + kl_slab) + hj + div; nelbo and
    every reported term are the unweighted ones (same noise, so the same sample for both w)."""
    config = tiny_config()
    net = STAModel(config)
    x = tiny_batch(config)
    full = net.elbo(x, temperature=0.5, generator=torch.Generator().manual_seed(3))
    warm = net.elbo(x, temperature=0.5, generator=torch.Generator().manual_seed(3), kl_weight=0.25)
    for name in ("recon", "kl_z0", "kl_path", "kl_spike", "kl_slab", "hj", "div", "nelbo"):
        assert torch.equal(getattr(full, name), getattr(warm, name)), name
    kl = warm.kl_z0 + warm.kl_path + warm.kl_spike + warm.kl_slab
    assert kl > 1.0  # otherwise the check below could not tell the weights apart
    assert torch.allclose(warm.loss, warm.recon + 0.25 * kl + warm.hj + warm.div)
    assert torch.allclose(full.loss, full.nelbo + full.hj + full.div)


def test_structure_of_each_model():
    """Which parameters each kind owns: fields for the field kinds, a coefficient posterior for the
    spike-and-slab kinds; double control doubles the coefficients of field kinds only."""
    for model in MODELS:
        single = STAModel(tiny_config(model=model))
        double = STAModel(tiny_config(model=model, control="double"))
        names = {n.split(".")[0] for n, _ in single.named_parameters()}
        assert {"encoder", "decoder"} <= names
        assert ("fields" in names) == single.has_fields == (model in ("sta", "dense"))
        assert ("directions" in names) == (model == "linear")
        assert ("posterior" in names) == isinstance(single, CoefficientModel) == (model in ("sta", "dense", "linear"))
        assert single.has_transitions == (model not in ("static", "betavae"))
        K = single.config.num_fields
        assert single.config.num_coefficients == K
        assert double.config.num_coefficients == (2 * K if single.has_fields else K)


def test_registry_builds_each_kind_from_its_name_and_saved_configs_round_trip():
    """``STAModel(config)`` is the factory over the registry; a config.json dict gives the same kind
    and the same parameters (what ``load_run`` does with a saved run)."""
    assert MODELS == tuple(KINDS) and MODELS[:4] == ("sta", "static", "linear", "dense")
    assert {"betavae", "slowvae"} <= set(MODELS)
    for model in MODELS:
        config = tiny_config(model=model)
        net = STAModel(config)
        assert type(net) is KINDS[model] and net.name == model
        again = STAModel(ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))))
        assert type(again) is type(net)
        assert again.load_state_dict(net.state_dict()) is not None  # same parameter names and shapes
    old = tiny_config().to_dict()
    del old["beta"], old["slow_rate"]  # a config.json written before the kind-specific options
    assert type(STAModel(ModelConfig.from_dict(old))) is KINDS["sta"]
    with pytest.raises(ValueError, match=r"config.model: Linear builds 'linear' models, got 'sta'"):
        KINDS["linear"](tiny_config())
    with pytest.raises(TypeError, match=r"config: expected a ModelConfig"):
        STAModel({"model": "sta"})
    with pytest.raises(ValueError, match=r"already registered"):
        @register
        class Impostor(KINDS["static"]):
            name = "sta"


def test_kind_specific_options_are_checked():
    """beta is read by betavae only, slow_rate by slowvae only: anywhere else they must stay None."""
    with pytest.raises(ValueError, match=r"beta: read only by model betavae; expected None for model 'sta'"):
        tiny_config(beta=2.0)
    with pytest.raises(ValueError, match=r"slow_rate: read only by model slowvae"):
        tiny_config(model="betavae", slow_rate=2.0)
    with pytest.raises(ValueError, match=r"beta: expected a finite number >= 0"):
        tiny_config(model="betavae", beta=-1.0)
    with pytest.raises(ValueError, match=r"slow_rate: expected a finite number > 0"):
        tiny_config(model="slowvae", slow_rate=0.0)
    assert STAModel(tiny_config(model="betavae")).kl_scale == 4.0
    assert STAModel(tiny_config(model="betavae", beta=0.5)).kl_scale == 0.5
    assert STAModel(tiny_config(model="slowvae")).option("slow_rate") == 6.0


def test_coefficient_layout_decodes_single_and_double_control():
    """The one place that decodes the control scheme: split, unit coefficients, per-field scores."""
    single, double = CoefficientLayout(3, True, False), CoefficientLayout(3, True, True)
    no_rot = CoefficientLayout(3, False, False)
    g = torch.arange(6.0).view(1, 6)
    assert double.size == 6 and single.size == 3
    pot, rot = double.split(g)
    assert pot.tolist() == [[0.0, 1.0, 2.0]] and rot.tolist() == [[3.0, 4.0, 5.0]]
    pot, rot = single.split(g[:, :3])
    assert pot is rot
    assert no_rot.split(g[:, :3])[1] is None
    assert double.unit(1, 2).tolist() == [[0, 1, 0, 0, 1, 0]] * 2
    assert single.unit(2, 1, 4).shape == (1, 4, 3) and single.unit(2).tolist() == [0, 0, 1]
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.5, 0.2, 0.4]])
    assert double.per_field(scores)[0].tolist() == pytest.approx([0.5, 0.9, 0.4])
    assert torch.equal(single.per_field(scores[:, :3]), scores[:, :3])
    with pytest.raises(ValueError, match=r"field: expected an index in \[0, 3\)"):
        single.unit(3)
    # the config derives it from the kind: double control only where the kind has fields
    assert tiny_config(control="double").coefficients.double
    assert not tiny_config(model="linear", control="double").coefficients.double
    assert not tiny_config(control="double", rotational="none").coefficients.double


def test_potential_prior_and_hard_spikes_train_every_parameter():
    """The other options of docs/maths.md 4.1/4.3: prior flow bank instead of learned diffusion scales, and
    straight-through hard spikes (every field switched on by sampling in a larger batch)."""
    config = tiny_config(prior="potential", hard=True, pi0=0.5)
    net = STAModel(config)
    terms = net.elbo(tiny_batch(config, batch=16), temperature=1.0)
    assert all(math.isfinite(v) for v in terms.scalars().values())
    terms.loss.backward()
    for name, p in net.named_parameters():
        if p.numel() == 0:  # the prior bank's empty rotational half (K_r = 0)
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient"


def test_spike_only_phase_has_no_slab_kl_and_unit_speeds():
    config = tiny_config()
    net = STAModel(config)
    terms = net.elbo(tiny_batch(config), temperature=0.5, slab=False)
    assert terms.kl_slab.item() == 0.0 and terms.kl_spike.item() > 0


def test_elbo_rejects_wrong_shapes():
    net = STAModel(tiny_config())
    with pytest.raises(ValueError, match=r"x: expected shape"):
        net.elbo(torch.rand(2, 3, 1, 8, 8))  # T+1 = 3, not 4
    with pytest.raises(ValueError, match=r"model: expected one of"):
        tiny_config(model="transformer")
    with pytest.raises(ValueError, match=r"latent: expected a positive int"):
        tiny_config(latent=0)
    with pytest.raises(ValueError, match=r"field_weight_scale: expected > 0"):
        tiny_config(field_weight_scale=0.0)
    assert STAModel(tiny_config(field_weight_scale=0.5)).fields.potential.W.std() > \
        3 * STAModel(tiny_config(field_weight_scale=0.1)).fields.potential.W.std()  # the option reaches the fields


def test_linear_model_translates_and_static_model_stands_still():
    """The baselines' dynamics: linear adds sum_k g_k d_k; static (and betavae) never moves."""
    lin = STAModel(tiny_config(model="linear"))
    z0, g = torch.randn(3, 6), torch.randn(3, 3, 2)
    path = lin.rollout(z0, g)
    expected = z0[:, None] + torch.cumsum(g @ lin.directions, 1)
    assert torch.allclose(path[:, 1:], expected, atol=1e-6)
    for model in ("static", "betavae"):
        static = STAModel(tiny_config(model=model))
        assert torch.equal(static.rollout(z0, g), z0[:, None].expand(3, 4, 6))


@pytest.mark.slow
def test_tiny_model_overfits_one_batch():
    """sta on one batch of 4 binarised digit sequences, 300 Adam steps (see :func:`assert_overfits`)."""
    assert_overfits()
