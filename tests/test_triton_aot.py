"""Ahead-of-time compiles of every Triton kernel for sm_80 and sm_90, on a machine without a GPU.

``python -m sta.kernels.aot`` (run in a subprocess: conftest.py turns on the Triton interpreter in
this process, and interpreted kernels cannot be compiled) records the launches the launchers make
for every field kind, curl on/off, row-block size and dtype/precision, and compiles each with every
config the pruning keeps for the target through ptxas. The tests fail on a compile error, shared
memory over the target's limit or a register spill (kernels/aot_spills.json lists the compiles
measured to spill and the pruning moves past them; after a kernel change,
``python -m sta.kernels.aot --update-spills`` extends it). One summary line is printed; the
per-compile and per-kernel tables go to ``triton_aot.log`` in the test's tmp directory (path in
the assertion message). Cold: about 460 compiles, a few minutes on 2 cores; results are cached by
kernel hash (``$STA_AOT_CACHE``).
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the AOT compile needs triton")
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402

pytestmark = pytest.mark.slow

ARCHS = (80, 90)
PRECISIONS = {"float32": {"ieee", "tf32"}, "bfloat16": {"bf16"}, "float16": {"fp16"}}


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    """Run the AOT check once; returns (exit code, summary line, log path, rows)."""
    try:
        get_ptxas(ARCHS[0])
    except Exception as err:  # pragma: no cover - triton without its bundled ptxas
        pytest.skip(f"triton's ptxas is unavailable: {err}")
    out = tmp_path_factory.mktemp("aot")
    log, rows = out / "triton_aot.log", out / "triton_aot.json"
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, "-m", "sta.kernels.aot", "--jobs", "2", "--log", str(log),
                          "--json", str(rows)], env=env, capture_output=True, text=True, timeout=1800)
    assert rows.exists(), f"the AOT check did not run:\n{res.stdout}\n{res.stderr[-3000:]}"
    summary = res.stdout.strip().splitlines()[-1]
    return res.returncode, summary, log, json.loads(rows.read_text())


def _bad(rows, kind):
    return [f"{r['name']} sm_{r['arch']} {r['label']} {dict(r['constexprs'])} w{r['num_warps']} s{r['num_stages']}: "
            f"{r['verdict']}" for r in rows if r["verdict"].startswith(kind)]


def test_every_compile_succeeds_within_shared_memory(aot, capsys):
    """0 compile errors and 0 configs over the target's shared memory, on sm_80 and sm_90."""
    code, summary, log, rows = aot
    with capsys.disabled():
        print("\n" + summary)
    bad = _bad(rows, "error") + _bad(rows, "shared")
    assert not bad, f"{len(bad)} bad compiles (table: {log}):\n" + "\n".join(bad[:30])


def test_no_compile_spills(aot):
    """0 register spills (ptxas 'bytes spill stores/loads', stack frame) on sm_80 and sm_90."""
    code, summary, log, rows = aot
    bad = _bad(rows, "spills")
    assert not bad, f"{len(bad)} spilling compiles (table: {log}):\n" + "\n".join(bad[:30])
    assert code == 0, summary


def test_every_kernel_launch_is_covered(aot):
    """Every kernel of the modules is compiled, for both targets and every dtype/precision."""
    from sta.kernels import flow_step_kernels, grid_transport

    kernels = {name for mod in (flow_step_kernels, grid_transport) for name in vars(mod) if name.endswith("_kernel")}
    rows = aot[3]
    for arch in ARCHS:
        assert {r["name"] for r in rows if r["arch"] == arch} == kernels, f"sm_{arch}"
    flow = [r for r in rows if r["name"] == "_flow_step_fwd_kernel"]
    seen = {(r["label"].split()[1], dict(r["constexprs"])["INPUT_PRECISION"]) for r in flow}
    assert seen == {(d, p) for d, ps in PRECISIONS.items() for p in ps}
    assert {dict(r["constexprs"])["BLOCK_M"] for r in flow} == {16, 32, 64}
    # signatures follow the recorded arguments: bf16 inputs compile with bf16 pointers
    z_types = {dict(r["signature"])["z_ptr"] for r in rows if r["name"] == "_flow_step_hidden_fwd_kernel"}
    assert z_types == {"*fp32", "*bf16", "*fp16"}
    grid_types = {dict(r["signature"])["rho_ptr"] for r in rows if r["name"] == "_grid_transport_fwd_kernel"}
    assert grid_types == {"*fp32", "*fp64"}
