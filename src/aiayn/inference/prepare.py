"""`prepare`: a caller's `Transformer` -> a new model for inference in one precision on one device.

Shape legend: B sentences, S source length, V vocabulary.
"""

from __future__ import annotations

import copy
import warnings

import torch

from aiayn import hardware
from aiayn.config import MODEL_PRECISIONS
from aiayn.allocator import retain_freed_memory
from aiayn.model.attention import MultiHeadAttention
from aiayn.inference import prepack
from aiayn.inference.attention import cpu_attention
from aiayn.inference.compile import compile_model
from aiayn.inference.quantize import quantize_int8



def check_precision(precision: str, device: str | torch.device) -> torch.device:
    """`device` as a torch.device, after checking that `precision` (resolved) can run there.

    Raises:
        ValueError: an unknown precision, or int8 off the CPU.
    """
    if precision not in MODEL_PRECISIONS:
        raise ValueError(f"precision must be one of {MODEL_PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "int8" and device.type != "cpu":
        raise ValueError(f"precision int8 runs on the CPU only, got device {device}")
    return device


def prepare(model, *, precision: str, device: str | torch.device = "cpu", compile: bool = False):
    """A new inference model: `model` copied, converted to `precision` on `device`, in eval mode.

    The caller's model is never touched (same modules, weights, mode; still trainable).
    fp32: as trained. bf16: every weight cast once (faster than torch.autocast, which re-casts at
    every call); the positional table stays float32 (sin / cos of far positions would lose
    digits), and the search computes log-softmax and scores in float32. int8 (CPU only): every
    linear layer in int8 arithmetic with per-row scales (`quantize`), the rest float32.

    On the CPU, where each capability check passes (else the plain PyTorch path, same tokens):
        - fp32 / bf16 linear layers are pre-packed for oneDNN (`prepack`; bf16 only where oneDNN's
          bf16 kernels run);
        - attention takes `cpu_attention` (the faster kernel per decoding shape);
        - glibc malloc keeps freed memory (`aiayn.allocator`, process-wide, once);
        - compile=True routes encoder and decoder step through `torch.compile` (`compile_model`,
          needs a C++ compiler: without one it warns and stays eager) instead of packing.
    The model serves inference only afterwards. `aiayn.inference.beam_step_for(device)` gives the
    matching step for `aiayn.decoding.search.beam_search`.
    Raises:
        ValueError: an unknown precision, or int8 on a device other than the CPU.
    """
    device = check_precision(precision, device)
    model = copy.deepcopy(model).eval()
    if device.type == "cpu":
        retain_freed_memory()
        for module in model.modules():
            if isinstance(module, MultiHeadAttention):
                module.attend = cpu_attention
    if precision == "int8":
        model = quantize_int8(model.float().cpu())
    else:
        if precision == "bf16":
            model.to(torch.bfloat16)
            if model.positions is not None:  # rope, alibi, relative and none add no table
                model.positions.float()
        model = model.to(device)
    if compile and device.type == "cpu" and hardware.detect().cpp_compiler is None:
        warnings.warn("--compile needs a C++ compiler on the CPU (g++ or clang++, or set CXX); none was found, "
                      "so the model runs eagerly", RuntimeWarning, stacklevel=2)
        compile = False
    if compile:
        return compile_model(model, freeze=precision != "int8")
    # oneDNN packs bf16 weights only where its bf16 kernels run (it raises elsewhere).
    if device.type == "cpu" and precision != "int8" and prepack.available() and (
            precision == "fp32" or hardware.detect().onednn_bf16):
        prepack.pack_linear_layers(model)
    return model


def decoding_timings(model, device: str | torch.device, precisions=("fp32", "bf16"), *, rows: int = 32,
                     source_len: int = 16, steps: int = 8) -> dict[str, float]:
    """Seconds per precision for an encoder pass and `steps` cached decoder steps of `rows`
    sentences, each on its own prepared copy of `model`: what `--precision auto` weighs.
    Random source tokens; the work does not depend on their values."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    src_tokens = torch.randint(4, model.config.vocab_size, (rows, source_len), generator=generator).to(device)  # [B, S]
    tokens = torch.full((rows, 1), model.config.bos_id, dtype=torch.long, device=device)  # [B, 1]

    def run(candidate) -> None:
        with torch.inference_mode():
            encoder_out = candidate.encode(src_tokens)
            cache = candidate.new_cache()
            for _ in range(steps):
                candidate.decode(tokens, encoder_out, cache=cache)

    runs = {}
    for precision in precisions:
        candidate = prepare(model, precision=precision, device=device)
        runs[precision] = lambda candidate=candidate: run(candidate)
        runs[precision]()  # warm-up: first-call allocations and kernel selection
    return hardware.time_each(runs)


__all__ = ["check_precision", "decoding_timings", "prepare"]
