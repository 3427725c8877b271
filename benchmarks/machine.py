"""Where and with what a benchmark ran: CPU, GPU, threads, load, versions, git commit."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch

from aiayn import hardware

ROOT = Path(__file__).resolve().parent.parent

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) for MFU; matched on the CUDA device name.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM, the common cloud part; PCIe is matched first above
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
}


def cpu_flags() -> list[str]:
    """The CPU features that decide CPU matmul speed (AVX-512, bf16, VNNI, AMX), as aiayn reads them."""
    features = hardware.detect().features
    return [name for name in hardware.FEATURES if name in features]


def gpu_name() -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def peak_bf16_tflops(name: str | None) -> float | None:
    if name is None:
        return None
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
            text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def describe(threads: int) -> dict:
    """Everything a reader needs to judge (and reproduce) the numbers."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "cpu": hardware.detect().cpu_model,
        "cpu_flags": cpu_flags(),
        "machine_class": hardware.detect().machine_class,
        "aten_capability": hardware.detect().aten_capability,
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "gpu": gpu_name(),
        "load_average_start": load_average(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "ctranslate2": _version("ctranslate2"),
            "aiayn": _version("aiayn"),
        },
        "git_commit": git_commit(),
    }
