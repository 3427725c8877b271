"""The systems aiayn is measured against, built from an aiayn model (no hub downloads, ever).

* `TorchTransformer`: `torch.nn.Transformer` of the same shape with its own tied embeddings,
  sinusoidal positions and output projection (random weights; training throughput only).
* `marian_from_aiayn`: a Hugging Face `MarianMTModel` holding a *copy* of an aiayn model's weights,
  so that both compute the same function (checked in tests/test_benchmarks.py).
* `ct2_from_marian`: a CTranslate2 model directory built from that Marian model.

Weight mapping aiayn -> Marian (both post-norm, ReLU, tied embeddings scaled by sqrt(d_model)):

    src_embedding.weight                 -> model.shared.weight (= both embed_tokens = lm_head)
    positions.table (interleaved sin/cos) -> model.{encoder,decoder}.embed_positions.weight
    *.self_attn.in_proj  [3E, E] rows q|k|v -> self_attn.{q,k,v}_proj
    decoder cross_attn.in_proj             -> encoder_attn.{q,k,v}_proj
    *.out_proj                             -> *.out_proj (cross: encoder_attn.out_proj)
    feed_forward.linear1 / linear2         -> fc1 / fc2
    encoder norm1, norm2                   -> self_attn_layer_norm, final_layer_norm
    decoder norm1, norm2, norm3            -> self_attn_layer_norm, encoder_attn_layer_norm,
                                              final_layer_norm

Marian builds its sinusoid table in the concatenated [sin | cos] layout, aiayn in the paper's
interleaved layout (even dims sin, odd dims cos). The two are a permutation of the same features,
but a permuted table added to unpermuted embeddings is a different function, so the aiayn table is
written into Marian's (frozen) position embedding as is. Marian's decoder starts from
`decoder_start_token_id`, set to aiayn's BOS (2); its `final_logits_bias` stays zero.

Shape legend: B batch, S source length, T target length, E d_model, V vocabulary.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from aiayn.config import ModelConfig
from aiayn.model.transformer import Transformer, sinusoidal_table
from aiayn.training.train import label_smoothed_nll_loss

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")  # ids 0..3, as in aiayn.config


# --- torch.nn.Transformer of the same shape --------------------------------------------------


class TorchTransformer(nn.Module):
    """`torch.nn.Transformer` (batch_first, post-norm) + tied scaled embeddings + sinusoids.

    nn.Transformer always adds a final LayerNorm to both stacks (aiayn's post-norm does not);
    its dropout also applies to the attention weights (one rate for both).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_id)
        nn.init.normal_(self.embedding.weight, std=config.d_model**-0.5)
        self.register_buffer("positions", sinusoidal_table(config.max_positions, config.d_model), persistent=False)
        self.dropout = nn.Dropout(config.dropout)
        self.transformer = nn.Transformer(
            d_model=config.d_model, nhead=config.n_heads, num_encoder_layers=config.n_encoder_layers,
            num_decoder_layers=config.n_decoder_layers, dim_feedforward=config.d_ff, dropout=config.dropout,
            batch_first=True, norm_first=config.norm_first,
        )

    def _embed(self, tokens: Tensor) -> Tensor:
        x = self.embedding(tokens) * math.sqrt(self.config.d_model) + self.positions[: tokens.size(1)]
        return self.dropout(x)  # [B, L, E]

    def forward(self, src_tokens: Tensor, tgt_input: Tensor) -> Tensor:
        """[B, S], [B, T] -> logits [B, T, V]."""
        pad = self.config.pad_id
        causal = nn.Transformer.generate_square_subsequent_mask(tgt_input.size(1), dtype=torch.bool)
        hidden = self.transformer(
            self._embed(src_tokens), self._embed(tgt_input), tgt_mask=causal,
            src_key_padding_mask=src_tokens == pad, tgt_key_padding_mask=tgt_input == pad,
            memory_key_padding_mask=src_tokens == pad, tgt_is_causal=True,
        )  # [B, T, E]
        return nn.functional.linear(hidden, self.embedding.weight)


# --- Hugging Face Marian with aiayn's weights ------------------------------------------------


def marian_config(config: ModelConfig, *, attn_implementation: str = "sdpa"):
    """A `MarianConfig` of the same shape as an aiayn `ModelConfig` (post-norm, ReLU, tied)."""
    from transformers import MarianConfig

    if config.norm_first or not config.share_embeddings or config.positional_encoding != "sinusoidal":
        raise ValueError("the Marian peer needs post-norm, shared embeddings and sinusoidal positions")
    marian = MarianConfig(
        vocab_size=config.vocab_size, decoder_vocab_size=config.vocab_size, d_model=config.d_model,
        encoder_layers=config.n_encoder_layers, decoder_layers=config.n_decoder_layers,
        encoder_attention_heads=config.n_heads, decoder_attention_heads=config.n_heads,
        encoder_ffn_dim=config.d_ff, decoder_ffn_dim=config.d_ff, activation_function="relu",
        dropout=config.dropout, attention_dropout=config.attention_dropout, activation_dropout=0.0,
        max_position_embeddings=config.max_positions, scale_embedding=True,
        share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
        pad_token_id=config.pad_id, bos_token_id=config.bos_id, eos_token_id=config.eos_id,
        decoder_start_token_id=config.bos_id, forced_eos_token_id=None,
    )
    marian._attn_implementation = attn_implementation
    return marian


def _copy_linear(target: nn.Linear, weight: Tensor, bias: Tensor) -> None:
    target.weight.copy_(weight)
    target.bias.copy_(bias)


def _copy_attention(target, source) -> None:
    """aiayn MultiHeadAttention (stacked in_proj rows q | k | v) -> Marian q/k/v/out_proj."""
    weight, bias = source.in_proj.weight, source.in_proj.bias  # [3E, E], [3E]
    for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
        rows = slice(index * source.d_model, (index + 1) * source.d_model)
        _copy_linear(getattr(target, name), weight[rows], bias[rows])
    _copy_linear(target.out_proj, source.out_proj.weight, source.out_proj.bias)


def _copy_norm(target: nn.LayerNorm, source: nn.LayerNorm) -> None:
    if target.eps != source.eps:
        raise ValueError(f"LayerNorm eps differ: {target.eps} vs {source.eps}")
    target.weight.copy_(source.weight)
    target.bias.copy_(source.bias)


@torch.no_grad()
def marian_from_aiayn(model: Transformer, *, attn_implementation: str = "sdpa"):
    """A `MarianMTModel` computing the same function as `model` (see the module docstring).

    Raises:
        ValueError: a shape or option Marian cannot express (pre-norm, untied, learned positions).
    """
    from transformers import MarianMTModel

    config = model.config
    marian = MarianMTModel(marian_config(config, attn_implementation=attn_implementation)).eval()
    inner = marian.model
    inner.shared.weight.copy_(model.src_embedding.weight)
    for embedding in (inner.encoder.embed_tokens, inner.decoder.embed_tokens, marian.lm_head):
        if embedding.weight.data_ptr() != inner.shared.weight.data_ptr():  # untied copy: fill it too
            embedding.weight.copy_(model.src_embedding.weight)
    table = model.positions.table  # [max_positions, E], interleaved sin / cos
    inner.encoder.embed_positions.weight.copy_(table)
    inner.decoder.embed_positions.weight.copy_(table)
    marian.final_logits_bias.zero_()
    for ours, theirs in zip(model.encoder_layers, inner.encoder.layers):
        _copy_attention(theirs.self_attn, ours.self_attn)
        _copy_linear(theirs.fc1, ours.feed_forward.linear1.weight, ours.feed_forward.linear1.bias)
        _copy_linear(theirs.fc2, ours.feed_forward.linear2.weight, ours.feed_forward.linear2.bias)
        _copy_norm(theirs.self_attn_layer_norm, ours.norm1)
        _copy_norm(theirs.final_layer_norm, ours.norm2)
    for ours, theirs in zip(model.decoder_layers, inner.decoder.layers):
        _copy_attention(theirs.self_attn, ours.self_attn)
        _copy_attention(theirs.encoder_attn, ours.cross_attn)
        _copy_linear(theirs.fc1, ours.feed_forward.linear1.weight, ours.feed_forward.linear1.bias)
        _copy_linear(theirs.fc2, ours.feed_forward.linear2.weight, ours.feed_forward.linear2.bias)
        _copy_norm(theirs.self_attn_layer_norm, ours.norm1)
        _copy_norm(theirs.encoder_attn_layer_norm, ours.norm2)
        _copy_norm(theirs.final_layer_norm, ours.norm3)
    return marian


def marian_logits(marian, src_tokens: Tensor, tgt_input: Tensor, pad_id: int) -> Tensor:
    """Teacher-forced logits [B, T, V] of a Marian model, masks built from `pad_id`."""
    return marian(
        input_ids=src_tokens, attention_mask=(src_tokens != pad_id).long(),
        decoder_input_ids=tgt_input, decoder_attention_mask=(tgt_input != pad_id).long(),
    ).logits


def full_logits_loss(logits: Tensor, tgt_output: Tensor, label_smoothing: float, pad_id: int) -> Tensor:
    """aiayn's label-smoothed loss on logits of every position, padding ignored (the peers' way)."""
    loss, _ = label_smoothed_nll_loss(
        logits.reshape(-1, logits.size(-1)), tgt_output.reshape(-1), label_smoothing, ignore_index=pad_id
    )
    return loss


# --- CTranslate2 -----------------------------------------------------------------------------


def vocabulary(vocab_size: int) -> list[str]:
    """Token strings for CTranslate2: the 4 specials at aiayn's ids, then `t4`, `t5`, ..."""
    return list(SPECIAL_TOKENS) + [f"t{i}" for i in range(len(SPECIAL_TOKENS), vocab_size)]


def ct2_from_marian(marian, output_dir: str | Path, *, quantization: str | None = None) -> Path:
    """Save a CTranslate2 model built from `marian` (a model from `marian_from_aiayn`).

    CTranslate2's own Marian loader assumes Opus-MT conventions (decoder starts from a zero
    embedding, <pad> is the last vocabulary entry), which aiayn does not follow; its BART loader
    fills the same post-norm spec from the same module names without those assumptions, so the
    spec is built with it and the vocabulary / start token are set here.
    """
    from ctranslate2.converters.transformers import BartLoader

    marian.config.normalize_before = False  # post-norm
    marian.config.normalize_embedding = False  # no LayerNorm after the embeddings
    spec = BartLoader().get_model_spec(marian)
    tokens = vocabulary(marian.config.vocab_size)
    spec.register_source_vocabulary(tokens)
    spec.register_target_vocabulary(tokens)
    spec.config.bos_token, spec.config.eos_token, spec.config.unk_token = "<s>", "</s>", "<unk>"
    spec.config.decoder_start_token = "<s>"
    spec.config.layer_norm_epsilon = marian.model.encoder.layers[0].final_layer_norm.eps
    spec.validate()
    spec.optimize(quantization=quantization)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    spec.save(str(output_dir))
    return output_dir
