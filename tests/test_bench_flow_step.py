"""benchmarks/bench_flow_step.py: the quick run writes real numbers, and its baselines compute what
they claim (the authors' quantity is the Hessian-row-sum, not the Laplacian; the exact baselines
match the reference)."""
import csv
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

import sta
from sta import reference
from tests.tolerances import PARITY, assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_flow_step.py")
PROVIDERS = ("torch", "cpu", "authors", "autograd_exact")
EXACT = ("torch", "cpu", "autograd_exact")


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_flow_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "cpu.csv"
    # --slow-call-s / --max-call-s high: on a loaded machine a call's time estimate can pass the
    # defaults, and the provider would then be timed once or skipped instead of measured
    res = subprocess.run([sys.executable, SCRIPT, "--quick", "--device", "cpu", "--providers", *PROVIDERS,
                          "--slow-call-s", "600", "--max-call-s", "600",
                          "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with open(out) as f:
        rows = list(csv.DictReader(f))
    return rows, out, res.stdout


def _num(row, key):
    return float(row[key])


@pytest.mark.slow
def test_quick_run_measures_every_provider(quick_run):
    rows, _, _ = quick_run
    step = [r for r in rows if r["section"] == "step"]
    assert {(r["shape"], r["provider"], r["mode"]) for r in step} == {
        (s, p, m) for s in ("Q1", "Q2") for p in (*PROVIDERS, "products") for m in ("fwd", "fwd+bwd")}
    for r in step:
        assert r["what"] == "measured", r
        med, p20, p80 = _num(r, "median_ms"), _num(r, "p20_ms"), _num(r, "p80_ms")
        assert 0 < p20 <= med <= p80 < 60_000, r
        assert math.isfinite(_num(r, "gflops")) and _num(r, "gflops") > 0
        # speedups are ratios of the medians of the same shape and mode
        ref = next(x for x in step if x["shape"] == r["shape"] and x["mode"] == r["mode"] and x["provider"] == "torch")
        assert _num(r, "x_torch") == pytest.approx(_num(ref, "median_ms") / med, rel=1e-6)
        if r["provider"] == "products":  # a part of the reference's work: below it
            assert med < _num(ref, "median_ms"), r
        else:
            assert _num(r, "peak_mb") >= 0
        # provenance on every row
        assert r["git_sha"] and r["torch"] == torch.__version__ and "cpus" in r["machine"]


@pytest.mark.slow
def test_quick_run_errors_are_small_for_exact_providers(quick_run):
    rows, _, _ = quick_run
    rtol = PARITY[torch.float32][0]
    for r in rows:
        if r["section"] != "step" or r["provider"] not in EXACT:
            continue
        assert _num(r, "err_z") < rtol and _num(r, "err_div") < rtol, r
        if r["mode"] == "fwd+bwd":
            assert _num(r, "err_grad") < rtol, r


@pytest.mark.slow
def test_quick_run_authors_quantity_is_not_the_divergence(quick_run):
    """In the run itself: the authors' div is far from the float64 divergence, z is not."""
    rows, _, _ = quick_run
    authors = [r for r in rows if r["section"] == "step" and r["provider"] == "authors"]
    assert authors
    for r in authors:
        assert _num(r, "err_z") < PARITY[torch.float32][0]
        assert _num(r, "err_div") > 0.05 and _num(r, "div_rel_med") > 0.05, r


@pytest.mark.slow
def test_quick_run_sweep_and_outputs(quick_run):
    rows, out, stdout = quick_run
    sweep = [r for r in rows if r["section"] == "sweep"]
    for provider in ("torch", "cpu"):
        for mode in ("fwd", "fwd+bwd"):
            pts = [r for r in sweep if r["provider"] == provider and r["mode"] == mode]
            pairs = [int(r["pairs"]) for r in pts]
            assert pairs == [16 * a for a in (1, 2, 4, 8)], pairs  # B=16 samples, 1..8 of 8 fields
            assert all(_num(r, "us_per_pair") == pytest.approx(1e3 * _num(r, "median_ms") / int(r["pairs"]))
                       for r in pts)
    fits = [r for r in rows if r["section"] == "sweep_fit"]
    assert {(r["provider"], r["mode"]) for r in fits} == {(p, m) for p in ("torch", "cpu") for m in ("fwd", "fwd+bwd")}
    md = os.path.splitext(str(out))[0] + ".md"
    with open(md) as f:
        text = f.read()
    assert "| shape | provider | mode | median_ms" in text and "Active-fraction sweep" in text
    assert "median_ms" in stdout and "wrote" in stdout


# ------------------------------------------------------------------------------------------------
# the baselines compute what they say (float64, tiny shapes, in-process)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench():
    return _load_bench()


@pytest.fixture
def tiny(bench):
    shape = bench.Shape("T", 6, 5, 7, 3, 2, 2)
    case = bench.make_case(shape, torch.device("cpu"), with_reference=False)
    case.fields.double()
    return bench, case.fields, case.z.double(), case.g_pot.double(), case.g_rot.double()


def test_authors_quantity_is_the_hessian_row_sum_not_the_laplacian(tiny):
    bench, fields, z, gp, gr = tiny
    pp, rp = sta.ops.prepare_step(fields, bench.T_STEP)
    _, div, row_sum = bench.authors_step(z, gp, gr, fields, train=False, parts=True)
    # the oracle: sum_k g_k 1^T Hess u_k 1 from torch.func on the reference potential
    hess = torch.stack([torch.func.hessian(lambda x: reference.potential_value(x[None], pp)[0] @ gp[b])(z[b])
                        for b in range(z.shape[0])])
    assert_close(row_sum, hess.sum((1, 2)), torch.float64, what="Hessian-row-sum")
    laplacian = reference.potential_terms(z, gp, pp, ("div",)).div
    assert_close(laplacian, hess.diagonal(dim1=1, dim2=2).sum(1), torch.float64, what="Laplacian")
    # a different quantity: off by far more than any rounding (here ~10% of the largest value)
    assert (row_sum - laplacian).abs().max() > 1e-2 * laplacian.abs().max()
    # the rest of their div is the exact mlp divergence
    assert_close(div - row_sum, reference.mlp_terms(z, gr, rp, ("div",)).div, torch.float64, what="mlp div")


@pytest.mark.parametrize("name", ["autograd_exact", "hessian"])
def test_exact_baselines_match_the_reference(tiny, name):
    bench, fields, z, gp, gr = tiny
    step = {"autograd_exact": bench.autograd_exact_step, "hessian": bench.hessian_step}[name]
    z_next, div = step(z, gp, gr, fields, train=False)
    ref = sta.flow_step(z, bench.T_STEP, gp, gr, fields, bench.DT, ("z", "div"), backend="torch")
    assert_close(z_next, ref.z, torch.float64, what=f"{name} z")
    assert_close(div, ref.div, torch.float64, what=f"{name} div")


def test_hutchinson_is_unbiased(tiny):
    """The mean of many one-probe estimates approaches the exact divergence (Rademacher probes:
    the variance is sum_{i != j} J_ij (J_ij + J_ji), so 4000 draws bring the mean within a few %)."""
    bench, fields, z, gp, gr = tiny
    ref = sta.flow_step(z, bench.T_STEP, gp, gr, fields, bench.DT, ("z", "div"), backend="torch").div
    draws = 4000
    zs = z.repeat(draws, 1)
    _, div = bench.hutchinson_step(zs, gp.repeat(draws, 1), gr.repeat(draws, 1), fields, train=False)
    mean = div.detach().reshape(draws, -1).mean(0)
    single = div.detach().reshape(draws, -1)[0]
    assert (mean - ref).abs().max() < 0.05 * ref.abs().max()
    assert (single - ref).abs().max() > (mean - ref).abs().max()  # one probe is much noisier
