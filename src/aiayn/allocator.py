"""Allocator settings for CPU work: keep freed memory in the process (glibc malloc); bound
oneDNN's per-shape kernel caches; and what a failed allocation looks like.

`retain_freed_memory` is called by `aiayn.inference.prepare` and `aiayn.training.loop.fit` on the
CPU (process-wide, once). `allocation_failure` is read by the command line and the server, which
turn a failed allocation into one line / one 503 that says what to send or set smaller.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import sys

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_retained = False
# Set by the user before Python starts: their choice wins.
OPT_OUT_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def applicable() -> bool:
    """True where `retain_freed_memory` would act: Linux with glibc, no opt-out variable set."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    return not any(name in os.environ for name in OPT_OUT_VARIABLES)


def retain_freed_memory() -> bool:
    """Keep memory that tensors free inside the process (glibc malloc) instead of returning it.

    PyTorch's CPU tensors come from malloc. Decoding allocates tensors of new sizes at every step
    (the self-attention cache grows by one position, beams are reordered, finished sentences
    leave), and with glibc's default thresholds much of what a step frees goes back to the kernel
    (trimmed heap top, mmap'd chunks), so the next step page-faults it in again: hundreds of page
    faults per beam-4 step, none after this call (the counts are in the git history of benchmarks/RESULTS.md).
    Training frees and re-allocates activations and gradients at every step the same way.

    The same effect as setting MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ before Python
    starts (jemalloc / tcmalloc, which PyTorch's CPU performance guide recommends, cache freed
    memory by design). Process-wide; the resident memory stays at its peak. Left alone where the
    user set either variable or GLIBC_TUNABLES.

    Returns:
        True where applied (now or by an earlier call): Linux with glibc; False elsewhere.
    """
    global _retained
    if _retained:
        return True
    if not applicable():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # 1 GiB: chunks below it come from the heap and stay there when freed (no munmap, no trim).
    _retained = bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    return _retained


# oneDNN's own primitive cache, and PyTorch's cache of oneDNN operations (ideep), both keyed by
# shape, 1,024 entries each by default. Read once, at the process's first oneDNN call.
KERNEL_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
KERNEL_CACHE_CAPACITY = 16


def bound_kernel_caches(capacity: int = KERNEL_CACHE_CAPACITY) -> dict[str, str]:
    """Bound oneDNN's kernel caches to `capacity` entries each; returns the values in force.

    Decoding calls each linear layer with a new row count as beams finish and batches change, and
    oneDNN keeps a primitive (JIT code and its buffers) per shape in two caches of 1,024 entries.
    A server meets new shapes for hours, so its resident memory rose by hundreds of MB before the
    caches filled; with 16 entries each it stays flat, at the same speed (measured in
    benchmarks/RESULTS.md, "soak"). Environment variables, read by the libraries at the process's
    first oneDNN call: call this before the first model call. Variables the user set are kept.
    Called by the commands that decode (through the CLI's translator loading) and by `serve()`;
    training, whose oneDNN shapes were not measured with it, keeps the defaults.
    """
    for name in KERNEL_CACHE_VARIABLES:
        os.environ.setdefault(name, str(capacity))
    return {name: os.environ[name] for name in KERNEL_CACHE_VARIABLES}


# PyTorch's words for a failed allocation: the CPU allocator ("DefaultCPUAllocator: can't allocate
# memory: you tried to allocate 123 bytes") and CUDA's ("CUDA out of memory. Tried to allocate
# 2.00 GiB"); the first is a RuntimeError, the second torch.OutOfMemoryError.
_TRIED_BYTES = re.compile(r"tried to allocate (\d+) bytes", re.IGNORECASE)
_TRIED_UNITS = re.compile(r"tried to allocate ([\d.]+) ([KMGT]i?B)", re.IGNORECASE)
_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def allocation_failure(error: BaseException) -> int | None:
    """For an error that is a failed allocation: the bytes it tried to allocate (0 where it does
    not say); None for any other error."""
    text = str(error)
    failed = isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())
    )
    if not failed:
        return None
    if found := _TRIED_BYTES.search(text):
        return int(found.group(1))
    if found := _TRIED_UNITS.search(text):
        return int(float(found.group(1)) * _UNITS[found.group(2)[0].lower()])
    return 0


__all__ = [
    "KERNEL_CACHE_CAPACITY",
    "KERNEL_CACHE_VARIABLES",
    "OPT_OUT_VARIABLES",
    "allocation_failure",
    "applicable",
    "bound_kernel_caches",
    "retain_freed_memory",
]
