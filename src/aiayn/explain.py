"""One sentence through a trained model, step by step, with the model's own numbers (`aiayn explain`).

Lectures walk one sentence through the Transformer by hand: each word's embedding, Q = X W^Q,
K = X W^K, V = X W^V for one head, the scores Q K^T, the division by sqrt(d_k), the mask, the
softmax, the weighted sum of the values, the heads concatenated and projected by W^O, Add & Norm,
the feed-forward network, and in the decoder the masked self-attention, the encoder-decoder
attention and the softmax over the vocabulary. `explain` does exactly that on a trained model, in
float64, from the model's own weights, and checks each step against the model's own forward pass
(`Explanation.differences`), so the numbers shown are the numbers the model computes.

Shape legend: S source pieces, T target positions ("<s>" + target), E d_model, D d_k = E / H,
F d_ff, H heads. A walk's rows are queries, its columns keys (as in the heatmaps).
"""

from __future__ import annotations

import copy
import html
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from aiayn.files.atomic import write_output
from aiayn.model.attention import MultiHeadAttention, causal_mask

KINDS = ("encoder", "decoder", "cross")
# What the lecture calls each kind of attention.
KIND_NAMES = {
    "encoder": "encoder self-attention",
    "decoder": "decoder masked self-attention",
    "cross": "encoder-decoder attention",
}


@dataclass
class HeadWalk:
    """One head of one attention layer, every step of equation 1 (float64, rows = queries).

    query [Lq, D], key [Lk, D], value [Lk, D], scores = Q K^T [Lq, Lk], scaled = scores / sqrt(D),
    mask [Lq, Lk] (True = may attend) or None, weights = softmax(scaled, masked) [Lq, Lk],
    output = weights V [Lq, D].
    """

    kind: str
    layer: int
    head: int
    query_tokens: list[str]
    key_tokens: list[str]
    d_k: int
    query: Tensor
    key: Tensor
    value: Tensor
    scores: Tensor
    scaled: Tensor
    mask: Tensor | None
    weights: Tensor
    output: Tensor
    # ALiBi / relative positions (departures): the additive bias of the scaled scores, else None
    bias: Tensor | None = None

    def to_dict(self, decimals: int | None = None) -> dict[str, Any]:
        """Plain lists (the `--json` format); `decimals` rounds the floats."""

        def plain(tensor: Tensor) -> list:
            values = tensor.tolist()
            return _round(values, decimals) if decimals is not None else values

        return {
            "kind": self.kind, "layer": self.layer, "head": self.head, "d_k": self.d_k,
            "query_tokens": self.query_tokens, "key_tokens": self.key_tokens,
            "query": plain(self.query), "key": plain(self.key), "value": plain(self.value),
            "scores": plain(self.scores), "scaled": plain(self.scaled),
            "mask": None if self.mask is None else self.mask.tolist(),
            "bias": None if self.bias is None else plain(self.bias),
            "weights": plain(self.weights), "output": plain(self.output),
        }


@dataclass
class SublayerWalk:
    """One attention sublayer after its heads: Concat(head_1..head_H) [L, E], times W^O [L, E],
    then Add & Norm: LayerNorm(x + Sublayer(x)) [L, E] (post-norm, the paper's)."""

    kind: str
    layer: int
    input: Tensor  # x [L, E]
    heads: list[HeadWalk]
    concat: Tensor  # [L, E]
    projected: Tensor  # concat W^O + b [L, E]
    add_norm: Tensor  # [L, E]


@dataclass
class LayerWalk:
    """One encoder or decoder layer: its attention sublayers, then FFN and Add & Norm."""

    stack: str  # "encoder" | "decoder"
    layer: int
    attention: list[SublayerWalk]  # encoder: [self]; decoder: [masked self, cross]
    ffn_hidden: Tensor  # max(0, x W1 + b1) [L, F]
    ffn_output: Tensor  # hidden W2 + b2 [L, E]
    output: Tensor  # [L, E]


@dataclass
class Explanation:
    """The whole walk of one sentence pair (see `explain`)."""

    source_tokens: list[str]
    target_input_tokens: list[str]  # "<s>" + target pieces: the decoder's input, one row each
    target_tokens: list[str]  # target pieces + "</s>": what each decoder row predicts
    translation: str
    d_model: int
    n_heads: int
    embeddings: dict[str, Tensor]  # "source" / "target": token embedding x sqrt(d_model) [L, E]
    positions: dict[str, Tensor]  # "source" / "target": positional encoding [L, E]; {} without a table
    positional_encoding: str  # the model's kind (`ModelConfig.positional_encoding`)
    layers: list[LayerWalk]  # encoder layers, then decoder layers
    next_pieces: list[list[tuple[str, float]]]  # per decoder row: the top pieces and probabilities
    probabilities: Tensor  # [T, V] softmax of the final logits (float64)
    differences: dict[str, float] = field(default_factory=dict)  # largest |walk - model| per check

    def head(self, kind: str, layer: int, head: int) -> HeadWalk:
        """The walk of one head; `layer` and `head` may be negative (from the end)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        sublayers = [s for layer_walk in self.layers for s in layer_walk.attention if s.kind == kind]
        if not -len(sublayers) <= layer < len(sublayers):
            raise ValueError(f"layer {layer} out of range: the model has {len(sublayers)} {kind} layers")
        heads = sublayers[layer].heads
        if not -len(heads) <= head < len(heads):
            raise ValueError(f"head {head} out of range: the model has {len(heads)} heads")
        return heads[head]

    def sublayer(self, kind: str, layer: int) -> SublayerWalk:
        return [s for layer_walk in self.layers for s in layer_walk.attention if s.kind == kind][layer]

    def layer_walk(self, kind: str, layer: int) -> LayerWalk:
        stack = "encoder" if kind == "encoder" else "decoder"
        return [w for w in self.layers if w.stack == stack][layer]


def _round(values: Any, decimals: int) -> Any:
    if isinstance(values, list):
        return [_round(v, decimals) for v in values]
    if isinstance(values, float):
        if math.isinf(values):
            return "-inf" if values < 0 else "inf"
        return round(values, decimals)
    return values


# --- the walk ------------------------------------------------------------------------------------


def _walk_attention(
    attention: MultiHeadAttention, kind: str, layer: int, queries: Tensor, memory: Tensor | None,
    mask: Tensor | None, query_tokens: list[str], key_tokens: list[str],
) -> SublayerWalk:
    """Equation 1 for every head, then Concat and W^O, from the module's weights (section 3.2.2).

    Q, K, V come from the module's own `heads` (x W^Q_i etc.; with RoPE rotated at their
    positions), and self-attention's position bias (ALiBi, relative) from its `position_bias`.
    memory: None for self-attention (keys and values from `queries`), else the encoder output."""
    q_all, k_all, v_all = attention.heads(queries[None], None if memory is None else memory[None])  # [1, H, L, D]
    bias = attention.position_bias(q_all, k_all.size(2)) if memory is None else None  # [1, H, Lq, Lk]
    D = attention.head_dim
    heads = []
    for h in range(attention.n_heads):
        q, k, v = q_all[0, h], k_all[0, h], v_all[0, h]  # [Lq, D], [Lk, D], [Lk, D]
        scores = q @ k.T  # [Lq, Lk]
        scaled = scores / math.sqrt(D)
        head_bias = None if bias is None else bias[0, h]
        biased = scaled if head_bias is None else scaled + head_bias
        masked = biased if mask is None else biased.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(masked, dim=-1)
        heads.append(HeadWalk(kind, layer, h, query_tokens, key_tokens, D, q, k, v, scores, scaled, mask,
                              weights, weights @ v, head_bias))
    concat = torch.cat([head.output for head in heads], dim=-1)  # [Lq, E]
    projected = attention.out_proj(concat)
    return SublayerWalk(kind, layer, queries, heads, concat, projected, projected)  # add_norm set by caller


def _feed_forward(layer, x: Tensor) -> tuple[Tensor, Tensor]:
    """FFN(x) = max(0, x W1 + b1) W2 + b2 (equation 2): (hidden [L, F], output [L, E])."""
    hidden = torch.relu(layer.feed_forward.linear1(x))
    return hidden, layer.feed_forward.linear2(hidden)


def _walk_encoder_layer(layer, index: int, x: Tensor, tokens: list[str]) -> LayerWalk:
    """Each sublayer between its connection's halves (`SublayerConnection.input` / `.output`), so
    the walk follows the model's own residual and LayerNorm order (post- or pre-norm)."""
    attention = _walk_attention(layer.self_attn, "encoder", index, layer.norm1.input(x), None, None,
                                tokens, tokens)
    attention.add_norm = layer.norm1.output(x, attention.projected)  # Add & Norm
    hidden, ffn = _feed_forward(layer, layer.norm2.input(attention.add_norm))
    return LayerWalk("encoder", index, [attention], hidden, ffn, layer.norm2.output(attention.add_norm, ffn))


def _walk_decoder_layer(layer, index: int, x: Tensor, memory: Tensor, input_tokens: list[str],
                        source_tokens: list[str], rows: list[str]) -> LayerWalk:
    T = x.size(0)
    look_ahead = causal_mask(T, device=x.device)[0, 0]  # [T, T], True on and below the diagonal
    masked = _walk_attention(layer.self_attn, "decoder", index, layer.norm1.input(x), None, look_ahead,
                             rows, input_tokens)
    masked.add_norm = layer.norm1.output(x, masked.projected)
    # Encoder-decoder attention: queries from the decoder, keys and values from the encoder output.
    cross = _walk_attention(layer.cross_attn, "cross", index, layer.norm2.input(masked.add_norm), memory, None,
                            rows, source_tokens)
    cross.add_norm = layer.norm2.output(masked.add_norm, cross.projected)
    hidden, ffn = _feed_forward(layer, layer.norm3.input(cross.add_norm))
    return LayerWalk("decoder", index, [masked, cross], hidden, ffn, layer.norm3.output(cross.add_norm, ffn))


def explain(model, tokenizer, source: str, target: str | None = None, *, top: int = 5,
            maps: Any = None) -> Explanation:
    """Walk `source` (and its translation) through `model`, step by step, in float64.

    The target is `target` (its pieces), or by default the model's own translation: exactly the
    one `Translator.attention` uses (beam 4, length penalty 0.6, on a float32 copy), so that the
    numbers match the heatmaps of `aiayn attention` and the web page. The model itself is left as
    it is (the walk runs on a float64 copy; a float64 model is used as it is). Every step is
    checked against the float64 model's own forward pass and the attention weights also against
    the float32 maps: the largest absolute difference of each check is in `differences`.

    `maps`: the `AttentionResult` of this pair from a Translator the caller already has (the
    server's); by default a float32 `Translator` of `model` computes it.

    Raises:
        ValueError: an empty source.
    """
    from aiayn.decoding.translator import Translator

    if not isinstance(source, str) or not source.strip():
        raise ValueError("explain needs a non-empty source sentence")
    config = model.config
    first = next(model.parameters())
    device = first.device
    if maps is None:  # the heatmaps' own numbers: Translator.attention on a float32 copy
        maps = Translator(model, tokenizer, device=device, precision="fp32").attention(source, target)
    src_ids, tgt_ids = maps.source_ids, maps.target_ids

    model64 = model if first.dtype == torch.float64 and not model.training else (
        copy.deepcopy(model).to(device=device, dtype=torch.float64).eval())
    src = torch.tensor([src_ids], dtype=torch.long, device=device)  # [1, S]
    tgt_in = torch.tensor([[config.bos_id] + tgt_ids], dtype=torch.long, device=device)  # [1, T]
    source_tokens, input_tokens, rows = maps.source_tokens, maps.target_input_tokens, maps.target_tokens
    target_embedding = model64.src_embedding if model64.tgt_embedding is None else model64.tgt_embedding

    with torch.no_grad():
        # Section 3.4 / 3.5: token embedding x sqrt(d_model), plus the positional encoding.
        embeddings = {"source": model64.src_embedding(src)[0], "target": target_embedding(tgt_in)[0]}
        # RoPE, ALiBi and relative positions act inside self-attention, "none" nowhere: no table.
        table = model64.positions
        positions = {} if table is None else {"source": table(src.size(1)).double(),
                                              "target": table(tgt_in.size(1)).double()}
        layers = []
        x = embeddings["source"] + positions.get("source", 0.0)
        for i, layer in enumerate(model64.encoder_layers):
            layers.append(_walk_encoder_layer(layer, i, x, source_tokens))
            x = layers[-1].output
        memory = x if model64.encoder_norm is None else model64.encoder_norm(x)
        y = embeddings["target"] + positions.get("target", 0.0)
        for i, layer in enumerate(model64.decoder_layers):
            layers.append(_walk_decoder_layer(layer, i, y, memory, input_tokens, source_tokens, rows))
            y = layers[-1].output
        if model64.decoder_norm is not None:
            y = model64.decoder_norm(y)
        probabilities = torch.softmax(model64.logits(y), dim=-1)  # [T, V]: the next piece at each row

        # The model's own forward pass (float64 copy), and the float32 heatmaps.
        encoded = model64.encode(src, need_weights=True)
        decoded = model64.decode(tgt_in, encoded, need_weights=True)
        own = {"encoder": encoded.self_attention, "decoder": decoded.self_attention, "cross": decoded.cross_attention}
        float32 = {"encoder": maps.encoder_self, "decoder": maps.decoder_self, "cross": maps.cross}
    differences = {"memory": _max_diff(memory, encoded.memory[0]),
                   "probabilities": _max_diff(probabilities, torch.softmax(decoded.logits[0], dim=-1))}
    for kind in KINDS:
        walked = torch.stack([torch.stack([h.weights for h in s.heads])
                              for w in layers for s in w.attention if s.kind == kind])  # [L, H, Lq, Lk]
        differences[f"{kind} weights"] = _max_diff(walked, torch.stack([a[0] for a in own[kind]]))
        differences[f"{kind} weights vs float32 maps"] = _max_diff(walked, float32[kind].to(walked))
    top = max(1, min(top, probabilities.size(-1)))
    best = probabilities.topk(top, dim=-1)
    next_pieces = [
        [(tokenizer.pieces([int(i)])[0], float(p)) for p, i in zip(values, indices)]
        for values, indices in zip(best.values, best.indices)
    ]
    return Explanation(
        source_tokens=source_tokens, target_input_tokens=input_tokens, target_tokens=rows,
        translation=maps.translation, d_model=config.d_model, n_heads=config.n_heads, embeddings=embeddings,
        positions=positions, positional_encoding=config.positional_encoding, layers=layers,
        next_pieces=next_pieces, probabilities=probabilities, differences=differences,
    )


def _max_diff(a: Tensor, b: Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    finite = torch.isfinite(a) & torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
        return math.inf
    return float((a[finite] - b[finite]).abs().max()) if finite.any() else 0.0


# --- the terminal walk ---------------------------------------------------------------------------

MAX_ROWS = 12
MAX_COLUMNS = 8


def format_matrix(matrix: Tensor, row_labels: list[str] | None = None, column_labels: list[str] | None = None,
                  *, decimals: int = 2, max_rows: int = MAX_ROWS, max_columns: int = MAX_COLUMNS) -> str:
    """A small matrix as text, rounded, labelled, with long sides abbreviated ("…")."""
    rows, columns = matrix.shape
    row_index = _abbreviated(rows, max_rows)
    column_index = _abbreviated(columns, max_columns)
    row_labels = row_labels or [str(i) for i in range(rows)]
    column_labels = column_labels or [f"d{j}" for j in range(columns)]

    def cell(i: int | None, j: int | None) -> str:
        if i is None or j is None:
            return "…"
        value = float(matrix[i, j])
        if matrix.dtype == torch.bool:
            return "1" if value else "·"
        return "-inf" if value == float("-inf") else f"{value:.{decimals}f}"

    label_width = min(14, max(len(label) for label in row_labels))
    header = [_clip(column_labels[j], 9) if j is not None else "…" for j in column_index]
    body = [[cell(i, j) for j in column_index] for i in row_index]
    width = max([len(h) for h in header] + [len(c) for row in body for c in row])
    lines = [" " * (label_width + 2) + " ".join(h.rjust(width) for h in header)]
    for i, row in zip(row_index, body):
        label = _clip(row_labels[i], label_width) if i is not None else "…"
        lines.append(label.rjust(label_width) + "  " + " ".join(c.rjust(width) for c in row))
    return "\n".join(lines)


def _abbreviated(count: int, limit: int) -> list[int | None]:
    if count <= limit:
        return list(range(count))
    head = limit // 2
    return list(range(head)) + [None] + list(range(count - (limit - head - 1), count))


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


POSITION_NOTES = {
    "rope": "RoPE rotates queries and keys by their positions inside self-attention (Su et al. 2021)",
    "alibi": "ALiBi adds -slope x distance to the scores (Press et al. 2022)",
    "relative": "relative positions add q . a_(j-i) to the scores (Shaw et al. 2018)",
    "none": "the control without any position signal",
}


def format_walk(explanation: Explanation, kind: str = "encoder", layer: int = 0, head: int = 0,
                *, decimals: int = 2) -> str:
    """The walk of `kind` attention, layer `layer`, head `head`, in the lecture's order and names."""
    walk = explanation.head(kind, layer, head)
    layer = walk.layer
    sublayer = explanation.sublayer(kind, layer)
    layer_walk = explanation.layer_walk(kind, layer)
    E, D = explanation.d_model, walk.d_k
    side = "source" if kind == "encoder" else "target"
    tokens = explanation.source_tokens if side == "source" else explanation.target_input_tokens
    fmt = lambda m, rows=None, cols=None: format_matrix(m, rows, cols, decimals=decimals)  # noqa: E731
    dims = [f"d{j}" for j in range(E)]
    out = [f"source      {' '.join(explanation.source_tokens)}",
           f"translation {explanation.translation}",
           f"walk        {KIND_NAMES[kind]}, layer {layer}, head {head} "
           f"(d_model = {E}, h = {explanation.n_heads}, d_k = d_model / h = {D})", ""]

    def step(number: str, title: str, code: str, matrix: Tensor | None = None, rows=None, cols=None) -> None:
        shape = "" if matrix is None else f"  [{' x '.join(str(s) for s in matrix.shape)}]"
        out.append(f"{number}. {title}   ({code}){shape}")
        if matrix is not None:
            out.append(fmt(matrix, rows, cols))
        out.append("")

    first = layer == 0
    kind_of_positions = explanation.positional_encoding
    if first:
        step("1", f"embedding x sqrt(d_model) of each {side} piece", f"model.{'src' if side == 'source' else 'tgt'}"
             "_embedding(tokens)", explanation.embeddings[side], tokens, dims)
        if side in explanation.positions:
            title = {"sinusoidal": "positional encoding PE(pos, 2i) = sin(pos / 10000^(2i/d)), "
                                   "PE(pos, 2i+1) = cos(...)",
                     "learned": "learned positional embedding of each position"}.get(kind_of_positions,
                                                                                   "positional encoding")
            step("2", title, "model.positions(length)", explanation.positions[side], tokens, dims)
        else:
            step("2", f"no position table: {POSITION_NOTES.get(kind_of_positions, kind_of_positions)}",
                 f"positional_encoding = {kind_of_positions!r}")
    step("3", f"X: the input of {'encoder' if kind == 'encoder' else 'decoder'} layer {layer}"
         + ((" = embedding + positional encoding" if explanation.positions else " = embedding") if first
            else f" = output of layer {layer - 1}"),
         "x", layer_walk.attention[0].input, tokens, dims)
    if kind == "cross":
        step("3b", "queries come from the decoder after its masked self-attention (Add & Norm)",
             "layer.norm1(x + self_attn(x))", sublayer.input, walk.query_tokens, dims)
    qk = [f"q{j}" for j in range(D)]
    rotated = kind_of_positions == "rope" and kind != "cross"
    step("4", f"Q = X W^Q (head {head}: columns {head * D}..{(head + 1) * D - 1})"
         + (", rotated by its position (RoPE)" if rotated else ""), "attention.heads", walk.query,
         walk.query_tokens, qk)
    key_source = "the encoder output (memory)" if kind == "cross" else "X"
    step("5", f"K = {key_source} W^K" + (", rotated by its position (RoPE)" if rotated else ""),
         "attention.heads", walk.key, walk.key_tokens, [f"k{j}" for j in range(D)])
    step("6", f"V = {key_source} W^V", "attention.heads", walk.value, walk.key_tokens, [f"v{j}" for j in range(D)])
    step("7", "scores = Q K^T (rows: queries, columns: keys)", "query @ key.T", walk.scores, walk.query_tokens,
         walk.key_tokens)
    step("8", f"scaled = scores / sqrt(d_k) = scores / {math.sqrt(D):.3g}", "/ math.sqrt(d_k)", walk.scaled,
         walk.query_tokens, walk.key_tokens)
    if walk.bias is not None:
        step("8b", f"+ position bias ({POSITION_NOTES[kind_of_positions]})", "attention.position_bias", walk.bias,
             walk.query_tokens, walk.key_tokens)
    if walk.mask is not None:
        step("9", "look-ahead mask: position i may attend to keys 0..i (1 = may attend, · = -inf)",
             "causal_mask(T)", walk.mask, walk.query_tokens, walk.key_tokens)
    else:
        step("9", "mask: none needed (one sentence, no padding: every query may read every "
             + ("source piece)" if kind == "cross" else "piece of the sentence)"), "padding_mask")
    step("10", "softmax of each row: where each query looks", "torch.softmax(scaled, -1)", walk.weights,
         walk.query_tokens, walk.key_tokens)
    for i, row in enumerate(walk.weights.tolist()[: MAX_ROWS]):
        order = sorted(range(len(row)), key=lambda j: -row[j])[:3]
        looks = ", ".join(f"{walk.key_tokens[j]} {row[j]:.2f}" for j in order)
        out.append(f"    {walk.query_tokens[i]:>14} looks at  {looks}")
    out.append("")
    step("11", "head output = weights x V", "weights @ value", walk.output, walk.query_tokens, qk)
    step("12", f"Concat(head_1 .. head_{explanation.n_heads}) of this layer", "torch.cat(heads, -1)",
         sublayer.concat, walk.query_tokens, dims)
    step("13", "x W^O", "out_proj", sublayer.projected, walk.query_tokens, dims)
    step("14", "Add & Norm: LayerNorm(x + Sublayer(x))", "norm(x + dropout(h))", sublayer.add_norm,
         walk.query_tokens, dims)
    if kind == "decoder":
        out.append("    (then encoder-decoder attention: --kind cross)\n")
    step("15", "feed-forward hidden layer max(0, x W1 + b1)", "feed_forward.linear1 + relu", layer_walk.ffn_hidden,
         walk.query_tokens, [f"h{j}" for j in range(layer_walk.ffn_hidden.size(1))])
    step("16", "FFN(x) = hidden W2 + b2", "feed_forward.linear2", layer_walk.ffn_output, walk.query_tokens, dims)
    step("17", f"Add & Norm: the output of layer {layer}", "norm(x + dropout(ffn))", layer_walk.output,
         walk.query_tokens, dims)
    if kind != "encoder":
        out.append("18. the softmax over the vocabulary after the last decoder layer: the next piece at each step")
        for given, predicted, best in zip(explanation.target_input_tokens, explanation.target_tokens,
                                          explanation.next_pieces):
            candidates = "  ".join(f"{piece} {p:.3f}" for piece, p in best)
            out.append(f"    after {given:>12} -> {predicted:<12} top: {candidates}")
        out.append("")
    checks = ", ".join(f"{name} {value:.1e}" for name, value in explanation.differences.items())
    out.append(f"largest |walk - model| (float64 forward pass; float32 heatmaps): {checks}")
    return "\n".join(out)


# --- JSON and HTML -------------------------------------------------------------------------------


def walk_json(explanation: Explanation, kind: str, layer: int, head: int) -> dict[str, Any]:
    """The `--json` document of one head: query, key, value, scores, scaled, mask, weights, output,
    query_tokens, key_tokens, d_k (full float64 precision)."""
    document = explanation.head(kind, layer, head).to_dict()
    document["translation"] = explanation.translation
    document["source_tokens"] = explanation.source_tokens
    return document


HTML_COLUMNS = 64  # d_model- and d_ff-wide matrices are cut to their first 64 columns in the page


def page_data(
    explanation: Explanation, decimals: int = 4, only: tuple[str, int] | None = None
) -> dict[str, Any]:
    """Everything the HTML page (and the server's walk) shows, as plain lists: every kind, layer
    and head; matrices as wide as d_model or d_ff cut to their first HTML_COLUMNS columns.
    With `only` = (kind, layer), the other layers are null (the server sends one at a time)."""

    def plain(tensor: Tensor, cut: bool = False) -> list:
        return _round((tensor[..., :HTML_COLUMNS] if cut else tensor).tolist(), decimals)

    def head_data(head: HeadWalk) -> dict[str, Any]:
        return {"query": plain(head.query), "key": plain(head.key), "value": plain(head.value),
                "scores": plain(head.scores), "scaled": plain(head.scaled), "weights": plain(head.weights),
                "mask": None if head.mask is None else head.mask.tolist(), "output": plain(head.output),
                "bias": None if head.bias is None else plain(head.bias),
                "query_tokens": head.query_tokens, "key_tokens": head.key_tokens, "d_k": head.d_k}

    kinds: dict[str, list] = {kind: [] for kind in KINDS}
    for layer_walk in explanation.layers:
        for sub in layer_walk.attention:
            if only is not None and (sub.kind, sub.layer) != only:
                kinds[sub.kind].append(None)
                continue
            kinds[sub.kind].append({
                "heads": [head_data(head) for head in sub.heads],
                "layer_input": plain(layer_walk.attention[0].input, True),  # X of the layer
                "input": plain(sub.input, True), "concat": plain(sub.concat, True),
                "projected": plain(sub.projected, True), "add_norm": plain(sub.add_norm, True),
                "ffn_hidden": plain(layer_walk.ffn_hidden, True), "ffn_output": plain(layer_walk.ffn_output, True),
                "output": plain(layer_walk.output, True),
            })
    return {
        "source_tokens": explanation.source_tokens, "target_input_tokens": explanation.target_input_tokens,
        "target_tokens": explanation.target_tokens, "translation": explanation.translation,
        "d_model": explanation.d_model, "n_heads": explanation.n_heads, "columns_shown": HTML_COLUMNS,
        "positional_encoding": explanation.positional_encoding,
        "d_ff": explanation.layers[0].ffn_hidden.size(-1),
        "embeddings": {k: plain(v, True) for k, v in explanation.embeddings.items()},
        "positions": {k: plain(v, True) for k, v in explanation.positions.items()},
        "kinds": kinds, "next_pieces": explanation.next_pieces,
        "differences": explanation.differences,
    }


def write_html(explanation: Explanation, path) -> None:
    """One self-contained page (no CDN, works offline): the walk with a heatmap per matrix, values on
    hover, and kind / layer / head selectors."""
    from importlib import resources

    script = resources.files("aiayn").joinpath("static/explain.js").read_text(encoding="utf-8")
    data = json.dumps(page_data(explanation), ensure_ascii=False).replace("</", "<\\/")
    title = html.escape(f"aiayn explain: {' '.join(explanation.source_tokens)}")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{EXPLAIN_CSS}</style></head>
<body><h1>One sentence through the Transformer, step by step</h1>
<div id="explain"></div>
<script id="explain-data" type="application/json">{data}</script>
<script>{script}
renderExplanation(document.getElementById("explain"),
                  JSON.parse(document.getElementById("explain-data").textContent));</script>
</body></html>
"""
    write_output(path, page.encode("utf-8"))


EXPLAIN_CSS = "body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }"  # tables: explain.js


def page_numbers(config, source_len: int, target_len: int) -> int:
    """An upper bound on the numbers `page_data(..., only=(kind, layer))` holds for a pair of
    `source_len` and `target_len` (+1) pieces: one layer's heads and matrices, embeddings and
    positions (the server bounds its /explain responses with it)."""
    length = max(source_len, target_len)
    per_head = 4 * length * config.head_dim + 4 * length * length
    wide = 7 * length * HTML_COLUMNS + 4 * length * HTML_COLUMNS
    return config.n_heads * per_head + wide + 5 * length


__all__ = ["KINDS", "Explanation", "HeadWalk", "LayerWalk", "SublayerWalk", "explain", "format_matrix",
           "format_walk", "page_data", "page_numbers", "walk_json",
           "write_html"]
