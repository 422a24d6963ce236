"""Compile-only checks of the CUDA backend (csrc/cuda): runs on machines without a GPU.

* every ``csrc/cuda/*.cu`` compiles with plain nvcc (no torch headers) for sm_80 and sm_90, with
  the flags of the real build (:func:`sta._build.nvcc_flags`), without register spills; the
  registers of every kernel (``-Xptxas -v``) are in the test's captured output, shown with
  ``pytest -s`` or ``-rA`` and on a failure, never between the dots of ``pytest -q``;
* the ``.cu`` files include only CUDA runtime headers, the standard library, ``flow_math.h`` / ``grid_math.h`` and
  their own headers; the torch binding (``csrc/cuda/*.cpp``) includes no CUDA headers at all and
  compiles against the installed torch (a CPU wheel here) with g++.

Nothing is run on a GPU here; tests/test_backend_cuda.py does that where one is visible.
Skipped, with the reason, when nvcc (or g++ for the binding) cannot be found.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sta import _build

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
BINDING_FILES = sorted(CUDA_DIR.glob("*.cpp"))
#: The two architectures CI checks (A100 and H100/H200), whatever STA_CUDA_ARCHS says.
CI_ARCHS = ("80", "90")

NVCC = _build.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, PATH, /usr/local/cuda/bin)")

_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.M)
#: Headers a .cu file may include: the CUDA runtime and its half types, the C++ standard library.
_CUDA_HEADERS = {"cuda_runtime.h", "cuda_runtime_api.h", "cuda_fp16.h", "cuda_bf16.h", "cuda.h"}
_FORBIDDEN_IN_BINDING = re.compile(r"^(c10/cuda|ATen/cuda|ATen/native/cuda|cuda|cub|thrust|cublas|curand)", re.I)


def _includes(path: Path) -> list[str]:
    return _INCLUDE.findall(path.read_text())


def test_cuda_sources_exist():
    assert CU_FILES, f"no .cu files in {CUDA_DIR}"
    assert BINDING_FILES, f"no torch binding (.cpp) in {CUDA_DIR}"


@pytest.mark.parametrize("path", CU_FILES, ids=lambda p: p.name)
def test_cu_includes_only_cuda_runtime_and_flow_math(path):
    own = {p.name for p in CUDA_DIR.glob("*.h")} | {"flow_math.h", "../flow_math.h", "grid_math.h", "../grid_math.h"}
    for header in _includes(path):
        is_std = "/" not in header and "." not in header  # <cstdint>, <cmath>, ...
        assert header in _CUDA_HEADERS or header in own or is_std, (
            f"{path.name} includes {header!r}: the .cu files may include only CUDA runtime headers, the "
            f"C++ standard library and flow_math.h / grid_math.h, so they compile with plain nvcc against any torch")


@pytest.mark.parametrize("path", BINDING_FILES, ids=lambda p: p.name)
def test_binding_includes_no_cuda_headers(path):
    for header in _includes(path):
        assert not _FORBIDDEN_IN_BINDING.match(header), (
            f"{path.name} includes {header!r}: the binding must build against a torch without CUDA headers")


def _ptxas_report(log: str) -> list[dict]:
    """Parse ``-Xptxas -v`` output: one dict per (kernel, arch) with registers and spill bytes."""
    rows, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'", line)
        if m:
            current = {"kernel": m.group(1), "arch": m.group(2), "registers": None, "spill_stores": 0,
                       "spill_loads": 0, "stack": 0}
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
    return rows


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("path", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles_for_sm80_sm90_without_spills(path, tmp_path):
    cmd = [NVCC, "-c", str(path), "-o", str(tmp_path / (path.stem + ".o")), "-Xptxas", "-v"]
    cmd += _build.nvcc_flags(CI_ARCHS)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed on {path.name}:\n{' '.join(cmd)}\n{log}"
    warnings = [line for line in log.splitlines() if "warning" in line.lower()]
    assert not warnings, f"nvcc warnings in {path.name}:\n" + "\n".join(warnings)
    rows = _ptxas_report(log)
    assert rows, f"no kernels reported by ptxas for {path.name}:\n{log}"
    assert {r["arch"] for r in rows} == {f"sm_{a}" for a in CI_ARCHS}, log
    names = _demangle(sorted({r["kernel"] for r in rows}))
    table = [f"{path.name}: nvcc sm_80+sm_90 in {elapsed:.1f} s",
             f"  {'arch':6s} {'regs':>4s} {'stack':>5s} {'spill st/ld':>11s}  kernel"]
    for r in sorted(rows, key=lambda r: (names[r["kernel"]], r["arch"])):
        short = names[r["kernel"]].replace("(anonymous namespace)::", "").split("(")[0]
        table.append(f"  {r['arch']:6s} {r['registers']!s:>4s} {r['stack']:5d} "
                     f"{r['spill_stores']:5d}/{r['spill_loads']:<5d}  {short}")
    print("\n".join(table))  # captured: `pytest -s` / `-rA` show it, `pytest -q` does not
    spills = [f"{names[r['kernel']]} ({r['arch']}): {r['spill_stores']} B stores, {r['spill_loads']} B loads"
              for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spills, "register spills:\n" + "\n".join(spills)


_FAKE_NVCC = """#!/bin/sh
# Stands in for nvcc: the -Xptxas -v report of one kernel for sm_80 and sm_90, and the object file.
for arch in sm_80 sm_90; do
  echo "ptxas info    : Compiling entry function '_Z6kernelv' for '$arch'" >&2
  echo "ptxas info    : Function properties for _Z6kernelv" >&2
  echo "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" >&2
  echo "ptxas info    : Used 32 registers, 352 bytes cmem[0]" >&2
done
while [ $# -gt 0 ]; do [ "$1" = "-o" ] && : > "$2"; shift; done
"""


@pytest.mark.slow
def test_register_tables_stay_out_of_pytest_q(tmp_path):
    """``pytest -q`` of the compile test prints dots, not register tables (``-rA`` / ``-s`` show them). A fake
    nvcc (CUDA_HOME) makes this fast and independent of a CUDA toolkit."""
    fake = tmp_path / "cuda" / "bin" / "nvcc"
    fake.parent.mkdir(parents=True)
    fake.write_text(_FAKE_NVCC)
    fake.chmod(0o755)
    env = dict(os.environ, CUDA_HOME=str(tmp_path / "cuda"), PYTHONPATH=str(ROOT))
    # -rA: the captured output of passed tests goes to the summary at the end, after the dots
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-rA", "-p", "no:cacheprovider",
           "-k", "compiles_for_sm80_sm90 and flow_step.cu"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    progress, _, summary = result.stdout.partition(" PASSES ")
    assert "regs" not in progress and "kernel" not in progress, result.stdout  # between the dots: nothing
    assert re.search(r"sm_80\s+32\s", summary), result.stdout  # the table is still there, in the summary


def _cxx():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@pytest.mark.slow
@pytest.mark.skipif(_cxx() is None, reason="no C++ compiler (g++/c++) found")
@pytest.mark.parametrize("path", BINDING_FILES, ids=lambda p: p.name)
def test_binding_compiles_against_installed_torch(path):
    """The CUDA binding compiles against this torch's headers, whether or not it is a CUDA build."""
    import torch
    from torch.utils import cpp_extension

    cmd = [_cxx(), "-fsyntax-only", "-std=c++17", str(path), f"-I{ROOT / 'csrc'}",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-Wall", "-Werror"]
    cmd += [f"-isystem{p}" for p in cpp_extension.include_paths()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{path.name} does not compile against torch {torch.__version__}:\n{proc.stderr[-6000:]}"


@needs_nvcc
@pytest.mark.slow  # an nvcc compile
@pytest.mark.parametrize("path", [p for p in CU_FILES if p.name == "flow_step.cu"], ids=lambda p: p.name)
def test_flow_step_uses_accurate_tanh(path, tmp_path):
    """--use_fast_math would compile tanhf to tanh.approx.f32 (~5e-4 relative error): fp32 parity fails."""
    ptx = tmp_path / "flow_step.ptx"
    flags = [f for f in _build.nvcc_flags(["90"]) if not f.startswith("-gencode")]
    proc = subprocess.run([NVCC, "-ptx", "-arch=compute_90", str(path), "-o", str(ptx)] + flags,
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    text = ptx.read_text()
    assert "tanh.approx" not in text, "approximate tanh in the PTX: are the nvcc flags using --use_fast_math?"
