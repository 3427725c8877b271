"""Attention (paper section 3.2): scaled dot-product attention, multi-head attention, masks, KV cache.

Shape legend:
    B batch, L query length, M key/value length, S source length, T target length,
    H heads, D head dim (d_k = d_v = d_model / H), E d_model.

Mask convention (one for the whole project): boolean, True = may attend, broadcastable to
[B, H, L, M]. Padding and look-ahead masks combine with `&`. A position bias (ALiBi, relative)
joins them through `add_bias`, which gives a float mask: the bias where the boolean mask is True,
-inf where it is False; every attention function here takes either kind.

Positions inside attention (departures from the paper, which adds sinusoids to the embeddings;
`ModelConfig.positional_encoding` picks one, for self-attention only):
    rope      `rotate`: queries and keys rotated by their absolute position (Su et al. 2021)
    alibi     `alibi_bias`: -m_h |i - j| added to the scores (Press et al. 2022)
    relative  `relative_bias`: q_i . a_{clip(j - i)} added to the scores (Shaw et al. 2018)
In encoder-decoder attention, queries and keys come from two sentences whose distance i - j means
nothing, so it gets none of them: it takes its positions from the encoder and decoder states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def padding_mask(tokens: Tensor, pad_id: int) -> Tensor:
    """Key mask from token ids: [B, M] -> [B, 1, 1, M], True where the token is not padding."""
    return (tokens != pad_id)[:, None, None, :]


def causal_mask(query_len: int, key_len: int | None = None, *, device: torch.device | None = None) -> Tensor:
    """Look-ahead mask (section 3.2.3): [1, 1, L, M], True where key position <= query position.

    With a KV cache the L queries are the *last* L positions of the M keys, so query i sits at
    absolute position M - L + i.
    """
    key_len = query_len if key_len is None else key_len
    if key_len < query_len:
        raise ValueError(f"key_len ({key_len}) must be >= query_len ({query_len})")
    offset = key_len - query_len
    query_pos = torch.arange(query_len, device=device)[:, None] + offset
    key_pos = torch.arange(key_len, device=device)[None, :]
    return (key_pos <= query_pos)[None, None]


def add_bias(mask: Tensor | None, bias: Tensor | None) -> Tensor | None:
    """A boolean mask and an additive score bias as one float mask (the bias, -inf where masked).

    `F.scaled_dot_product_attention` adds a float mask to the scaled scores, so the fused kernels
    take a position bias this way. mask [B or 1, 1, L or 1, M] bool, bias [B or 1, H, L, M] float
    -> [B, H, L, M]; either may be None.
    """
    if bias is None:
        return mask
    if mask is None:
        return bias
    return torch.where(mask, bias, torch.tensor(float("-inf"), dtype=bias.dtype, device=bias.device))


def apply_mask(scores: Tensor, mask: Tensor | None) -> Tensor:
    """Scores with a boolean mask applied (-inf where False) or a float mask added."""
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask


# --- positions inside attention ----------------------------------------------------------------


def rotate(x: Tensor, positions: Tensor) -> Tensor:
    """RoPE (Su et al. 2021, "RoFormer", eq. 34): rotate each pair (x_2i, x_2i+1) by pos * theta_i.

    theta_i = 10000^(-2i/D), the sinusoids' frequencies (section 3.5), pairs interleaved as in the
    formula. A rotated query at i and key at j have the dot product q R_(j-i) k: it depends on the
    distance j - i only, so the scores see relative positions though each vector is rotated by its
    own absolute one (which is why a KV cache can store rotated keys).
    x: [B, H, L, D]; positions: [L] -> [B, H, L, D]. Angles in float64, the result in x's dtype.
    Raises:
        ValueError: an odd head dimension.
    """
    head_dim = x.size(-1)
    if head_dim % 2:
        raise ValueError(f"rope needs an even head dimension, got {head_dim}")
    inv_freq = torch.pow(10000.0, -torch.arange(0, head_dim, 2, dtype=torch.float64, device=x.device) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq  # [L, D/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]  # [B, H, L, D/2] each
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)  # [B, H, L, D/2, 2]
    return rotated.flatten(-2)  # [B, H, L, D]


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi's head slopes m_h (Press et al. 2022, section 3): 2^(-8/n), 2^(-16/n), ..., 2^(-8).

    For n not a power of 2, the paper's code: the slopes of the largest power of 2 below n, then
    every other slope of twice that, until n. [H], float32.
    """
    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    power = 2 ** math.floor(math.log2(n_heads))
    slopes = geometric(power) + geometric(2 * power)[0::2][: n_heads - power]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: Tensor, query_positions: Tensor, key_positions: Tensor) -> Tensor:
    """ALiBi's bias -m_h |i - j| for queries at positions i and keys at j: [H], [L], [M] -> [H, L, M].

    In the decoder (causal) only j <= i is attended, where this is Press et al.'s -m_h (i - j);
    the encoder, which attends both ways, gets the same penalty for a distance on either side.
    """
    distance = (query_positions[:, None] - key_positions[None, :]).abs()  # [L, M]
    return -slopes[:, None, None] * distance.to(slopes.dtype)  # [H, L, M]


def relative_indices(query_positions: Tensor, key_positions: Tensor, max_distance: int) -> Tensor:
    """clip(j - i, -k, k) + k: the row of the relative table for each (query i, key j). [L, M]."""
    offset = key_positions[None, :] - query_positions[:, None]  # [L, M]
    return offset.clamp(-max_distance, max_distance) + max_distance


def relative_bias(query: Tensor, table: Tensor, query_positions: Tensor, key_positions: Tensor) -> Tensor:
    """Shaw et al. 2018, eq. 5's position term: q_i . a^K_(clip(j - i, -k, k)) / sqrt(D).

    e_ij = q_i (k_j + a^K_ij)^T / sqrt(D) is the usual score plus this, so it is added to the scores
    like a mask. query: [B, H, L, D]; table: a^K, [2k + 1, D], shared by the heads (as in the
    paper); positions [L], [M] -> [B, H, L, M].
    """
    max_distance = (table.size(0) - 1) // 2
    per_distance = query @ table.T  # [B, H, L, 2k + 1]
    index = relative_indices(query_positions, key_positions, max_distance)  # [L, M]
    index = index.expand(*query.shape[:2], -1, -1)  # [B, H, L, M]
    return per_distance.gather(-1, index) / math.sqrt(query.size(-1))


def reference_attention(
    query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None, dropout_p: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V, written out (equation 1).

    Args:
        query: [B, H, L, D]; key, value: [B, H, M, D]; mask: bool (True = may attend) or float
            (added to the scores, -inf = may not; see `add_bias`), broadcastable to [B, H, L, M].
        dropout_p: dropout on the attention weights (0 in eval).
    Returns:
        (output [B, H, L, D], weights [B, H, L, M]); the weights are those before dropout, so
        each row sums to 1 and masked keys get exactly 0.
    """
    scores = query @ key.transpose(-2, -1) / math.sqrt(query.size(-1))  # [B, H, L, M]
    scores = apply_mask(scores, mask)
    # Softmax in at least float32: bf16 / fp16 scores lose the small weights otherwise.
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    weights = weights.to(query.dtype)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return dropped @ value, weights


def fast_attention(
    query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None, dropout_p: float = 0.0
) -> Tensor:
    """The same function through `F.scaled_dot_product_attention` (fused kernels, no weights)."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    incremental: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The reference path when weights are asked for, the fused fast path otherwise.

    This is the attention function a `MultiHeadAttention` calls (its `attend`); a faster one with
    the same signature can be handed in (`aiayn.inference` does on the CPU). `incremental` says
    the keys come from a KV cache (decoding one step at a time); this function does not need it.
    """
    if need_weights:
        return reference_attention(query, key, value, mask, dropout_p)
    return fast_attention(query, key, value, mask, dropout_p), None


@dataclass
class KVCache:
    """Keys and values of one attention module, owned by the caller.

    keys, values: [B, H, M, D]. Self-attention appends one step at a time; cross-attention is
    filled once per source and then only reordered.

    `reorder` is lazy: it records which rows to take (`order`, composed with one still pending),
    and the rows are gathered when the cache is next appended to or read. Beam search reorders
    every step and appends right after, so inside a compiled decoder step (`torch.compile`) the
    gather and the append fuse into one copy of the cache instead of two.
    """

    keys: Tensor | None = None
    values: Tensor | None = None
    order: Tensor | None = None  # rows of `keys` / `values` that the cache holds, once applied

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.size(2)

    @property
    def rows(self) -> int:
        """Batch rows the cache holds (with a pending reorder applied); 0 when empty."""
        if self.keys is None:
            return 0
        return self.keys.size(0) if self.order is None else self.order.numel()

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Add [B, H, L, D] new keys / values; returns all of them [B, H, M + L, D]."""
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            past_keys, past_values = self._ordered()
            self.keys = torch.cat([past_keys, keys], dim=2)  # [B, H, M + L, D]
            self.values = torch.cat([past_values, values], dim=2)
        return self.keys, self.values

    def read(self) -> tuple[Tensor, Tensor]:
        """The cached keys and values [B, H, M, D], with a pending reorder applied."""
        self.keys, self.values = self._ordered()
        return self.keys, self.values

    def reorder(self, batch_index: Tensor) -> None:
        """Select / reorder batch rows (beam search reordering, or dropping finished rows)."""
        if self.keys is not None:
            # Row j of the result is row batch_index[j] of the cache as it would be now.
            self.order = batch_index if self.order is None else self.order.index_select(0, batch_index)

    def _ordered(self) -> tuple[Tensor, Tensor]:
        if self.order is None:
            return self.keys, self.values
        order, self.order = self.order, None
        return self.keys.index_select(0, order), self.values.index_select(0, order)


ATTENTION_POSITIONS = ("none", "rope", "alibi", "relative")


class InProjection(nn.Linear):
    """W^Q, W^K, W^V of all heads stacked into one [3E, E] matrix, rows q | k | v.

    Calling it projects all three at once (self-attention: one matmul); `query` and `key_value`
    project with the first third and the rest (encoder-decoder attention, where the queries come
    from the decoder and the keys and values from the encoder). The state-dict layout is that of
    `nn.Linear`, the same as `torch.nn.MultiheadAttention`'s in_proj.
    """

    def query(self, x: Tensor) -> Tensor:
        """[..., E] -> [..., E] (x W^Q)."""
        d = self.in_features
        return F.linear(x, self.weight[:d], None if self.bias is None else self.bias[:d])

    def key_value(self, x: Tensor) -> Tensor:
        """[..., E] -> [..., 2E] (x W^K | x W^V)."""
        d = self.in_features
        return F.linear(x, self.weight[d:], None if self.bias is None else self.bias[d:])


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, head_i = Attention(Q W^Q_i, K W^K_i, V W^V_i).

    W^Q, W^K, W^V of all heads are stacked into one `InProjection` ([3E, E]), so self-attention
    projects with one matmul; cross-attention uses its first third for the queries and the rest for
    the memory's keys and values (the same layout as `torch.nn.MultiheadAttention`).
    """

    def __init__(
        self, *, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True, positions: str = "none",
        max_relative_distance: int = 16,
    ) -> None:
        """positions: "none" (the paper: positions come with the inputs), or, for self-attention,
        "rope", "alibi" or "relative" (see the module docstring); max_relative_distance: k of
        "relative" (Shaw et al. use 16)."""
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if positions not in ATTENTION_POSITIONS:
            raise ValueError(f"positions must be one of {ATTENTION_POSITIONS}, got {positions!r}")
        if positions == "rope" and (d_model // n_heads) % 2:
            raise ValueError(f"rope needs an even head dimension, got {d_model // n_heads}")
        if max_relative_distance < 1:
            raise ValueError(f"max_relative_distance must be >= 1, got {max_relative_distance}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.positions = positions
        self.in_proj = InProjection(d_model, 3 * d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        # a^K of Shaw et al., one table per layer shared by its heads; learned like the embeddings.
        self.relative_keys = (
            nn.Parameter(torch.randn(2 * max_relative_distance + 1, self.head_dim) * self.head_dim**-0.5)
            if positions == "relative" else None
        )
        # Equation 1 itself; `aiayn.inference.prepare` hands a device-specific one to its copies.
        self.attend = scaled_dot_product_attention

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, L, D]

    def heads(self, query: Tensor, memory: Tensor | None = None, cache: KVCache | None = None
              ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head queries, keys and values: Q W^Q_i, K W^K_i, V W^V_i (the first step of `forward`).

        Self-attention (memory=None): from `query` [B, L, E]; with "rope", queries and keys rotated
        at their absolute positions cache.length + 0..L-1 (`rotate`); with a cache, the new keys and
        values are appended (keys rotated before caching) and all of them returned.
        Encoder-decoder attention: queries from `query`, keys and values from `memory` [B / G, M, E]
        (from the cache after the first step); G query rows sharing a memory row are one row of
        G * L queries.
        Returns:
            q [B, H, L, D] ([B / G, H, G * L, D] with shared memory rows), k, v [B, H, M_total, D].
        Raises:
            ValueError: the query rows are not a multiple of the memory rows.
        """
        batch, length, _ = query.shape
        if memory is None:  # self-attention
            q, k, v = self.in_proj(query).chunk(3, dim=-1)  # 3 x [B, L, E]
            q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
            if self.positions == "rope":
                offset = cache.length if cache is not None else 0
                positions = torch.arange(offset, offset + length, device=query.device)  # [L]
                q, k = rotate(q, positions), rotate(k, positions)
            if cache is not None:
                k, v = cache.append(k, v)  # [B, H, M_total, D]
            return q, k, v
        # encoder-decoder attention
        memory_rows = memory.size(0)
        if batch % memory_rows:
            raise ValueError(f"{batch} query rows cannot share {memory_rows} memory rows")
        # G rows sharing a memory row attend as one row of G * L queries: the keys and values
        # are computed, cached and read once per source, not once per beam.
        q = self.in_proj.query(query).view(memory_rows, batch // memory_rows * length, self.d_model)
        q = self._split_heads(q)  # [B / G, H, G * L, D]
        if cache is not None and cache.keys is not None:
            k, v = cache.read()
        else:
            kv = self.in_proj.key_value(memory)  # [B / G, M, 2E]
            k, v = (self._split_heads(t) for t in kv.chunk(2, dim=-1))
            if cache is not None:  # stored contiguous: read by every decoding step
                k, v = cache.append(k.contiguous(), v.contiguous())
        return q, k, v

    def position_bias(self, q: Tensor, key_len: int) -> Tensor | None:
        """The additive score bias of self-attention ("alibi", "relative"; else None).

        The L queries sit at the last L of the key positions 0..key_len-1 (as in `causal_mask`:
        with a KV cache, the new queries follow the cached keys).
        q: [B, H, L, D] (from `heads`) -> [1, H, L, M] (alibi) or [B, H, L, M] (relative), in q's dtype.
        """
        if self.positions not in ("alibi", "relative"):
            return None
        length = q.size(2)
        key_positions = torch.arange(key_len, device=q.device)  # [M]
        query_positions = key_positions[key_len - length:]  # [L]
        if self.positions == "alibi":
            slopes = alibi_slopes(self.n_heads).to(q.device)
            return alibi_bias(slopes, query_positions, key_positions)[None].to(q.dtype)  # [1, H, L, M]
        return relative_bias(q, self.relative_keys.to(q.dtype), query_positions, key_positions)

    def forward(
        self,
        query: Tensor,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from `query` [B, L, E] to itself (memory=None) or to `memory` [B, M, E].

        Args:
            memory: [B / G, M, E] where G consecutive query rows share one memory row (beam search:
                the G = K beams of a source), else [B, M, E].
            mask: bool, True = may attend, broadcastable to [B, H, L, M_total] ([B / G, 1, 1, M]
                with shared memory rows).
            cache: self-attention: new keys/values are appended and the full cache is attended;
                cross-attention: filled from `memory` on first use, reused afterwards.
            need_weights: also return the attention weights [B, H, L, M_total].
        Returns:
            (output [B, L, E], weights or None)
        Raises:
            ValueError: the query rows are not a multiple of the memory rows.
        """
        batch, length, _ = query.shape
        q, k, v = self.heads(query, memory, cache)
        if memory is None:
            mask = add_bias(mask, self.position_bias(q, k.size(2)))
        dropout_p = self.dropout if self.training else 0.0
        out, weights = self.attend(q, k, v, mask, dropout_p, need_weights, cache is not None)
        # Rows of G * L queries unfold back into G rows of L (a no-op when G = 1).
        out = out.transpose(1, 2).reshape(batch, length, self.d_model)  # [B, L, E]
        if weights is not None and weights.size(0) != batch:
            heads, keys = weights.size(1), weights.size(-1)
            weights = weights.view(weights.size(0), heads, -1, length, keys).transpose(1, 2)  # [B/G, G, H, L, M]
            weights = weights.reshape(batch, heads, length, keys)
        return self.out_proj(out), weights
