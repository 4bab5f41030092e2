"""The start-up check for an NVIDIA GPU that torch cannot use.

PyPI's Linux torch wheels are CUDA builds (torch 2.14.1: CUDA 13.0), and a CUDA build needs a
driver at least as new as its CUDA version: with an older driver ``torch.cuda.is_available()`` is
simply false and ``--device auto`` falls back to the CPU without a word. So, when the machine shows
a GPU (the kernel module's ``/proc/driver/nvidia/version``, or ``nvidia-smi``) and torch sees none,
the server logs a warning naming both versions and the fix, and ``/health`` reports it.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

PROC_VERSION = Path("/proc/driver/nvidia/version")

#: The oldest Linux driver each CUDA major version runs on (NVIDIA's CUDA compatibility tables;
#: within a major version, newer minor versions run on this driver through minor version
#: compatibility).
MIN_DRIVER_FOR_CUDA = {11: 450, 12: 525, 13: 580}

#: PyTorch's wheel indexes, newest CUDA first, with the oldest driver each needs.
TORCH_CUDA_INDEXES = [("cu130", 580), ("cu128", 570), ("cu126", 560)]

_DRIVER_RE = re.compile(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+\.\d+(?:\.\d+)?)")


def parse_proc_version(text: str) -> str | None:
    """The driver version in /proc/driver/nvidia/version ("NVRM version: NVIDIA UNIX x86_64
    Kernel Module  535.104.05  ...")."""
    match = _DRIVER_RE.search(text)
    return match.group(1) if match else None


def nvidia_driver_version() -> str | None:
    """The NVIDIA driver version when the machine has one loaded, else None."""
    try:
        version = parse_proc_version(PROC_VERSION.read_text())
        if version:
            return version
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.strip().splitlines()[0].strip() if out.strip() else ""
    return first if re.fullmatch(r"\d+\.\d+(\.\d+)?", first) else None


def _major(version: str) -> int:
    return int(version.split(".", 1)[0])


def mismatch_warning(driver: str | None, cuda_available: bool, torch_cuda: str | None) -> str | None:
    """The warning for a GPU that torch cannot use, or None when there is nothing to say.

    ``driver``: the NVIDIA driver version (None: no NVIDIA GPU); ``torch_cuda``: the CUDA version
    torch was built for (``torch.version.cuda``; None for a CPU-only build)."""
    if driver is None or cuda_available:
        return None
    if torch_cuda is None:
        return (f"An NVIDIA GPU is present (driver {driver}) but this torch is a CPU-only build, so the "
                "server runs on the CPU. Install a CUDA build of torch that matches the driver "
                f"({_index_advice(driver)}; see README, 'GPU driver and torch CUDA build').")
    needed = MIN_DRIVER_FOR_CUDA.get(_major(torch_cuda))
    too_old = needed is not None and _major(driver) < needed
    cause = (f"torch was built for CUDA {torch_cuda}, which needs NVIDIA driver >= {needed}, "
             f"and the driver is {driver}" if too_old else
             f"torch (CUDA {torch_cuda}) cannot use it with driver {driver}: check that the GPU is visible to "
             "this process (CUDA_VISIBLE_DEVICES, container runtime) and that the driver works (nvidia-smi)")
    return (f"An NVIDIA GPU is present but torch.cuda.is_available() is false, so --device auto runs "
            f"on the CPU: {cause}. Fix: update the driver, or install a torch build matching it "
            f"({_index_advice(driver)}; see README, 'GPU driver and torch CUDA build').")


def _index_advice(driver: str) -> str:
    for tag, min_driver in TORCH_CUDA_INDEXES:
        if _major(driver) >= min_driver:
            return f"pip install torch --index-url https://download.pytorch.org/whl/{tag}"
    return "the driver is older than every CUDA build of current torch: update the driver"


def gpu_warning() -> str | None:
    """Probe this machine (driver, torch) and return the warning, if any."""
    import torch

    driver = nvidia_driver_version()
    if driver is None:
        return None
    return mismatch_warning(driver, torch.cuda.is_available(), torch.version.cuda)
