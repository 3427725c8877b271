"""aiayn.allocator: freed memory stays in the process, so steps stop page-faulting."""

import os
import platform
import subprocess
import sys

import pytest

from aiayn.allocator import OPT_OUT_VARIABLES


# A decoding-like allocation pattern: a cache that grows by one position per step, reordered, a fresh
# 4 MB logits tensor, and a 40 MB one (beam 4 x 64 sentences x a 40k vocabulary). glibc's dynamic
# mmap threshold stops at 32 MB, so under its defaults the 40 MB block is mmap'd and unmapped at
# every step whatever the heap's history (the smaller blocks fault or not depending on how the
# heap settled: CI once saw none). Prints the page faults per step after a warm-up.
_FAULTS_SCRIPT = """
import resource, sys, torch
from aiayn.allocator import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def step(cache):
    grown = torch.cat([cache, torch.ones(64, 4, 1, 64)], dim=2)
    return grown[torch.randperm(64)], torch.randn(128, 8000).sum() + torch.ones(256, 40_000).sum()
per_step = []
for run in range(5):  # 2 warm-up runs, then the fewest faults of 3 (the kernel may reclaim pages meanwhile)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cache = torch.zeros(64, 4, 1, 64)
    for _ in range(30):
        cache, _ = step(cache)
    per_step.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 30)
print(min(per_step[2:]))
"""


@pytest.mark.slow(seconds=16)
@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_retain_freed_memory_stops_page_faults_between_steps():
    env = {k: v for k, v in os.environ.items() if k not in OPT_OUT_VARIABLES}

    def faults_per_step(mode: str) -> float:
        result = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return float(result.stdout.strip())

    default, retained = faults_per_step("default"), faults_per_step("retain")
    # Measured (fewest of 3 runs): about 10,000 per step under the defaults (the 40 MB block's 4 KB
    # pages; some 20 if the kernel backs it with 2 MB pages), 0 retained.
    assert retained <= 5.0, f"{retained} page faults per step with freed memory retained"
    assert default >= 10.0, f"the pattern should fault under glibc's defaults, got {default} per step"


def _without_kernel_cache_variables(monkeypatch):
    from aiayn.allocator import KERNEL_CACHE_VARIABLES

    for name in KERNEL_CACHE_VARIABLES:
        monkeypatch.setenv(name, "placeholder")  # so that the undo restores the variable's absence too
        monkeypatch.delenv(name)


def test_kernel_caches_are_bounded_unless_the_user_chose(monkeypatch):
    from aiayn.allocator import KERNEL_CACHE_CAPACITY, KERNEL_CACHE_VARIABLES, bound_kernel_caches

    assert KERNEL_CACHE_VARIABLES == ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
    _without_kernel_cache_variables(monkeypatch)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "300")  # the user's choice stays
    assert bound_kernel_caches() == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(KERNEL_CACHE_CAPACITY),
                                     "LRU_CACHE_CAPACITY": "300"}
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "16"


def test_decoding_commands_bound_the_kernel_caches_before_the_model_loads(tiny_model_dir, monkeypatch):
    import argparse

    from aiayn import cli
    from aiayn.allocator import KERNEL_CACHE_VARIABLES
    from aiayn.decoding.translator import Translator

    _without_kernel_cache_variables(monkeypatch)
    seen = {}
    real_load = Translator.load

    def load(*args, **kwargs):
        seen.update({name: os.environ.get(name) for name in KERNEL_CACHE_VARIABLES})
        return real_load(*args, **kwargs)

    monkeypatch.setattr(Translator, "load", load)
    args = argparse.Namespace(model=str(tiny_model_dir), device="cpu", precision="fp32", compile=False,
                              command="translate")
    assert isinstance(cli._load_translator(args), Translator)
    assert seen == {name: "16" for name in KERNEL_CACHE_VARIABLES}
