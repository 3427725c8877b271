"""What this machine can do, and the precision it implies.

Every speed path of aiayn depends on an ISA feature that some CPUs have and others lack:

    bf16 matrix products   native with AVX512-BF16 or AMX-BF16 (oneDNN); elsewhere PyTorch falls
                           back to a reference GEMM, about 30x slower than float32
    oneDNN bf16 packing    needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT, else it raises
    int8 products          `torch._int_mm` is fast with VNNI (AVX512-VNNI, AVX-VNNI, AMX-INT8)
                           and a reference loop without it

`detect()` reads them once from the CPU itself (`torch.cpu.get_capabilities()`, cpuinfo), not from
ATEN_CPU_CAPABILITY: that variable only chooses which of PyTorch's own vector kernels run. Tests
pass their own `Capabilities` to the functions below to see every machine class.

`choose_precision` turns `--precision auto` into fp32 or bf16: bf16 only where it is native and,
when the caller can time its own work, measured faster. int8 is never chosen for the user (it
changes translations), and where it is asked for on a CPU without VNNI, fp32 runs instead, with a
warning.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aiayn.config import PRECISIONS

# The features named in reports, in cpuinfo's spelling (`torch.cpu.get_capabilities()`).
FEATURES = (
    "avx2", "fma3", "avx512_f", "avx512_bw", "avx512_vl", "avx512_dq", "avx512_bf16", "avx512_vnni",
    "avx_vnni", "avx_ne_convert", "amx_tile", "amx_bf16", "amx_int8",
)
# bf16 is chosen by `auto` only when the caller's timing shows at least this speed-up over fp32:
# a smaller gain is within the noise of a short measurement, and fp32 is the exact reference.
MIN_BF16_SPEEDUP = 1.1
# A reference bf16 GEMM against MKL's float32 one (measured on an AVX2 AMD EPYC: 56 against 1,863
# training target tokens/s).
NON_NATIVE_BF16_SLOWDOWN = 30
# `torch._int_mm` without VNNI against float32 decoding (the same CPU: 87 against 1,726
# tokens/s). int8 weights with float32 activations (`torch._weight_int8pack_mm`) are no way out:
# 15x slower than float32 at beam 4 with PyTorch's AVX2 kernels (benchmarks/RESULTS.md).
NON_VNNI_INT8_SLOWDOWN = 20


@dataclass(frozen=True)
class Capabilities:
    """The CPU / GPU features that decide which precision and kernels are fast here."""

    cpu_model: str
    cores: int
    features: frozenset[str] = field(default_factory=frozenset)
    aten_capability: str = "DEFAULT"  # the vector kernels PyTorch dispatches (ATEN_CPU_CAPABILITY)
    onednn: bool = False  # this PyTorch build has oneDNN (mkldnn)
    onednn_bf16: bool = False  # oneDNN's bf16 kernels run here (its packing raises otherwise)
    cuda_device: str | None = None
    cuda_bf16: bool = False
    cpp_compiler: str | None = None  # what torch.compile and the fused beam step build with on the CPU

    @property
    def cpu_bf16(self) -> bool:
        """Native bf16 matrix products on the CPU (AVX512-BF16 or AMX-BF16)."""
        return bool({"avx512_bf16", "amx_bf16"} & self.features) and self.onednn

    @property
    def cpu_vnni(self) -> bool:
        """int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8): fast `torch._int_mm`."""
        return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & self.features) and self.onednn

    @property
    def machine_class(self) -> str:
        """The class of CPU that benchmark tables are kept by: AMX, AVX512-BF16, AVX-512, AVX2, other."""
        if {"amx_tile", "amx_bf16"} <= self.features:
            return "AMX"
        if "avx512_bf16" in self.features:
            return "AVX512-BF16"
        if "avx512_f" in self.features:
            return "AVX-512"
        return "AVX2" if "avx2" in self.features else "other"

    def native_bf16(self, device: str | torch.device) -> bool:
        """True where bf16 matrix products run natively on `device`."""
        return self.cuda_bf16 if torch.device(device).type == "cuda" else self.cpu_bf16

    def report(self) -> list[str]:
        """Lines for `aiayn info`."""
        names = [name for name in FEATURES if name in self.features]
        return [
            f"cpu: {self.cpu_model}, {self.cores} cores (class {self.machine_class})",
            f"cpu features: {' '.join(names) or 'none of ' + ' '.join(FEATURES)}",
            f"pytorch {torch.__version__}: vector kernels {self.aten_capability}, "
            f"oneDNN {'yes' if self.onednn else 'no'} (bf16 kernels {'yes' if self.onednn_bf16 else 'no'})",
            f"native bf16 on the cpu: {'yes' if self.cpu_bf16 else 'no'}; "
            f"fast int8 (VNNI): {'yes' if self.cpu_vnni else 'no'}",
            "cuda: " + (f"{self.cuda_device}, native bf16 {'yes' if self.cuda_bf16 else 'no'}"
                        if self.cuda_device else "none"),
            f"c++ compiler (torch.compile on the cpu): {self.cpp_compiler or 'none found'}",
        ]


def _cpu_model(capabilities: dict) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return str(capabilities.get("cpu_name") or platform.processor() or "unknown")


def _cpp_compiler() -> str | None:
    """The C++ compiler inductor would call ($CXX, else g++ / clang++ / c++ on the PATH)."""
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@functools.lru_cache(maxsize=1)
def detect() -> Capabilities:
    """This machine's capabilities (read once per process)."""
    try:
        found = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # older PyTorch / an architecture cpuinfo does not know
        found = {}
    onednn = torch.backends.mkldnn.is_available()
    features = frozenset(name for name in FEATURES if found.get(name) is True)
    # PyTorch's own condition for oneDNN's bf16 path on x86 (its error message names it).
    onednn_bf16 = onednn and ({"avx512_bw", "avx512_vl", "avx512_dq"} <= features or "avx_ne_convert" in features)
    cuda = torch.cuda.is_available()
    return Capabilities(
        cpu_model=_cpu_model(found),
        cores=os.cpu_count() or 1,
        features=features,
        aten_capability=torch.backends.cpu.get_cpu_capability(),
        onednn=onednn,
        onednn_bf16=onednn_bf16,
        cuda_device=torch.cuda.get_device_name(0) if cuda else None,
        cuda_bf16=cuda and torch.cuda.is_bf16_supported(),
        cpp_compiler=_cpp_compiler(),
    )


@dataclass(frozen=True)
class PrecisionChoice:
    """What a `--precision` request resolved to, and why (printed once by the commands)."""

    requested: str
    precision: str  # fp32 | bf16 | int8
    reason: str
    warning: bool = False  # the user asked for something that is slow here

    @property
    def message(self) -> str:
        return f"precision {self.requested} -> {self.precision} ({self.reason})"


def time_each(runs: dict[str, Callable[[], object]], repeats: int = 3) -> dict[str, float]:
    """Fastest wall time of each callable over `repeats` rounds, called in turn (so load and
    frequency changes hit every candidate alike). Call each once before, to exclude warm-up."""
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def choose_precision(
    requested: str,
    device: str | torch.device = "cpu",
    *,
    capabilities: Capabilities | None = None,
    timings: Callable[[], dict[str, float]] | None = None,
) -> PrecisionChoice:
    """Resolve `requested` (auto, fp32, bf16, int8) for `device`.

    auto: fp32 where bf16 is not native; where it is, bf16 unless `timings()` (seconds of the
    caller's own work per precision, keys "fp32" and "bf16") shows less than `MIN_BF16_SPEEDUP`.
    An explicit bf16 where it is not native still runs, with a warning naming the slowdown.
    Raises:
        ValueError: an unknown precision, or int8 off the CPU.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    device = torch.device(device)
    caps = capabilities or detect()
    where = caps.cuda_device if device.type == "cuda" else f"this CPU ({caps.cpu_model})"
    if requested == "int8":
        if device.type != "cpu":
            raise ValueError(f"precision int8 runs on the CPU only, got device {device}")
        if caps.cpu_vnni:
            return PrecisionChoice(requested, "int8", "int8 weights and activations, VNNI int8 products")
        return PrecisionChoice(
            requested, "fp32", f"{where} has no VNNI: torch._int_mm has no fast int8 kernel here (about "
            f"{NON_VNNI_INT8_SLOWDOWN}x slower than fp32), so fp32 runs instead", warning=True)
    if requested == "fp32":
        return PrecisionChoice(requested, "fp32", "as asked")
    native = caps.native_bf16(device)
    if requested == "bf16":
        if native:
            return PrecisionChoice(requested, "bf16", f"native on {where}")
        if device.type == "cuda":
            return PrecisionChoice(requested, "bf16", f"{where} has no native bf16: expect it slower than fp32",
                                   warning=True)
        return PrecisionChoice(
            requested, "bf16",
            f"{where} has no AVX512-BF16 or AMX: bf16 matrix products take a reference path, expect about "
            f"{NON_NATIVE_BF16_SLOWDOWN}x slower than fp32; --precision auto picks fp32 here",
            warning=True,
        )
    if not native:
        return PrecisionChoice(requested, "fp32", f"no native bf16 on {where}")
    if timings is None:
        return PrecisionChoice(requested, "bf16", f"native bf16 on {where}")
    seconds = timings()
    speedup = seconds["fp32"] / seconds["bf16"]
    if speedup >= MIN_BF16_SPEEDUP:
        return PrecisionChoice(requested, "bf16", f"native on {where}, measured {speedup:.2f}x fp32 here")
    return PrecisionChoice(
        requested, "fp32", f"bf16 is native on {where} but measured {speedup:.2f}x fp32 here, below "
        f"{MIN_BF16_SPEEDUP}x")





def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, once it is known to exist here.

    Raises:
        ValueError: an unknown device string, CUDA asked for where there is none, or a GPU index
            beyond those visible.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r} ({error})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"device {device} asked for, but {why}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    elif device.type not in ("cpu", "mps"):
        raise ValueError(f"device {device} is not supported; use cpu or cuda")
    return device


__all__ = [
    "FEATURES", "MIN_BF16_SPEEDUP", "PRECISIONS", "Capabilities", "PrecisionChoice", "check_device",
    "choose_precision",
    "detect", "time_each",
]
