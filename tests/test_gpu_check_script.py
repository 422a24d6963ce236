"""benchmarks/gpu_check.sh on a machine without a usable GPU: clear message, distinct exit code,
nothing heavy run (no install, no tests, no benchmark)."""
import os
import stat
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_check.sh")
EXIT_USAGE, EXIT_NO_GPU, EXIT_NO_CUDA_TORCH = 2, 3, 4

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="a GPU is present: the script would run the full check")


def _fake_nvidia_smi(bin_dir, stdout, rc):
    """An `nvidia-smi` stand-in printing ``stdout`` and exiting with ``rc``."""
    os.makedirs(bin_dir, exist_ok=True)
    path = os.path.join(bin_dir, "nvidia-smi")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nprintf '%s\\n' '{stdout}'\nexit {rc}\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def _run(args, bin_dir=None):
    env = dict(os.environ, PYTHON=sys.executable)
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=120)


def _assert_nothing_heavy(out_dir):
    assert sorted(os.listdir(out_dir)) == ["summary.txt"]


def test_usage_without_output_directory(tmp_path):
    res = _run([])
    assert res.returncode == EXIT_USAGE
    assert "usage:" in res.stderr


@pytest.mark.parametrize("smi", ["missing", "no devices"])
def test_no_gpu_exits_with_documented_code(tmp_path, smi):
    bin_dir = None
    if smi == "no devices":  # what nvidia-smi prints on a machine with the driver but no GPU
        bin_dir = tmp_path / "bin"
        _fake_nvidia_smi(bin_dir, "No devices were found", 6)
    elif any(os.access(os.path.join(d, "nvidia-smi"), os.X_OK) for d in os.environ["PATH"].split(os.pathsep)):
        pytest.skip("nvidia-smi is installed here")
    out = tmp_path / "out"
    res = _run([str(out)], bin_dir)
    assert res.returncode == EXIT_NO_GPU, res.stdout + res.stderr
    assert "no CUDA GPU present" in res.stdout and "nothing was run" in res.stdout
    _assert_nothing_heavy(out)
    assert "exit code 3" in (out / "summary.txt").read_text().lower()


@pytest.mark.slow  # runs the script's CPU-torch path in a subprocess
def test_gpu_but_cpu_only_torch(tmp_path):
    """A GPU listed by nvidia-smi but a torch that cannot use it: say what to install, exit 4."""
    bin_dir = tmp_path / "bin"
    _fake_nvidia_smi(bin_dir, "GPU 0: NVIDIA H200 (UUID: GPU-test)", 0)
    out = tmp_path / "out"
    res = _run([str(out)], bin_dir)
    assert res.returncode == EXIT_NO_CUDA_TORCH, res.stdout + res.stderr
    assert "install a CUDA build of torch" in res.stdout
    assert not (out / "install.log").exists() and not (out / "pytest_gpu.log").exists()


def test_aot_summary_runs_before_the_gpu_tests(tmp_path):
    """With a (fake) GPU and CUDA torch, the AOT compile check runs right after install, before
    any test or benchmark, and its summary line lands in summary.txt."""
    bin_dir = tmp_path / "bin"
    _fake_nvidia_smi(bin_dir, "GPU 0: NVIDIA H200 (UUID: GPU-test)", 0)
    calls = tmp_path / "calls.txt"
    fake_python = bin_dir / "fake-python"
    fake_python.write_text(
        "#!/bin/sh\n"
        f"echo \"$*\" >> '{calls}'\n"
        "case \"$*\" in\n"
        "  *'import torch'*) echo '2.13.0 12.8 True' ;;\n"
        "  *sta.kernels.aot*) echo 'triton AOT: 2 compiles (fake)' ;;\n"
        "esac\n")
    os.chmod(fake_python, 0o755)
    env = dict(os.environ, PYTHON=str(fake_python), STA_GPU_CHECK_SKIP_INSTALL="1", BENCH_PROVIDERS="torch",
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "out"
    res = subprocess.run(["bash", SCRIPT, str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = calls.read_text().splitlines()
    aot = [i for i, line in enumerate(lines) if "-m sta.kernels.aot" in line]
    later = [i for i, line in enumerate(lines) if line.startswith(("-m pytest", "benchmarks/"))]
    assert aot and later and aot[0] < min(later), lines
    assert "triton AOT: 2 compiles (fake)" in (out / "summary.txt").read_text()
