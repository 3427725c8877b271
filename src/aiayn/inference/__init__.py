"""Fast inference, kept apart from the paper code: one entry point, `prepare`.

`aiayn.model` and `aiayn.decoding.search` read like the paper and import nothing from here; what
is faster is handed to them: `prepare` returns a converted *copy* of a model (its attention
function, linear layers, compiled graphs), and `beam_step_for` a beam step for
`beam_search(step=...)`. Every private PyTorch API the project uses sits in this package, each
behind a capability check (`aiayn.hardware`) with a fallback that gives the same tokens:

    prepack.py          oneDNN-packed linear layers (`torch.ops.mkldnn._*`)
    quantize.py         int8 linear layers (`torch._int_mm`; fast only with VNNI)
    layers.py           the generic linear-layer replacement both use
    attention.py        the CPU's attention kernel per decoding shape (`summed_attention`)
    fused_beam_step.py  log-softmax, masks and beam step in one C++ pass (inductor's C++ toolchain)
    beam_step.py        `beam_step_for`: that, or the block-maxima equivalent of `search.beam_step`
    compile.py          `torch.compile` of the encoder and decoder step (dynamo / inductor flags)
    prepare.py          `prepare`, and the timing `--precision auto` weighs

Process-wide settings are made by `prepare` only: glibc malloc's thresholds (`aiayn.allocator`,
once, on the CPU) and, with compile=True, dynamo's recompile limit (raised once) and inductor's
flags (around each compiled call, under a lock).
"""

from aiayn.inference.beam_step import beam_step_for
from aiayn.inference.prepare import check_precision, decoding_timings, prepare

__all__ = ["beam_step_for", "check_precision", "decoding_timings", "prepare"]
