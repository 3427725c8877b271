"""Word alignments from encoder-decoder attention (`aiayn translate --alignment`).

An NMT model has no alignment of its own, but its cross-attention says which source pieces each
target position reads. The usual extraction (fairseq `--print-alignment`, Garg et al. 2019,
"Jointly Learning to Align and Translate with Transformer Models") takes one decoder layer's
cross-attention averaged over its heads, and aligns each target word to the source word with the
most attention (argmax). Which layer: the penultimate one by default, where Garg et al. find the
best alignments in a 6-layer model (the last layer attends to what predicts the next word, the
lower ones are still mixing context), and where a hand check on Multi30k agreed (see
docs/practitioner.md). Which row: target piece t is aligned with the attention of the query
that *predicts* it (row t of teacher forcing, input = the piece before it), as fairseq does.

Words are whitespace-separated, as in the Pharaoh format "i-j" (0-based source word i, target
word j). SentencePiece marks a word start with "▁", so pieces map onto words without any
detokenization rule: a piece that does not start with "▁" continues the previous word.
"""

from __future__ import annotations

from torch import Tensor

WORD_START = "\u2581"  # SentencePiece's "▁"


def piece_words(pieces: list[str]) -> list[int]:
    """The word index of each piece (a piece starting with "▁" starts a new word)."""
    words, current = [], -1
    for piece in pieces:
        if piece.startswith(WORD_START) or current < 0:
            current += 1
        words.append(current)
    return words


def word_alignment(weights: Tensor, source_pieces: list[str], target_pieces: list[str]) -> list[tuple[int, int]]:
    """Source-target word pairs from attention weights over pieces.

    Args:
        weights: [T, S] attention of each target piece (row) over the source pieces (columns).
        source_pieces, target_pieces: their SentencePiece strings (T and S of them).
    Returns:
        (source word, target word) pairs, one per target word, sorted by target word: the source
        word receiving the most attention summed over its pieces, averaged over the target word's
        pieces.
    """
    if weights.shape != (len(target_pieces), len(source_pieces)):
        raise ValueError(f"weights {tuple(weights.shape)} do not match {len(target_pieces)} target and "
                         f"{len(source_pieces)} source pieces")
    if not source_pieces or not target_pieces:
        return []
    source_words, target_words = piece_words(source_pieces), piece_words(target_pieces)
    n_source, n_target = source_words[-1] + 1, target_words[-1] + 1
    # [T, S] pieces -> [T', S'] words: sum over a source word's pieces, mean over a target word's.
    by_source = weights.new_zeros(len(target_pieces), n_source).index_add_(
        1, weights.new_tensor(source_words).long(), weights)
    by_word = by_source.new_zeros(n_target, n_source).index_add_(
        0, by_source.new_tensor(target_words).long(), by_source)
    return [(int(source), target) for target, source in enumerate(by_word.argmax(dim=1).tolist())]


def pharaoh(pairs: list[tuple[int, int]]) -> str:
    """"i-j i-j ..." (source word - target word, 0-based)."""
    return " ".join(f"{source}-{target}" for source, target in pairs)


__all__ = ["WORD_START", "pharaoh", "piece_words", "word_alignment"]
