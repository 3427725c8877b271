"""Sentence splitting of input lines: a paragraph is translated sentence by sentence and joined.

A model trained on single sentences (Multi30k: one caption per line) translates the first
sentence of a paragraph and stops: the joins of 4 test sentences scored about 1 BLEU, length
ratio 0.24. The splitter is Koehn and Schroeder's Moses sentence splitter (the `sentence-splitter`
package: per-language lists of non-breaking prefixes such as "Dr." or "z.B."), the one MT
pipelines use, with the source language from the model's metadata (`src_lang`).

`split_lines` turns lines into sentences and remembers which line each came from; the caller
translates (or aligns) the sentences in one batch, and `join_translations` / `join_alignments`
put each line back together: translations joined by a space, scores added, and word alignments
shifted so that their indices count words from the start of the line on both sides.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache

FALLBACK_LANGUAGE = "en"


@lru_cache(maxsize=None)
def _splitter(language: str):
    try:
        from sentence_splitter import SentenceSplitter, SentenceSplitterException
    except ImportError:
        raise ImportError("sentence splitting needs the sentence-splitter package (an aiayn dependency): "
                          "pip install sentence-splitter") from None
    try:
        return SentenceSplitter(language=language)
    except SentenceSplitterException:
        warnings.warn(f"no sentence-splitting rules for language {language!r}; the English ones are used",
                      RuntimeWarning, stacklevel=3)
        return SentenceSplitter(language=FALLBACK_LANGUAGE)


def split_sentences(text: str, language: str | None) -> list[str]:
    """The sentences of `text` (stripped; none for a blank text)."""
    if not text.strip():
        return []
    return [sentence for sentence in _splitter(language or FALLBACK_LANGUAGE).split(text) if sentence.strip()]


@dataclass(frozen=True)
class SplitLines:
    """Sentences of several lines, in order; `owners[k]` is the line of `sentences[k]`."""

    sentences: list[str]
    owners: list[int]
    lines: int

    @cached_property
    def _members(self) -> list[list[int]]:
        # Built once: a scan of every sentence per line would be quadratic in a long file.
        members: list[list[int]] = [[] for _ in range(self.lines)]
        for k, owner in enumerate(self.owners):
            members[owner].append(k)
        return members

    def of_line(self, line: int) -> list[int]:
        return self._members[line]


def split_lines(lines: list[str], language: str | None) -> SplitLines:
    sentences, owners = [], []
    for line_number, line in enumerate(lines):
        for sentence in split_sentences(line, language):
            sentences.append(sentence)
            owners.append(line_number)
    return SplitLines(sentences, owners, len(lines))


def join_translations(split: SplitLines, results: list[list[tuple[str, float]]]) -> list[list[tuple[str, float]]]:
    """Per line: its sentences' translations joined by a space, with the sum of their scores.

    The k-th entry of a line joins the k-th hypothesis of each sentence (a sentence with fewer
    hypotheses gives its last one), so the first entry is the joined best translations; a blank
    line gives [("", 0.0)] as `Translator.translate` does.
    """
    joined: list[list[tuple[str, float]]] = []
    for line in range(split.lines):
        members = [results[k] for k in split.of_line(line)]
        if not members:
            joined.append([("", 0.0)])
            continue
        depth = max(len(entries) for entries in members)
        line_entries = []
        for rank in range(depth):
            picks = [entries[min(rank, len(entries) - 1)] for entries in members]
            line_entries.append((" ".join(text for text, _ in picks if text), sum(score for _, score in picks)))
        joined.append(line_entries)
    return joined


def _words(text: str) -> int:
    return len(text.split())


def join_alignments(sources: list[str], targets: list[str], alignments: list[str], owners: list[int],
                    lines: int) -> list[str]:
    """Per line: the Pharaoh alignments ("i-j ...") of its (source, target) sentence pairs, each
    shifted by the words of the line's earlier sentences on both sides."""
    joined: list[list[str]] = [[] for _ in range(lines)]
    offsets = [[0, 0] for _ in range(lines)]
    for source, target, alignment, line in zip(sources, targets, alignments, owners):
        start_source, start_target = offsets[line]
        for pair in alignment.split():
            i, j = pair.split("-")
            joined[line].append(f"{int(i) + start_source}-{int(j) + start_target}")
        offsets[line][0] += _words(source)
        offsets[line][1] += _words(target)
    return [" ".join(pairs) for pairs in joined]


def hypothesis_alignments(split: SplitLines, per_sentence: list[list[tuple[str, float]]],
                          align: Callable[[list[str], list[str]], list[str]]) -> list[list[str]]:
    """Per line, per hypothesis of `join_translations(split, per_sentence)`: its word alignment.
    `align(sources, targets)` gives one Pharaoh string per pair (`Translator.align`); each
    (sentence, hypothesis) pair is aligned once."""
    flat = list(dict.fromkeys((k, text) for k, entries in enumerate(per_sentence) for text, _ in entries))
    aligned = dict(zip(flat, align([split.sentences[k] for k, _ in flat], [text for _, text in flat])))
    out = []
    for line in range(split.lines):
        members = split.of_line(line)
        depth = max((len(per_sentence[k]) for k in members), default=1)
        per_rank = []
        for rank in range(depth):
            picks = [(k, per_sentence[k][min(rank, len(per_sentence[k]) - 1)][0]) for k in members]
            per_rank += join_alignments([split.sentences[k] for k, _ in picks], [text for _, text in picks],
                                        [aligned[pick] for pick in picks], [0] * len(picks), 1)
        out.append(per_rank)
    return out


__all__ = ["SplitLines", "hypothesis_alignments", "join_alignments", "join_translations", "split_lines",
           "split_sentences"]
