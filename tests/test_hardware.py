"""Capability detection and the precision / kernel choices made from it, on every machine class.

The choices are tested with `Capabilities` written out for each class (AVX2 only, AVX-512 with
AVX512-BF16 and VNNI, AMX, CUDA), so they are checked whatever CPU runs the tests.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aiayn import hardware
from aiayn.cli import main
from aiayn.hardware import Capabilities, choose_precision

AVX2 = Capabilities(cpu_model="AMD EPYC 7B13 (Zen 3)", cores=2, features=frozenset({"avx2", "fma3"}),
                    aten_capability="AVX2", onednn=True, onednn_bf16=False)
ZEN4 = Capabilities(
    cpu_model="AMD EPYC 9B14 (Zen 4)", cores=2, aten_capability="AVX512", onednn=True, onednn_bf16=True,
    features=frozenset({"avx2", "fma3", "avx512_f", "avx512_bw", "avx512_vl", "avx512_dq", "avx512_bf16",
                        "avx512_vnni", "avx_vnni"}),
)
SAPPHIRE_RAPIDS = Capabilities(
    cpu_model="Intel Xeon Platinum 8481C", cores=2, aten_capability="AVX512", onednn=True, onednn_bf16=True,
    features=ZEN4.features | {"amx_tile", "amx_bf16", "amx_int8"},
)
# An AVX-512 CPU without bf16 or VNNI (Skylake-X): oneDNN's bf16 path runs (emulated), not natively.
SKYLAKE = Capabilities(cpu_model="Intel Xeon Gold 6148", cores=2, aten_capability="AVX512", onednn=True,
                       onednn_bf16=True, features=frozenset({"avx2", "fma3", "avx512_f", "avx512_bw", "avx512_vl",
                                                             "avx512_dq"}))
H100 = Capabilities(cpu_model="x", cores=16, features=AVX2.features, onednn=True, cuda_device="NVIDIA H100",
                    cuda_bf16=True)
T4 = Capabilities(cpu_model="x", cores=4, features=AVX2.features, onednn=True, cuda_device="Tesla T4",
                  cuda_bf16=False)


def test_native_bf16_and_vnni_by_machine_class():
    assert not AVX2.cpu_bf16 and not AVX2.cpu_vnni
    assert not SKYLAKE.cpu_bf16 and not SKYLAKE.cpu_vnni
    assert ZEN4.cpu_bf16 and ZEN4.cpu_vnni
    assert SAPPHIRE_RAPIDS.cpu_bf16 and SAPPHIRE_RAPIDS.cpu_vnni
    assert H100.native_bf16("cuda") and not H100.native_bf16("cpu")
    assert not T4.native_bf16("cuda:0")


def test_machine_classes():
    assert [caps.machine_class for caps in (AVX2, SKYLAKE, ZEN4, SAPPHIRE_RAPIDS)] == [
        "AVX2", "AVX-512", "AVX512-BF16", "AMX"]
    assert Capabilities(cpu_model="Apple M2", cores=8).machine_class == "other"


def test_auto_is_fp32_without_native_bf16_and_never_measures():
    def timings():
        raise AssertionError("no measurement where bf16 is not native")

    for caps, device in ((AVX2, "cpu"), (SKYLAKE, "cpu"), (T4, "cuda"), (H100, "cpu")):
        choice = choose_precision("auto", device, capabilities=caps, timings=timings)
        assert choice.precision == "fp32" and not choice.warning
        assert choice.message.startswith("precision auto -> fp32 (no native bf16 on")


def test_auto_takes_bf16_where_native_and_measured_faster():
    assert choose_precision("auto", "cpu", capabilities=SAPPHIRE_RAPIDS).precision == "bf16"  # no timing given
    faster = choose_precision("auto", "cpu", capabilities=ZEN4, timings=lambda: {"fp32": 2.0, "bf16": 1.0})
    assert faster.precision == "bf16" and "measured 2.00x fp32" in faster.reason
    slower = choose_precision("auto", "cpu", capabilities=ZEN4, timings=lambda: {"fp32": 1.0, "bf16": 1.2})
    assert slower.precision == "fp32" and "measured 0.83x fp32" in slower.reason
    # Within the noise of a short measurement: fp32, the exact reference.
    close = choose_precision("auto", "cpu", capabilities=ZEN4, timings=lambda: {"fp32": 1.05, "bf16": 1.0})
    assert close.precision == "fp32"
    assert choose_precision("auto", "cuda", capabilities=H100).precision == "bf16"


def test_explicit_precisions():
    assert choose_precision("fp32", "cpu", capabilities=SAPPHIRE_RAPIDS).precision == "fp32"
    slow = choose_precision("bf16", "cpu", capabilities=AVX2)
    assert slow.precision == "bf16" and slow.warning  # still runs, with a warning naming the slowdown
    assert "30x slower than fp32" in slow.message and "AMD EPYC 7B13" in slow.message
    native = choose_precision("bf16", "cpu", capabilities=ZEN4)
    assert native.precision == "bf16" and not native.warning
    assert choose_precision("bf16", "cuda", capabilities=T4).warning
    with pytest.raises(ValueError, match="int8 runs on the CPU only"):
        choose_precision("int8", "cuda", capabilities=H100)
    with pytest.raises(ValueError, match="precision must be one of"):
        choose_precision("fp16", "cpu", capabilities=AVX2)


def test_int8_needs_vnni_else_fp32_with_a_warning():
    for caps in (ZEN4, SAPPHIRE_RAPIDS):
        choice = choose_precision("int8", "cpu", capabilities=caps)
        assert choice.precision == "int8" and not choice.warning
    for caps in (AVX2, SKYLAKE):
        choice = choose_precision("int8", "cpu", capabilities=caps)
        assert choice.precision == "fp32" and choice.warning
        assert "has no VNNI" in choice.message and "20x slower than fp32), so fp32 runs instead" in choice.message


def test_time_each_keeps_the_fastest_round_of_each():
    calls = []
    seconds = hardware.time_each({"short": lambda: time.sleep(0.002), "long": lambda: calls.append(time.sleep(0.02))},
                                 repeats=3)
    assert len(calls) == 3
    assert 0.002 <= seconds["short"] < seconds["long"] and seconds["long"] >= 0.02


def _cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads /proc/cpuinfo (Linux)")
def test_detect_reads_the_cpu_not_aten_cpu_capability():
    caps = hardware.detect()
    flags = _cpuinfo_flags()
    # cpuinfo's names against the kernel's: the features that decide the precision agree.
    for ours, kernel in (("avx2", "avx2"), ("avx512_f", "avx512f"), ("avx512_bf16", "avx512_bf16"),
                         ("avx512_vnni", "avx512_vnni"), ("amx_bf16", "amx_bf16")):
        assert (ours in caps.features) == (kernel in flags), ours
    assert caps.cores == os.cpu_count()
    # ATEN_CPU_CAPABILITY=avx2 changes the kernels PyTorch dispatches, not what the CPU can do.
    code = ("import json; from aiayn import hardware; c = hardware.detect(); "
            "print(json.dumps([sorted(c.features), c.cpu_bf16, c.cpu_vnni, c.aten_capability]))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    features, cpu_bf16, cpu_vnni, aten = json.loads(out)
    assert (set(features), cpu_bf16, cpu_vnni) == (set(caps.features), caps.cpu_bf16, caps.cpu_vnni)
    if "avx2" in flags:
        assert aten == "AVX2"


def test_cli_info_prints_capabilities_and_defaults(monkeypatch, capsys):
    monkeypatch.setattr(hardware, "detect", lambda: AVX2)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "cpu: AMD EPYC 7B13 (Zen 3), 2 cores (class AVX2)" in out
    assert "cpu features: avx2 fma3" in out
    assert "native bf16 on the cpu: no; fast int8 (VNNI): no" in out
    assert "precision auto -> fp32 (no native bf16 on this CPU (AMD EPYC 7B13 (Zen 3)))" in out
    assert "precision int8: fp32 instead: this CPU (AMD EPYC 7B13 (Zen 3)) has no VNNI" in out and "bf16 no" in out
    monkeypatch.setattr(hardware, "detect", lambda: SAPPHIRE_RAPIDS)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "amx_bf16" in out and "precision auto -> bf16 where it measures at least 1.1x faster" in out
    assert "precision int8: int8 weights and activations, VNNI" in out


def test_real_machine_info_runs(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cpu: ") and f"pytorch {torch.__version__}" in out
