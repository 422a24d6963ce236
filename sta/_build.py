"""How ``sta._C`` is built: the ahead-of-time hook of setup.py and the sources/flags shared with the
just-in-time loader (:mod:`sta._extension`).

Environment:
  ``STA_BUILD_EXT=auto|0|1`` -- build the C++ extension during ``pip install`` (``auto``, the
  default: when torch imports and a C++ compiler is found; a failed build then only warns, and the
  first use compiles it just in time). ``1`` makes a failure fatal; ``0`` skips it.
  ``STA_BUILD_CUDA=auto|0|1`` -- also compile ``csrc/cuda/*`` (``auto``: when torch has CUDA and
  nvcc is found).

This file is executed by setup.py without importing the ``sta`` package: it imports only the
standard library at module level.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
import warnings

#: Compiler flags. -fopenmp: at::parallel_for is a header template that needs OpenMP to run in
#: parallel; the extension then links the libgomp.so.1 that torch already loaded.
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-Wno-unused-parameter"]
LINK_FLAGS = ["-fopenmp"]
#: No --use_fast_math: it turns tanhf into tanh.approx.f32 (relative error ~5e-4), which breaks the
#: fp32 parity of 1e-5 (tests/test_cuda_compile.py checks the PTX for it).
NVCC_FLAGS = ["-O3", "-lineinfo", "-std=c++17"]


def cuda_archs() -> list[str]:
    """Target architectures of the CUDA build: ``STA_CUDA_ARCHS`` (default "80;90": A100, H100/H200)."""
    value = os.environ.get("STA_CUDA_ARCHS", "80;90").replace(",", ";")
    archs = [a.strip().replace(".", "") for a in value.split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise ValueError(f"STA_CUDA_ARCHS: expected numbers like '80;90', got {value!r}")
    return archs


def nvcc_flags(archs=None) -> list[str]:
    """NVCC_FLAGS plus one -gencode per architecture (SASS) and PTX of the newest (for later GPUs).

    Explicit -gencode flags also stop torch.utils.cpp_extension from adding its own arch list.
    """
    archs = list(archs) if archs is not None else cuda_archs()
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = max(archs, key=int)
    return NVCC_FLAGS + gencode + [f"-gencode=arch=compute_{newest},code=compute_{newest}"]


def find_nvcc():
    """Path of nvcc: $CUDA_HOME/bin, then PATH, then /usr/local/cuda/bin; None if absent."""
    candidates = [os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    which = shutil.which("nvcc")
    candidates += ([which] if which else []) + ["/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def _mode(var: str) -> str:
    value = os.environ.get(var, "auto").strip().lower() or "auto"
    if value not in ("auto", "0", "1"):
        raise ValueError(f"{var}: expected auto, 0 or 1, got {value!r}")
    return value


def csrc_dir(repo_root: str) -> str:
    return os.path.join(repo_root, "csrc")


def have_cxx() -> bool:
    """A C++ compiler on PATH (``$CXX``, else c++ / g++)."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx.split()[0]) is not None
    return shutil.which("c++") is not None or shutil.which("g++") is not None


def want_cuda() -> bool:
    """Whether to compile the CUDA sources (``STA_BUILD_CUDA``)."""
    mode = _mode("STA_BUILD_CUDA")
    reason = why_no_cuda()
    if mode == "1" and reason:
        raise RuntimeError(f"STA_BUILD_CUDA=1 but the CUDA sources cannot be built: {reason}")
    return not reason and bool(cuda_sources_of(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def why_no_cuda() -> str:
    """Why the CUDA sources are not compiled, or "" when they can be (also for ``python -m sta.info``)."""
    try:
        if _mode("STA_BUILD_CUDA") == "0":
            return "STA_BUILD_CUDA=0"
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA; install a CUDA build of torch, then rebuild"
    if CUDA_HOME is None:
        return "nvcc / CUDA_HOME not found"
    return ""


def cpu_sources_of(repo_root: str) -> list[str]:
    """Every C++ source of the CPU ops (one file per op; new files are picked up)."""
    return sorted(glob.glob(os.path.join(csrc_dir(repo_root), "cpu", "*.cpp")))


def cuda_sources_of(repo_root: str) -> list[str]:
    """Every CUDA source (``csrc/cuda/*.cu`` and ``*.cpp``)."""
    d = os.path.join(csrc_dir(repo_root), "cuda")
    return sorted(glob.glob(os.path.join(d, "*.cu")) + glob.glob(os.path.join(d, "*.cpp")))


def sources_of(repo_root: str, cuda: bool) -> list[str]:
    return cpu_sources_of(repo_root) + (cuda_sources_of(repo_root) if cuda else [])


def ext_modules_and_cmdclass(repo_root: str):
    """``(ext_modules, cmdclass)`` for setup(): ``sta._C`` when requested/possible, else ``([], {})``."""
    mode = _mode("STA_BUILD_EXT")
    if mode == "0":
        return [], {}
    try:
        import torch  # noqa: F401  (pip runs with --no-build-isolation: the installed torch)
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as err:
        if mode == "1":
            raise RuntimeError(f"STA_BUILD_EXT=1 but torch cannot be imported: {err}") from err
        print(f"sta: not building the C++ extension (torch not importable: {err}); "
              "it compiles on first use instead", file=sys.stderr)
        return [], {}
    if not have_cxx():
        if mode == "1":
            raise RuntimeError("STA_BUILD_EXT=1 but no C++ compiler (c++/g++ or $CXX) was found")
        print("sta: not building the C++ extension (no C++ compiler found); the torch backend is used",
              file=sys.stderr)
        return [], {}
    cuda = want_cuda()
    root = os.path.abspath(repo_root)
    sources = [os.path.relpath(s, root) for s in sources_of(root, cuda)]
    if not sources:
        return [], {}
    define = [("STA_WITH_CUDA", None)] if cuda else []
    kind = CUDAExtension if cuda else CppExtension
    args = {"cxx": CXX_FLAGS}
    if cuda:
        args["nvcc"] = nvcc_flags()
    ext = kind("sta._C", sources, include_dirs=[csrc_dir(root)], define_macros=define,
               extra_compile_args=args, extra_link_args=LINK_FLAGS)

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        """In ``auto`` mode a failed compile warns (the extension then compiles on first use)."""

        def run(self):
            try:
                super().run()
            except Exception as err:
                if mode == "1":
                    raise
                warnings.warn(f"sta: building the C++ extension failed ({type(err).__name__}: {err}); "
                              "the cpu backend will try to compile it on first use")

    return [ext], {"build_ext": BuildExt}
