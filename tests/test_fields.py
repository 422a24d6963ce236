"""Field modules: construction, initial scale, parameter layout, argument checks."""
import pytest
import torch

import sta
from sta.fields import INIT_STEP_RATIO


@pytest.mark.parametrize("weight_scale", [1.0, 0.1])
@pytest.mark.parametrize("D,H,rotational", [(3, 5, "mlp"), (16, 32, "hamiltonian"), (64, 64, "mlp"), (17, 8, "hamiltonian")])
def test_unit_coefficient_moves_standard_normal_z_by_a_tenth(D, H, rotational, weight_scale):
    bank = sta.FieldBank(D, 3, 3, H, rotational=rotational, weight_scale=weight_scale)
    z = torch.randn(2000, D)
    with torch.no_grad():
        for v in (bank.potential.velocity(z, 0.0), bank.rotational.velocity(z, 0.0)):
            ratio = (v.norm(dim=-1) / z.norm(dim=-1, keepdim=True)).mean(0)
            assert torch.allclose(ratio, torch.full_like(ratio, INIT_STEP_RATIO), rtol=0.1), ratio


def test_small_weight_scale_starts_fields_as_near_constant_directions():
    """weight_scale sets the first layer's spread (W ~ N(0, scale^2 / D)); at 0.1 the fields barely
    turn across standard-normal z (mean cosine to the mean direction > 0.98), at 1 they do (< 0.9)."""
    z = torch.randn(2000, 16, generator=torch.Generator().manual_seed(0))

    def mean_cosine(v):  # v: (N, K, D) -> mean over fields of the mean cosine to the mean direction
        mean = v.mean(0, keepdim=True)
        return torch.nn.functional.cosine_similarity(v, mean.expand_as(v), dim=-1).mean().item()

    cos = {}
    for scale in (1.0, 0.1):
        torch.manual_seed(0)
        bank = sta.FieldBank(16, 3, 3, 32, weight_scale=scale)
        for part in ("potential", "rotational"):
            W = getattr(bank, part).W
            assert abs(W.std().item() * 16 ** 0.5 / scale - 1.0) < 0.1, (part, scale, W.std().item())
        with torch.no_grad():
            cos[scale] = [mean_cosine(bank.potential.velocity(z, 0.0)), mean_cosine(bank.rotational.velocity(z, 0.0))]
    assert min(cos[0.1]) > 0.98 and max(cos[1.0]) < 0.9, cos


def test_init_is_reproducible_under_a_seed():
    torch.manual_seed(3)
    a = sta.FieldBank(5, 2, 2, 4)
    after_a = torch.rand(1)
    torch.manual_seed(3)
    b = sta.FieldBank(5, 2, 2, 4)
    after_b = torch.rand(1)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert torch.equal(after_a, after_b)


def test_parameter_layout_is_stacked_per_field():
    bank = sta.FieldBank(6, 2, 3, 4)
    assert bank.potential.W.shape == (2, 4, 6) and bank.potential.a.shape == (2, 4)
    assert bank.rotational.P.shape == (3, 6, 6) and bank.rotational.skew().shape == (3, 6, 6)
    low = sta.FieldBank(6, 0, 3, 4, rank=2)
    assert low.rotational.U.shape == (3, 6, 2)
    A = low.rotational.skew()
    assert torch.allclose(A, -A.transpose(1, 2))
    mlp = sta.FieldBank(6, 1, 3, 4, rotational="mlp")
    assert mlp.rotational.W1.shape == (3, 4, 6) and mlp.rotational.W2.shape == (3, 6, 4)
    e, de = bank.potential.time(torch.tensor(0.3))
    assert e.shape == de.shape == (2, 4)


def test_time_embedding_derivative_matches_autograd():
    emb = sta.TimeEmbedding(3, 4).double()
    t = torch.tensor(1.3, dtype=torch.float64)
    _, de = emb(t)
    jac = torch.autograd.functional.jacobian(lambda s: emb(s)[0], t)
    assert torch.allclose(de, jac, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(dim=0), "dim"),
        (dict(hidden=-1), "hidden"),
        (dict(num_potential=-2), "num_potential"),
        (dict(num_rotational=-2), "num_rotational"),  # issue 15: FieldBank(3, 1, -2, 4)
        (dict(num_rotational=1.5), "num_rotational"),
        (dict(rank=True), "rank"),
        (dict(rotational="curl"), "rotational"),
        (dict(rank=0), "rank"),
        (dict(rotational="mlp", rank=2), "rank"),
        (dict(weight_scale=0.0), "weight_scale"),
        (dict(weight_scale=float("nan")), "weight_scale"),
    ],
)
def test_bad_construction_names_the_argument(kwargs, argument):
    args = dict(dim=4, num_potential=1, num_rotational=1, hidden=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"^{argument}:"):
        sta.FieldBank(**args)


def test_skew_is_only_for_hamiltonian():
    with pytest.raises(ValueError, match="hamiltonian"):
        sta.FieldBank(4, 1, 1, 3, rotational="mlp").rotational.skew()
