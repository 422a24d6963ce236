"""Shared test set-up: seeding, the Triton interpreter on CPU-only machines, markers and options.

Options: ``--backend NAME`` restricts backend-parametrised tests to one backend;
``--dtype float32|float64`` restricts dtype-parametrised tests.
Markers: ``gpu`` (needs CUDA; skipped with that reason elsewhere), ``slow`` (a second or more each:
training runs, CLI and benchmark subprocesses, compiles, plots, the hypothesis fuzz, long Triton
interpreter runs; ``pytest -m "not slow"`` leaves them out, plain ``pytest`` and CI run them). Shared test helpers and the cross-backend parity matrix: tests/parity.py.
"""
import os

import pytest

# Triton kernels run on the CPU through the interpreter; it must be set before triton is imported.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--backend", default=None, help="only run backend-parametrised tests for this backend")
    parser.addoption("--dtype", default=None, help="only run dtype-parametrised tests for this dtype")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
    config.addinivalue_line("markers", "slow: a second or more (training, subprocesses, compiles, plots, fuzz)")


def pytest_collection_modifyitems(config, items):
    backend = config.getoption("--backend")
    dtype = config.getoption("--dtype")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)
        params = getattr(item, "callspec", None)
        params = params.params if params else {}
        if backend and "backend" in params and params["backend"] != backend:
            item.add_marker(pytest.mark.skip(reason=f"--backend={backend}"))
        if dtype and "dtype" in params and str(params["dtype"]).replace("torch.", "") != dtype:
            item.add_marker(pytest.mark.skip(reason=f"--dtype={dtype}"))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Run a test with one torch thread: tiny ops on a shared 2-core CPU ran ~100x slower with two
    (OpenMP workers spinning while the other core was busy)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
