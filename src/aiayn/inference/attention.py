"""Attention on the CPU for inference: which kernel serves which decoding shape.

Shape legend as in `aiayn.model.attention`: B batch, H heads, L queries, M keys, D head dim.

`prepare` sets `cpu_attention` as the `attend` of every `MultiHeadAttention` of the models it
makes for the CPU; the paper's `scaled_dot_product_attention` stays the function of the model
a reader builds. Both are tested to agree (tests/test_inference.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from aiayn.model.attention import apply_mask, fast_attention, reference_attention


def summed_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None) -> Tensor:
    """Equation 1 as elementwise products and sums instead of matrix products (no dropout).

    For incremental decoding compiled by `torch.compile` on the CPU, where a row has a few
    queries (beam search: a sentence's K beams query its memory together): inductor fuses the
    whole attention, from the projected queries to the quantised input of W^O, into one loop nest.
    The fused kernel otherwise used calls a small matrix product per row and head (MKL), whose
    packing costs more than the arithmetic. Outside a compiled graph this would materialise
    [B, H, L, M, D] products, and for long queries (the encoder) matrix products win.
    """
    scores = (query.unsqueeze(-2) * key.unsqueeze(-3)).sum(-1) / math.sqrt(query.size(-1))  # [B, H, L, M]
    scores = apply_mask(scores, mask)  # boolean, or float with a position bias (ALiBi, relative)
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    return (weights.to(value.dtype).unsqueeze(-1) * value.unsqueeze(-3)).sum(-2)  # [B, H, L, D]


def cpu_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    incremental: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """`aiayn.model.attention.scaled_dot_product_attention` with the CPU's faster kernel per shape.

    One query per row (incremental decoding, L = 1): the reference path; the fused CPU kernel's
    per-call cost is larger than the two small products it saves. Incremental decoding with more
    queries per row (a sentence's beams querying its memory together) inside a compiled graph:
    `summed_attention`, which inductor fuses into one loop nest. Otherwise the fused kernel.
    """
    if need_weights:
        return reference_attention(query, key, value, mask, dropout_p)
    if query.size(-2) == 1:
        return reference_attention(query, key, value, mask, dropout_p)[0], None
    if incremental and dropout_p == 0 and torch.compiler.is_compiling():
        return summed_attention(query, key, value, mask), None
    return fast_attention(query, key, value, mask, dropout_p), None


__all__ = ["cpu_attention", "summed_attention"]
