"""Where the merge runs: device names ("cpu", "cuda", "cuda:1"), as torch takes them."""

from __future__ import annotations

import os
import re
import sys

from .errors import BadInput
from .lazy import torch

# Linux device nodes without which no CUDA GPU can be seen: NVIDIA's driver, ROCm's, WSL's
_GPU_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def _gpu_possible() -> bool:
    """False where no GPU can be there, found without importing torch (1-2 s): a Linux
    machine with none of the GPU drivers' device nodes."""
    return sys.platform != "linux" or any(os.path.exists(node) for node in _GPU_NODES)


def choose_device(name: str) -> str:
    """The device to merge on, checked: "auto" is "cuda" where torch sees a GPU, else "cpu"."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise BadInput(f"device: {name!r} is not a device (use auto, cpu, cuda or cuda:N)")
    if name == "auto":
        return "cuda" if _gpu_possible() and torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BadInput(f"device: {name} asked for, but no CUDA GPU is available (use cpu or auto)")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise BadInput(f"device: {name} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    return name


def on_cpu(device: object) -> bool:
    """Whether a device (a name, or a torch.device) is the CPU."""
    return str(device).partition(":")[0] == "cpu"
