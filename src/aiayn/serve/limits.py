"""What the server accepts: request, queue and connection bounds (`ServerLimits`), the
micro-batching defaults, and the size of an /attention response.

Light on purpose (no FastAPI): `aiayn serve`'s argument parser reads its defaults from here.
"""

import math
from dataclasses import dataclass
from typing import Any

# Micro-batching defaults, shared by `BatchingWorker`, `create_app`, `serve` and `aiayn serve`.
MAX_BATCH_SENTENCES = 32
MAX_WAIT_MS = 5.0

RETRY_AFTER_S = 1  # the Retry-After of a 503: the queue drains in about a batch's time
# One attention weight in JSON: "0.1234," (rounded to 4 decimals, never negative, never 1e-05).
BYTES_PER_WEIGHT = 7


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on requests, the queue and connections; what exceeds them is refused (413, 422, 503)
    before reaching the model.

    /attention's response holds at most `max_attention_weights` numbers of at most
    `BYTES_PER_WEIGHT` bytes each, so with the defaults it stays under 0.7 MB plus the tokens.
    """

    max_body_bytes: int = 64 * 1024
    max_chars: int = 1000  # per sentence
    max_texts: int = 64  # sentences per /translate request
    max_attention_chars: int = 300  # per /attention sentence
    # /attention returns O(layers * heads * length^2) numbers: this bounds the response itself.
    max_attention_weights: int = 100_000
    # What one /translate request's decoding may hold (`decoding_bytes`): a request above it gets
    # 413 before it is queued, so that no request can take the server's memory.
    max_request_mb: int = 1024
    max_queue: int = 128  # requests waiting for the model; one more gets 503 + Retry-After
    request_timeout_s: float = 30.0  # from submission to answer
    max_connections: int = 256  # open connections (uvicorn's limit_concurrency)
    keep_alive_s: int = 5  # an idle keep-alive connection is closed after this
    read_timeout_s: float = 10.0  # a request's headers and body must arrive within this

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_chars", "max_texts", "max_attention_chars",
                     "max_attention_weights", "max_request_mb", "max_queue", "max_connections", "keep_alive_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("request_timeout_s", "read_timeout_s"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def attention_weights(config: Any, source_len: int, target_len: int) -> int:
    """How many numbers /attention returns for `source_len` source and `target_len` target
    pieces: encoder self [L_enc, H, S, S], decoder self [L_dec, H, T, T], cross [L_dec, H, T, S]."""
    return config.n_heads * (
        config.n_encoder_layers * source_len * source_len
        + config.n_decoder_layers * target_len * (target_len + source_len)
    )


def decoding_bytes(config: Any, source_lengths: list[int], rows_per_sentence: int, max_len_a: float,
                   max_len_b: int, *, sampling: bool = False, batch_tokens: int = 4096,
                   element_bytes: int = 4) -> int:
    """About the most memory decoding these sentences (`source_lengths` pieces each) holds at once:
    the largest of the batches `Translator.translate` makes of them (longest first, at most
    `batch_tokens` padded source pieces each). For a batch of B sentences, S pieces at most and
    rows = B x beams (or samples), with T the longest output allowed: the decoder's self-attention
    cache [L_dec, 2, rows, T, D]; the cross-attention keys / values and the encoder output,
    [L_dec, 2, B', S, D] + [B', S, D] (B' = rows when sampling: each sample has its own memory row);
    and one step's largest transients, the logits and their log-softmax [rows, V] x 3, the
    attention scores [rows, H, T + S] and the feed-forward activations [rows, F] x 2."""
    limit = config.max_positions
    lengths = sorted((min(max(n, 1), limit) for n in source_lengths), reverse=True)
    layers, width = config.n_decoder_layers, config.d_model
    worst, start = 0, 0
    while start < len(lengths):
        longest = lengths[start]
        sentences = max(1, min(len(lengths) - start, batch_tokens // longest))
        steps = min(int(max_len_a * longest + max_len_b) + 1, limit)
        rows = sentences * rows_per_sentence
        memory_rows = rows if sampling else sentences
        cache = layers * 2 * rows * steps * width
        cross = (layers * 2 + 1) * memory_rows * longest * width
        step = rows * (3 * config.vocab_size + config.n_heads * (steps + longest) + 2 * config.d_ff)
        worst = max(worst, element_bytes * (cache + cross + step))
        start += sentences
    return worst


__all__ = ["BYTES_PER_WEIGHT", "MAX_BATCH_SENTENCES", "MAX_WAIT_MS", "RETRY_AFTER_S", "ServerLimits",
           "attention_weights", "decoding_bytes"]
