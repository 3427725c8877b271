"""The Transformer (Vaswani et al., 2017), top to bottom in the paper's order.

Shape legend: B batch, S source length, T target length, E d_model, V vocabulary, H heads.
Masks: boolean, True = may attend (see `aiayn.model.attention`).

Initialisation (documented because the paper does not give one): every linear weight is
Xavier-uniform with zero bias (as in tensor2tensor and fairseq); embeddings are N(0, d_model^-0.5),
so that after the sqrt(d_model) scaling of section 3.4 they have unit variance and, tied to the
output projection, give logits of unit scale; the padding row is zero; LayerNorm is (1, 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aiayn.config import ModelConfig
from aiayn.model.attention import KVCache, MultiHeadAttention, causal_mask, padding_mask

# --- 3.5 Positional encoding -------------------------------------------------------------------
#
# `ModelConfig.positional_encoding` picks how the model learns word order. The paper adds a table
# to the embeddings; the departures put positions inside self-attention (`aiayn.model.attention`), where
# they reach the scores only, and the control gives none:
#   "sinusoidal"  the paper: fixed sinusoids added to the embeddings (below)
#   "learned"     one learned vector per position added (table 3 row E; Gehring et al. 2017)
#   "rope"        queries and keys rotated by their position (Su et al. 2021): `attention.rotate`
#   "alibi"       a linear penalty -m_h |i - j| on the scores (Press et al. 2022): `attention.alibi_bias`
#   "relative"    Shaw et al. 2018's clipped relative keys, k = RELATIVE_DISTANCE: `attention.relative_bias`
#   "none"        nothing (a control: the encoder then sees a bag of pieces; the decoder can still
#                 count, through its causal mask)
# The last four add nothing to the embeddings, and encoder-decoder attention takes none of them.
# max_positions still bounds every kind's lengths (the search and the server rely on it).

# Shaw et al.'s clipping distance k ("we use k = 16", section 4): beyond 16 pieces every distance
# looks the same, which is also what lets the encoding run on sentences longer than the training ones.
RELATIVE_DISTANCE = 16


def sinusoidal_table(length: int, d_model: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).

    Interleaved layout exactly as the formula reads (even dims sin, odd dims cos); tensor2tensor
    concatenates [sin | cos] instead, which is a permutation of the same features. [length, E].
    """
    if d_model % 2:
        raise ValueError(f"sinusoidal encoding needs an even d_model, got {d_model}")
    position = torch.arange(length, dtype=torch.float64)[:, None]  # [length, 1]
    inv_freq = torch.pow(10000.0, -torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    table = torch.zeros(length, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table.float()


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sinusoids (the paper's choice). forward(length, offset) -> [length, E]."""

    def __init__(self, *, d_model: int, max_positions: int) -> None:
        super().__init__()
        self.max_positions = max_positions
        self.register_buffer("table", sinusoidal_table(max_positions, d_model), persistent=False)

    def forward(self, length: int, offset: int = 0) -> Tensor:
        _check_positions(offset + length, self.max_positions)
        return self.table[offset : offset + length]


class LearnedPositionalEncoding(nn.Module):
    """Learned position embeddings (section 3.5 / table 3 row E: "nearly identical results")."""

    def __init__(self, *, d_model: int, max_positions: int) -> None:
        super().__init__()
        self.max_positions = max_positions
        self.weight = nn.Parameter(torch.randn(max_positions, d_model) * d_model**-0.5)

    def forward(self, length: int, offset: int = 0) -> Tensor:
        _check_positions(offset + length, self.max_positions)
        return self.weight[offset : offset + length]


def _check_positions(needed: int, max_positions: int) -> None:
    if needed > max_positions:
        raise ValueError(
            f"sequence needs {needed} positions but the model has max_positions={max_positions}; "
            "truncate or split the input"
        )


# --- 3.4 Embeddings ----------------------------------------------------------------------------


class Embeddings(nn.Module):
    """Token embeddings multiplied by sqrt(d_model) (section 3.4)."""

    def __init__(self, *, vocab_size: int, d_model: int, pad_id: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        self.pad_id = pad_id
        self.scale = math.sqrt(d_model)
        nn.init.normal_(self.weight, mean=0.0, std=d_model**-0.5)
        with torch.no_grad():
            self.weight[pad_id].zero_()

    def forward(self, tokens: Tensor) -> Tensor:
        return nn.functional.embedding(tokens, self.weight, self.pad_id) * self.scale  # [B, L, E]


# --- 3.3 Position-wise feed-forward ------------------------------------------------------------


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2 (equation 2)."""

    def __init__(self, *, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(torch.relu(self.linear1(x)))


# --- 3.1 Encoder and decoder stacks ------------------------------------------------------------


class SublayerConnection(nn.Module):
    """Residual connection, dropout and LayerNorm around one sublayer (section 5.4; the annotated
    transformer's SublayerConnection): post-norm LayerNorm(x + Dropout(Sublayer(x))), the paper's;
    with norm_first=True (a departure: Xiong et al. 2020, "pre-LN") x + Dropout(Sublayer(LayerNorm(x))).

    Its parameters are its LayerNorm's, `weight` and `bias`, so a layer that names it `norm1`
    stores them under the names an nn.LayerNorm there had. `input` and `output` are the halves
    around a sublayer that returns more than its output (attention weights).
    """

    def __init__(self, *, d_model: int, dropout: float, norm_first: bool, eps: float = 1e-5) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))
        self.eps = eps
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def norm(self, x: Tensor) -> Tensor:
        """LayerNorm(x) over the last dimension [..., E]."""
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)

    def input(self, x: Tensor) -> Tensor:
        """What the sublayer reads: LayerNorm(x) with norm_first, else x."""
        return self.norm(x) if self.norm_first else x

    def output(self, x: Tensor, sublayer_out: Tensor) -> Tensor:
        """Add & Norm of the sublayer's output to the residual x: [..., E]."""
        if self.norm_first:
            return x + self.dropout(sublayer_out)
        return self.norm(x + self.dropout(sublayer_out))

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        return self.output(x, sublayer(self.input(x)))


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each inside a `SublayerConnection` (post-norm by default).

    The connections are named norm1, norm2 (the names of the LayerNorms they hold).
    """

    def __init__(
        self, *, d_model: int, n_heads: int, d_ff: int, dropout: float, attention_dropout: float,
        norm_first: bool, attention_positions: str = "none",
    ) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model=d_model, n_heads=n_heads, dropout=attention_dropout,
                                            positions=attention_positions, max_relative_distance=RELATIVE_DISTANCE)
        self.feed_forward = FeedForward(d_model=d_model, d_ff=d_ff)
        self.norm1 = SublayerConnection(d_model=d_model, dropout=dropout, norm_first=norm_first)
        self.norm2 = SublayerConnection(d_model=d_model, dropout=dropout, norm_first=norm_first)

    def forward(self, x: Tensor, mask: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """x: [B, S, E]; mask: [B, 1, 1, S] -> ([B, S, E], weights [B, H, S, S] or None)."""
        h, weights = self.self_attn(self.norm1.input(x), mask=mask, need_weights=need_weights)
        x = self.norm1.output(x, h)
        return self.norm2(x, self.feed_forward), weights


class DecoderLayer(nn.Module):
    """Masked self-attention, encoder-decoder attention, feed-forward; each inside a
    `SublayerConnection` named norm1, norm2, norm3."""

    def __init__(
        self, *, d_model: int, n_heads: int, d_ff: int, dropout: float, attention_dropout: float,
        norm_first: bool, attention_positions: str = "none",
    ) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model=d_model, n_heads=n_heads, dropout=attention_dropout,
                                            positions=attention_positions, max_relative_distance=RELATIVE_DISTANCE)
        self.cross_attn = MultiHeadAttention(d_model=d_model, n_heads=n_heads, dropout=attention_dropout)
        self.feed_forward = FeedForward(d_model=d_model, d_ff=d_ff)
        self.norm1 = SublayerConnection(d_model=d_model, dropout=dropout, norm_first=norm_first)
        self.norm2 = SublayerConnection(d_model=d_model, dropout=dropout, norm_first=norm_first)
        self.norm3 = SublayerConnection(d_model=d_model, dropout=dropout, norm_first=norm_first)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        self_mask: Tensor,
        cross_mask: Tensor,
        cache: "LayerCache | None" = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x: [B, T, E]; memory: [B, S, E] -> ([B, T, E], self weights, cross weights)."""
        self_cache = cache.self_attn if cache is not None else None
        cross_cache = cache.cross_attn if cache is not None else None
        h, self_w = self.self_attn(self.norm1.input(x), mask=self_mask, cache=self_cache, need_weights=need_weights)
        x = self.norm1.output(x, h)
        h, cross_w = self.cross_attn(self.norm2.input(x), memory, mask=cross_mask, cache=cross_cache,
                                     need_weights=need_weights)
        x = self.norm2.output(x, h)
        return self.norm3(x, self.feed_forward), self_w, cross_w


@dataclass
class LayerCache:
    """One decoder layer's caches: self-attention grows each step, cross-attention is fixed."""

    self_attn: KVCache = field(default_factory=KVCache)
    cross_attn: KVCache = field(default_factory=KVCache)


@dataclass
class DecoderCache:
    """Caller-owned incremental-decoding state for the whole decoder stack."""

    layers: list[LayerCache]

    @classmethod
    def empty(cls, n_layers: int) -> "DecoderCache":
        return cls([LayerCache() for _ in range(n_layers)])

    @property
    def length(self) -> int:
        """Number of target positions already decoded."""
        return self.layers[0].self_attn.length

    def reorder(self, batch_index: Tensor, *, include_cross: bool = True) -> None:
        """Keep / reorder batch rows, e.g. the surviving beams, or drop finished sentences.

        A beam step only permutes rows *within* each sentence, whose cross-attention keys and
        values are identical; `include_cross=False` then skips copying them. Where the beams of a
        sentence share one cross-attention row (beam search), those rows are not indexed like the
        decoder rows: reorder them with `reorder_cross` and the sentence rows.
        Raises:
            ValueError: include_cross with cross-attention rows shared by decoder rows.
        """
        if include_cross:
            first = self.layers[0]
            if first.cross_attn.rows and first.cross_attn.rows != first.self_attn.rows:
                raise ValueError(
                    f"the cross-attention cache holds {first.cross_attn.rows} rows shared by "
                    f"{first.self_attn.rows} decoder rows: reorder(..., include_cross=False) for the decoder "
                    "rows, and reorder_cross(sentence rows) for the shared ones"
                )
        for layer in self.layers:
            layer.self_attn.reorder(batch_index)
            if include_cross:
                layer.cross_attn.reorder(batch_index)

    def reorder_cross(self, batch_index: Tensor) -> None:
        """Keep / reorder the rows of the cross-attention caches only (e.g. drop finished sentences)."""
        for layer in self.layers:
            layer.cross_attn.reorder(batch_index)


@dataclass
class EncoderOutput:
    memory: Tensor  # [B, S, E]
    src_mask: Tensor  # [B, 1, 1, S], True = real source token
    self_attention: list[Tensor] | None = None  # per layer [B, H, S, S]

    def reorder(self, batch_index: Tensor) -> "EncoderOutput":
        return EncoderOutput(self.memory.index_select(0, batch_index), self.src_mask.index_select(0, batch_index))


@dataclass
class DecoderOutput:
    hidden: Tensor  # [B, T, E], final decoder states
    logits: Tensor | None  # [B, T, V], None when project=False
    self_attention: list[Tensor] | None = None  # per layer [B, H, T, T_total]
    cross_attention: list[Tensor] | None = None  # per layer [B, H, T, S]


class Transformer(nn.Module):
    """Encoder-decoder Transformer (figure 1) built from a `ModelConfig`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.src_embedding = Embeddings(vocab_size=c.vocab_size, d_model=c.d_model, pad_id=c.pad_id)
        # Section 3.4: one weight matrix for both embeddings and the pre-softmax projection.
        self.tgt_embedding = (
            None if c.share_embeddings else Embeddings(vocab_size=c.vocab_size, d_model=c.d_model, pad_id=c.pad_id)
        )
        self.output_projection = (
            None if c.share_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)
        )
        kind = c.positional_encoding
        if kind == "sinusoidal":
            self.positions = SinusoidalPositionalEncoding(d_model=c.d_model, max_positions=c.max_positions)
        elif kind == "learned":
            self.positions = LearnedPositionalEncoding(d_model=c.d_model, max_positions=c.max_positions)
        else:  # rope / alibi / relative act in self-attention; none is the control
            self.positions = None
        self.embed_dropout = nn.Dropout(c.dropout)  # section 5.4: dropout on embeddings + positions
        layer_args = dict(
            d_model=c.d_model, n_heads=c.n_heads, d_ff=c.d_ff, dropout=c.dropout,
            attention_dropout=c.attention_dropout, norm_first=c.norm_first,
            attention_positions=kind if kind in ("rope", "alibi", "relative") else "none",
        )
        self.encoder_layers = nn.ModuleList(EncoderLayer(**layer_args) for _ in range(c.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(**layer_args) for _ in range(c.n_decoder_layers))
        # Pre-norm stacks need a final LayerNorm; post-norm outputs are already normalised.
        self.encoder_norm = nn.LayerNorm(c.d_model) if c.norm_first else None
        self.decoder_norm = nn.LayerNorm(c.d_model) if c.norm_first else None
        self._init_linear_weights()

    def _init_linear_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _embed(self, tokens: Tensor, embedding: Embeddings, offset: int = 0) -> Tensor:
        if self.positions is None:
            _check_positions(offset + tokens.size(1), self.config.max_positions)
            return self.embed_dropout(embedding(tokens))  # [B, L, E]
        x = embedding(tokens) + self.positions(tokens.size(1), offset)  # [B, L, E]
        return self.embed_dropout(x.to(embedding.weight.dtype))  # float32 positions on bf16 weights

    def encode(self, src_tokens: Tensor, need_weights: bool = False) -> EncoderOutput:
        """src_tokens: LongTensor [B, S] (right-padded with pad_id) -> EncoderOutput."""
        src_mask = padding_mask(src_tokens, self.config.pad_id)  # [B, 1, 1, S]
        x = self._embed(src_tokens, self.src_embedding)
        attentions = [] if need_weights else None
        for layer in self.encoder_layers:
            x, weights = layer(x, src_mask, need_weights)
            if attentions is not None:
                attentions.append(weights)
        if self.encoder_norm is not None:
            x = self.encoder_norm(x)
        return EncoderOutput(memory=x, src_mask=src_mask, self_attention=attentions)

    def decode(
        self,
        tgt_tokens: Tensor,
        encoder_out: EncoderOutput,
        cache: DecoderCache | None = None,
        need_weights: bool = False,
        project: bool = True,
    ) -> DecoderOutput:
        """Run the decoder stack.

        Args:
            tgt_tokens: LongTensor [B, T]. Without a cache: the whole (right-padded) target input.
                With a cache: only the new tokens (usually T = 1); earlier positions are read from
                the cache, and the cache is updated in place.
            encoder_out: from `encode`: one row per tgt_tokens row, or one per G consecutive rows
                that share a source (beam search: its K beams; the memory is then read once per
                source, see `MultiHeadAttention`).
            cache: `DecoderCache.empty(n_decoder_layers)` before the first step, owned by the caller.
            need_weights: return self- and cross-attention weights of every layer and head.
            project: compute logits (False returns only hidden states, for a training loss that
                projects the non-padding positions alone).
        Raises:
            ValueError: when the target needs more positions than max_positions.
        """
        offset = cache.length if cache is not None else 0
        new_len = tgt_tokens.size(1)
        if cache is None:
            self_mask = causal_mask(new_len, device=tgt_tokens.device) & padding_mask(
                tgt_tokens, self.config.pad_id
            )  # [B, 1, T, T]
        elif new_len == 1:
            self_mask = None  # one new query may attend to every cached position: no mask, fastest kernel
        else:
            self_mask = causal_mask(new_len, offset + new_len, device=tgt_tokens.device)  # [1, 1, T, T_total]
        embedding = self.src_embedding if self.tgt_embedding is None else self.tgt_embedding
        x = self._embed(tgt_tokens, embedding, offset)
        self_attns = [] if need_weights else None
        cross_attns = [] if need_weights else None
        for i, layer in enumerate(self.decoder_layers):
            layer_cache = cache.layers[i] if cache is not None else None
            x, self_w, cross_w = layer(
                x, encoder_out.memory, self_mask, encoder_out.src_mask, layer_cache, need_weights
            )
            if need_weights:
                self_attns.append(self_w)
                cross_attns.append(cross_w)
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        logits = self.logits(x) if project else None
        return DecoderOutput(hidden=x, logits=logits, self_attention=self_attns, cross_attention=cross_attns)

    def logits(self, hidden: Tensor) -> Tensor:
        """Pre-softmax linear transformation: [..., E] -> [..., V] (tied to the embeddings)."""
        if self.output_projection is None:
            return nn.functional.linear(hidden, self.src_embedding.weight)
        return self.output_projection(hidden)

    def new_cache(self) -> DecoderCache:
        return DecoderCache.empty(len(self.decoder_layers))

    def forward(self, src_tokens: Tensor, tgt_tokens: Tensor) -> Tensor:
        """Teacher forcing: src_tokens [B, S], tgt_tokens [B, T] (BOS + target) -> logits [B, T, V]."""
        return self.decode(tgt_tokens, self.encode(src_tokens)).logits
