"""Sequence datasets (sta/data): shapes and ranges, determinism, splits, caching, and ground truth
that agrees with the frames (each transformation checked with an image-space measurement that does
not use the renderer)."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from sta.data import DATASETS, apply_transformations, make_dataset, render, source_split
from sta.data import digits as digits_module
from sta.data import shapes as shapes_module

SMALL = dict(digits=28, shapes=32, sprites=32, mnist=28)


def _make(name, **kw):
    kw.setdefault("num_sequences", 12)
    kw.setdefault("T", 4)
    kw.setdefault("image_size", SMALL[name])
    return make_dataset(name, **kw)


def _pure_steps(ds, k):
    """(sequence, step) pairs where transformation k alone acts."""
    only = (ds.active[..., k] == 1) & (ds.active.sum(-1) == 1)
    return [tuple(p) for p in only.nonzero().tolist()]


def _similarity(frames, angle_deg, scale):
    """Turn frames (N, C, S, S) counter-clockwise *as seen on screen* by angle_deg about the centre
    and zoom by scale. Derived in y-up maths coordinates (X, Y) = (u, -v): the output at P shows
    the input at R(-angle) P / scale."""
    a = math.radians(angle_deg)
    # input (X, Y) = (X cos a + Y sin a, -X sin a + Y cos a) / scale; back to (u, v) = (X, -Y)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]) / scale
    grid = F.affine_grid(theta.expand(frames.shape[0], 2, 3), list(frames.shape), align_corners=False)
    return F.grid_sample(frames, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _hue(rgb):
    """Hue in degrees of RGB pixels (..., 3), standard hexcone formula."""
    r, g, b = rgb.unbind(-1)
    mx, mn = rgb.max(-1).values, rgb.min(-1).values
    c = (mx - mn).clamp_min(1e-12)
    h = torch.where(mx == r, torch.remainder((g - b) / c, 6.0), torch.where(mx == g, (b - r) / c + 2.0, (r - g) / c + 4.0))
    return 60.0 * h


def _angle_diff(a, b):
    return torch.remainder(a - b + 180.0, 360.0) - 180.0


# --------------------------------------------------------------------------------- generic
@pytest.mark.parametrize("name", DATASETS)
def test_shapes_dtypes_and_ranges(name):
    ds = _make(name)
    K = len(ds.transformations)
    S = SMALL[name]
    assert len(ds) == 12 and ds.T == 4 and ds.image_size == S
    assert ds.channels == (1 if name == "sprites" else 3)
    item = ds[3]
    assert item["x"].shape == (5, ds.channels, S, S) and item["x"].dtype == torch.float32
    assert item["active"].shape == item["speed"].shape == (4, K)
    assert item["active"].dtype == item["speed"].dtype == torch.float32
    assert item["state"].shape == (5, K)
    assert isinstance(item["index"], int)
    t = ds.tensors()
    assert t["x"].shape == (12, 5, ds.channels, S, S)
    assert t["active"].shape == t["speed"].shape == (12, 4, K) and t["index"].shape == (12,)
    assert t["x"].min() >= 0 and t["x"].max() <= 1 and t["x"].max() > 0.5
    assert set(t["active"].unique().tolist()) <= {0.0, 1.0}
    assert (t["speed"] >= 0).all()
    assert (t["active"].sum(-1) >= 1).all(), "a step with no active transformation"
    torch.testing.assert_close(ds[3]["x"], t["x"][3], rtol=0, atol=0)


@pytest.mark.parametrize("name", DATASETS)
def test_seeded_determinism(name):
    a = _make(name, seed=7).tensors()
    b = _make(name, seed=7).tensors()
    c = _make(name, seed=8).tensors()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["x"], c["x"]) and not torch.equal(a["speed"], c["speed"])


@pytest.mark.parametrize("name", DATASETS)
def test_single_has_exactly_one_active(name):
    ds = _make(name, single=True)
    assert (ds.active.sum(-1) == 1).all()


@pytest.mark.parametrize("name", DATASETS)
def test_state_follows_ground_truth_and_renders_frames(name):
    ds = _make(name, num_sequences=6)
    t = ds.tensors()
    stepped = apply_transformations(name, t["state"][:, :-1], t["active"], t["speed"])
    torch.testing.assert_close(stepped, t["state"][:, 1:], rtol=1e-5, atol=1e-5)
    # the frames are exactly the public renderer applied to (source, state)
    idx = t["index"].repeat_interleave(ds.T + 1)
    frames = render(name, idx, t["state"].reshape(-1, len(ds.transformations)), ds.image_size)
    torch.testing.assert_close(frames.reshape(t["x"].shape), t["x"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", DATASETS)
def test_every_transformation_changes_the_frame(name):
    ds = _make(name, num_sequences=30, single=True)
    for k, label in enumerate(ds.transformations):
        steps = _pure_steps(ds, k)
        assert steps, f"no pure {label} step in the sample"
        for i, t in steps[:3]:
            change = (ds.x[i, t + 1] - ds.x[i, t]).abs().max()
            assert change > 0.05, f"{label} step left the frame unchanged"


def test_train_test_sources_are_disjoint():
    train, test = source_split(1797, "train"), source_split(1797, "test")
    assert len(set(train.tolist()) & set(test.tolist())) == 0
    assert sorted(train.tolist() + test.tolist()) == list(range(1797))
    assert len(test) == 359
    tr = make_dataset("digits", "train", num_sequences=400, T=1)
    te = make_dataset("digits", "test", num_sequences=400, T=1)
    assert set(tr.index.tolist()) <= set(train.tolist())
    assert set(te.index.tolist()) <= set(test.tolist())
    assert not set(tr.index.tolist()) & set(te.index.tolist())
    # the split does not depend on the sequence seed
    assert set(make_dataset("digits", "test", num_sequences=400, T=1, seed=3).index.tolist()) <= set(test.tolist())


def test_cache_roundtrip(tmp_path):
    a = _make("digits", cache_dir=str(tmp_path))
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".pt") and not files[0].startswith(".tmp")
    b = _make("digits", cache_dir=str(tmp_path))
    for key, value in a.tensors().items():
        assert torch.equal(value, b.tensors()[key]), key
    _make("digits", cache_dir=str(tmp_path), seed=1)
    assert len(os.listdir(tmp_path)) == 2


def test_uint8_storage():
    f = _make("sprites").x
    q = _make("sprites", storage="uint8")
    assert q._x.dtype == torch.uint8 and q.x.dtype == torch.float32
    assert (q.x - f).abs().max() <= 0.5 / 255 + 1e-6


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown dataset"):
        make_dataset("emnist")
    with pytest.raises(ValueError, match="split"):
        make_dataset("digits", split="val")
    with pytest.raises(ValueError, match="image_size"):
        make_dataset("digits", image_size=4)
    with pytest.raises(ValueError, match="T"):
        make_dataset("digits", T=0)


# ------------------------------------------------------------------------------ ground truth
def test_rotation_convention_is_counter_clockwise_on_screen():
    """A bright dot right of the centre, turned by +90 degrees, ends up above the centre."""
    S = 28
    src = torch.zeros(1, 1, S, S)
    src[0, 0, S // 2, S // 2 + 8] = 1.0
    state = torch.tensor([[0.0, 90.0, 0.0]])  # log scale, angle, hue
    out = digits_module.render(src, state, S)[0].amax(0)
    r, c = divmod(int(out.argmax()), S)
    assert c == S // 2 and r < S // 2 - 4, (r, c)


@pytest.mark.parametrize("k,label", [(0, "scale"), (1, "rotation")])
def test_digits_geometric_step_matches_frame(k, label):
    ds = make_dataset("digits", num_sequences=30, T=4, single=True, seed=2)
    steps = _pure_steps(ds, k)[:4]
    assert steps
    for i, t in steps:
        speed = ds.speed[i, t, k].item()
        prev, nxt = ds.x[i, t : t + 1], ds.x[i, t + 1 : t + 2]

        def err(amount):  # amount in units of speed: 20 degrees or x1.1 each
            if label == "rotation":
                return (_similarity(prev, 20.0 * amount, 1.0) - nxt).abs().mean().item()
            return (_similarity(prev, 0.0, 1.1**amount) - nxt).abs().mean().item()

        right = err(speed)
        for wrong in (0.0, -speed, speed - 0.5, speed + 0.5):
            assert right < 0.8 * err(wrong), (label, speed, wrong, right, err(wrong))


def test_digits_hue_step_shifts_hue_keeps_intensity():
    ds = make_dataset("digits", num_sequences=30, T=4, single=True, seed=3)
    steps = _pure_steps(ds, 2)[:4]
    assert steps
    for i, t in steps:
        prev, nxt = ds.x[i, t], ds.x[i, t + 1]
        torch.testing.assert_close(nxt.amax(0), prev.amax(0), rtol=0, atol=1e-6)  # intensity mask
        on = prev.amax(0) > 0.3
        shift = _angle_diff(_hue(nxt.permute(1, 2, 0)[on]), _hue(prev.permute(1, 2, 0)[on]))
        expected = 20.0 * ds.speed[i, t, 2].item()
        assert (shift - expected).abs().max() < 0.1, (shift[:5], expected)


def test_shapes_floor_hue_step_changes_only_the_floor():
    name, S = "shapes", 32
    ds = _make(name, num_sequences=30, single=True, seed=4)
    steps = _pure_steps(ds, 0)[:3]
    assert steps
    v = (torch.arange(S) + 0.5) / S * 2 - 1
    for i, t in steps:
        prev, nxt = ds.x[i, t], ds.x[i, t + 1]
        # object pixels: those that change when only the object's hue is changed
        other = ds.state[i, t].clone()
        other[2] += 180.0
        obj = (render(name, [ds.index[i].item()], other[None], S)[0] - prev).abs().amax(0) > 0
        wall = (v[:, None] < shapes_module.HORIZON).expand(S, S) & ~obj
        floor = (v[:, None] > shapes_module.HORIZON).expand(S, S) & ~obj
        assert torch.equal(nxt[:, wall], prev[:, wall])
        torch.testing.assert_close(nxt.amax(0)[floor], prev.amax(0)[floor], rtol=0, atol=1e-6)
        shift = _angle_diff(_hue(nxt[:, floor].T), _hue(prev[:, floor].T))
        assert (shift - 30.0 * ds.speed[i, t, 0].item()).abs().max() < 0.1


def _centre_of_mass(img):
    """img (S, S) -> (column, row) centre of mass in pixels."""
    S = img.shape[-1]
    idx = torch.arange(S, dtype=torch.float64)
    m = img.double().sum()
    return (img.double().sum(0) @ idx / m).item(), (img.double().sum(1) @ idx / m).item()


@pytest.mark.parametrize("k", [0, 1])
def test_sprites_translation_moves_centre_of_mass(k):
    S = 64
    ds = make_dataset("sprites", num_sequences=60, T=4, image_size=S, single=True, seed=5)
    checked = 0
    for i, t in _pure_steps(ds, k):
        prev, nxt = ds.x[i, t, 0], ds.x[i, t + 1, 0]
        border = lambda im: torch.cat([im[0], im[-1], im[:, 0], im[:, -1]]).abs().max()  # noqa: E731
        if border(prev) > 0 or border(nxt) > 0:
            continue  # cropped by the frame: the centre of mass is not a translation invariant
        (c0, r0), (c1, r1) = _centre_of_mass(prev), _centre_of_mass(nxt)
        expected = ds.speed[i, t, k].item() * 0.1 * S / 2  # unit 0.1 of the half-frame, in pixels
        moved, still = (c1 - c0, r1 - r0) if k == 0 else (r1 - r0, c1 - c0)
        # anti-aliasing of sharp corners moves the centre of mass by up to ~0.08 px (measured over
        # 133 steps); a wrong unit or axis would be off by > 1 px
        assert abs(moved - expected) < 0.15 and abs(still) < 0.15, (moved, expected, still)
        # the one-pixel coverage ramp is not exactly area preserving on diagonal edges: the mass of
        # a 45-degree square varies by ~1.2% with its sub-pixel position
        assert abs(nxt.sum() - prev.sum()) < 0.03 * prev.sum()
        checked += 1
    assert checked >= 2


def test_sprites_scale_step_scales_area():
    S = 64
    ds = make_dataset("sprites", num_sequences=60, T=4, image_size=S, single=True, seed=6)
    checked = 0
    for i, t in _pure_steps(ds, 3):
        prev, nxt = ds.x[i, t, 0], ds.x[i, t + 1, 0]
        if torch.cat([nxt[0], nxt[-1], nxt[:, 0], nxt[:, -1]]).max() > 0:
            continue
        ratio = (nxt.sum() / prev.sum()).item()
        assert abs(ratio - 1.1 ** (2 * ds.speed[i, t, 3].item())) < 0.02, ratio
        checked += 1
    assert checked >= 2
