"""``python -m sta.info``: versions, devices and the availability of every backend, with reasons."""
from __future__ import annotations

import platform
import sys

import torch


def _backend_request(device: torch.device, dtype: torch.dtype):
    from .backends import StepRequest

    return StepRequest(device=device, dtype=dtype, B=128, D=64, H=64, Kp=4, Kr=4, rotational="hamiltonian",
                       outputs=frozenset({"z", "div"}), requires_grad=True)


def report() -> str:
    """The text that ``python -m sta.info`` prints."""
    from . import __version__
    from .backends import all_backends

    lines = [f"sta {__version__}", f"python {platform.python_version()} ({sys.executable})",
             f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as err:  # not installed, or broken
        lines.append(f"triton: not available ({type(err).__name__}: {err})")
    lines.append(f"numpy {__import__('numpy').__version__}")
    devices = [torch.device("cpu")]
    lines.append(f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            lines.append(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
            devices.append(torch.device("cuda", i))
    else:
        lines.append("cuda: no GPU visible")
    lines.append("")
    lines.append("backends (flow_step, float32 input):")
    for backend in all_backends():
        for device in devices:
            reasons = backend.why_not(_backend_request(device, torch.float32))
            status = "available" if not reasons else "unavailable: " + "; ".join(reasons)
            lines.append(f"  {backend.name:7s} {str(device):7s} {status}")
    from . import _extension

    lines.append(f"extension sta._C: {_extension.status()}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
