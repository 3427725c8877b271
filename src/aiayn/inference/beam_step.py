"""Beam steps faster than the search's own `log_prob_step`, with its result.

Shape legend: B sentences, K beam size, V vocabulary, C = 2K candidates per sentence.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from aiayn.inference import fused_beam_step
from aiayn.decoding.search import check_beam_step_shapes, log_prob_step


def block_beam_step(scores: Tensor, step_log_probs: Tensor, block: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """`aiayn.decoding.search.beam_step` for large vocabularies: the same 2K candidates, fewer sums formed.

    The result is that of one top-2K over each sentence's K * V sums (beam score + token
    log-prob), found without forming them. Each beam's vocabulary is cut into blocks of `block`
    tokens; a block's best sum is its beam's score plus its largest log-prob (one vectorised max
    per block). The 2K best sums lie in the 2K blocks with the best maxima: a block holding one of
    them has a maximum at least as good, and a block outside those 2K has 2K blocks above it, each
    with a better sum. So the search narrows to 2K * block sums (plus each beam's last, partial
    block). Equal sums may come out in a different order than `torch.topk` gives them (which order that
    is, is unspecified).

    Arguments, result and errors as `beam_step`'s; `block`: tokens per block.
    """
    check_beam_step_shapes(scores, step_log_probs)
    batch, beam, vocab = step_log_probs.shape
    count = min(2 * beam, beam * vocab)
    n_blocks = vocab // block
    if n_blocks <= 4 * count:  # a small vocabulary: one top-k over all K * V sums
        sums = (scores.unsqueeze(-1) + step_log_probs).view(batch, -1)  # [B, K * V]
        cand_scores, flat_index = sums.topk(count, dim=-1)  # [B, C]
        return cand_scores, flat_index // vocab, flat_index % vocab
    maxima = step_log_probs[..., : n_blocks * block].unflatten(-1, (n_blocks, block)).amax(dim=-1)  # [B, K, nb]
    best_blocks = (maxima + scores.unsqueeze(-1)).view(batch, -1).topk(count, dim=-1).indices  # [B, C]
    starts = best_blocks // n_blocks * vocab + best_blocks % n_blocks * block  # [B, C], columns of [B, K * V]
    columns = (starts.unsqueeze(-1) + torch.arange(block, device=scores.device)).view(batch, -1)  # [B, C * block]
    if n_blocks * block < vocab:  # each beam's last, partial block is always searched
        tail = torch.arange(n_blocks * block, vocab, device=scores.device)
        tails = (torch.arange(beam, device=scores.device).unsqueeze(-1) * vocab + tail).view(1, -1)
        columns = torch.cat([columns, tails.expand(batch, -1)], dim=1)
    sums = step_log_probs.reshape(batch, -1).gather(1, columns) + scores.gather(1, columns // vocab)
    cand_scores, positions = sums.topk(count, dim=-1)  # [B, C]
    chosen = columns.gather(1, positions)
    return cand_scores, chosen // vocab, chosen % vocab


def beam_step_for(device: str | torch.device):
    """The fastest beam step for `aiayn.decoding.search.beam_search(step=...)` on `device`: the fused C++
    step on the CPU where it could be built, else `log_prob_step` selecting with `block_beam_step`."""
    if torch.device(device).type == "cpu" and fused_beam_step.available():
        return fused_beam_step.fused_beam_step
    return functools.partial(log_prob_step, select=block_beam_step)


__all__ = ["beam_step_for", "block_beam_step"]
