"""`torch.compile` for inference: the encoder and the decoder step as inductor graphs.

Process-wide settings, made here and nowhere else: dynamo's `recompile_limit` is raised to 64
once (every compiled model shares `Transformer.decode`'s code object), and inductor's freezing and
the fx duck-shaping flag are set around each compiled call (they are read while a graph is traced,
which can happen at any call). Those flags are process-wide, so a lock serialises the compiled
calls that set them: two threads decoding with compiled models take turns.
"""

from __future__ import annotations

import threading

import torch

# Float models compiled on the CPU autotune their linear layers (see `compile_model`). The tests
# turn it off: it multiplies compile time, and the kernels it picks are inductor's own.
CPU_AUTOTUNE = True
_SETTINGS_LOCK = threading.Lock()


def compile_model(model, *, freeze: bool):
    """Route `model.encode` and `model.decode` through `torch.compile`, in place; returns the model.

    Inductor fuses what eager mode runs as separate small ops (int8 quantise / rescale, residual
    adds, LayerNorm, softmax) and calls a decoder step as one graph, so the per-op overhead of
    incremental decoding mostly goes. Shapes are dynamic (batch, cache and source lengths change
    at every step).

    freeze: treat the weights as constants (inductor then pre-packs float linear layers for
    oneDNN itself). For float models only: with int8 layers (`aiayn.quantize`) freezing makes
    this PyTorch's compiled step produce no usable scores, so it raises ValueError.

    Float models on the CPU also compile with `max_autotune` (`CPU_AUTOTUNE`): each linear layer's
    shape is timed with inductor's C++ GEMM template against ATen's kernel, and the faster one is
    kept. That adds a few minutes to the first calls. At a few rows per step the template streams
    the weights far faster than MKL's matrix-vector product, with AVX-512 and with AVX2 kernels
    alike (benchmarks/RESULTS.md). Int8 layers call `torch._int_mm` directly: nothing to tune.

    Dynamo traces without duck shaping: by default it gives dimensions that happen to be equal
    the same symbol. At beam 4 and one sentence, the decoder's 4 rows then share the symbol of the
    4 heads, and the step is specialised to 4 rows; a float32 linear layer of fixed row count
    then goes to MKL's packed sgemm, much slower at 4 rows than oneDNN.
    """
    from aiayn.inference.quantize import Int8Linear

    if freeze and any(isinstance(module, Int8Linear) for module in model.modules()):
        raise ValueError("compile_model: freeze=True with int8 layers gives unusable scores in this PyTorch; "
                         "compile int8 models with freeze=False")
    # Dynamo keeps at most `recompile_limit` graphs per code object, shared by every compiled
    # model (all run Transformer.decode), then falls back to eager. One model needs about 8 (first
    # step / cache length 1 / longer; one row / more rows; with / without weights).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    autotune = CPU_AUTOTUNE and freeze and next(model.parameters()).device.type == "cpu"
    options = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"} if autotune else None
    for name in ("encode", "decode"):
        compiled = torch.compile(getattr(model, name), dynamic=True, options=options)
        setattr(model, name, _traced_with_settings(compiled, freeze=freeze))
    return model


def _traced_with_settings(compiled, *, freeze: bool):
    """`compiled`, called with duck shaping off (and inductor freezing on, if `freeze`)."""
    import torch._inductor.config as inductor
    import torch.fx.experimental._config as shapes

    def call(*args, **kwargs):
        # Both are read while dynamo traces and inductor compiles: at the first calls and at
        # recompiles, which can come at any call. `torch.compile(options=...)` leaves the linear
        # layers unpacked in this PyTorch; setting the config freezes them. Set and restored by
        # hand: `config.patch` costs several times more per decoder step.
        with _SETTINGS_LOCK:  # process-wide flags: one compiled call at a time sets them
            saved_freezing, saved_duck = inductor.freezing, shapes.use_duck_shape
            if freeze:
                inductor.freezing = True
            shapes.use_duck_shape = False
            try:
                return compiled(*args, **kwargs)
            finally:
                inductor.freezing, shapes.use_duck_shape = saved_freezing, saved_duck

    return call


__all__ = ["CPU_AUTOTUNE", "compile_model"]
