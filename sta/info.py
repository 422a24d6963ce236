"""``python -m sta.info``: versions, devices and the availability of every op x backend, with reasons."""
from __future__ import annotations

import platform
import sys

import torch


def backend_table(devices: list) -> list[str]:
    """One line per op x backend (x device, when the backend could run on this machine): "available"
    or why not, for a float32 input on that device."""
    from .backends import Request, all_backends, op_names

    lines = ["ops x backends (float32 input):"]
    for op in op_names():
        for backend in all_backends(op):
            missing = backend.unavailable()
            if missing:  # nothing to ask per device
                lines.append(f"  {op:15s} {backend.name:7s} {'-':7s} unavailable: " + "; ".join(missing))
                continue
            for device in devices:
                reasons = backend.why_not(Request(op, device, torch.float32))
                status = "available" if not reasons else "unavailable: " + "; ".join(reasons)
                lines.append(f"  {op:15s} {backend.name:7s} {str(device):7s} {status}")
    return lines


def report() -> str:
    """The text that ``python -m sta.info`` prints."""
    from . import __version__

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
    lines.extend(backend_table(devices))
    from . import _extension

    lines.append(f"extension sta._C: {_extension.status()}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
