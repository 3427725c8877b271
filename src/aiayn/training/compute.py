"""Training compute: floating-point operations of a training step, so that every result can be read
against the work it took rather than against one machine's minutes.

With N_enc, N_dec the non-embedding parameters of the two stacks, E = d_model, V the vocabulary,
L_e / L_d the layer counts and, per batch row, S / T its padded source / target length and s / t its
real (non-padding) token counts, one forward + backward pass costs
    6 * (N_enc * sum(s) + N_dec * sum(t))             weight matmuls, forward + backward
  + 6 * V * E * sum(t)                               output projection (tied, still a matmul)
  + 12 * E * (L_e * sum(S^2) + L_d * sum(T^2 + T*S))  attention scores and weighted sums
(the "6 N" rule of Kaplan et al. 2020 plus the attention term; the causal half is not discounted;
LayerNorm, softmax, dropout and the optimizer step are left out: they are elementwise, a few
percent at these shapes).
"""

from __future__ import annotations

import torch

from aiayn.config import ModelConfig


def stack_parameters(config: ModelConfig) -> tuple[int, int]:
    """Non-embedding parameters of the encoder and of the decoder stack (weights and biases)."""
    model_dim = config.d_model
    attention = 4 * model_dim * model_dim + 4 * model_dim
    ffn = 2 * model_dim * config.d_ff + config.d_ff + model_dim
    encoder = config.n_encoder_layers * (attention + ffn + 4 * model_dim)
    decoder = config.n_decoder_layers * (2 * attention + ffn + 6 * model_dim)
    return encoder, decoder


def step_flops(config: ModelConfig, src_tokens: torch.Tensor, tgt_output: torch.Tensor) -> float:
    """FLOPs of a forward + backward pass over one batch (formula in the module docstring).

    Args:
        src_tokens: [B, S] source ids; tgt_output: [B, T] target ids (padding = config.pad_id).
    """
    encoder_params, decoder_params = stack_parameters(config)
    src_real = int((src_tokens != config.pad_id).sum())
    tgt_real = int((tgt_output != config.pad_id).sum())
    rows, src_len = src_tokens.shape
    tgt_len = tgt_output.size(1)
    attention = 12 * config.d_model * rows * (
        config.n_encoder_layers * src_len**2 + config.n_decoder_layers * (tgt_len**2 + tgt_len * src_len)
    )
    weights = 6 * (encoder_params * src_real + decoder_params * tgt_real)
    return float(weights + 6 * config.vocab_size * config.d_model * tgt_real + attention)


def batches_flops(config: ModelConfig, batches) -> float:
    """FLOPs of a forward + backward pass over each of `batches` (`aiayn.files.data.Batch`), summed."""
    return sum(step_flops(config, batch.src_tokens, batch.tgt_output) for batch in batches)


def mean_update_flops(config: ModelConfig, corpus, batch_tokens: int, batches_per_update: int = 1) -> float:
    """Mean FLOPs of an update over one epoch of `corpus` (`aiayn.files.data.TokenizedCorpus`) in
    batches of `batch_tokens`, `batches_per_update` batches an update: what a budget in TFLOP buys."""
    from aiayn.files.data import BatchIterator

    total = count = 0
    for batch in BatchIterator(corpus, batch_tokens, shuffle=False):
        total += step_flops(config, batch.src_tokens, batch.tgt_output)
        count += 1
    return total * batches_per_update / count
