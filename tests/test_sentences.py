"""Sentence splitting (aiayn.decoding.sentences): lines split by the Moses splitter in the model's
source language, translated sentence by sentence, and put back together per line."""

import io

import pytest

from aiayn.cli import main
from aiayn.config import DecodeConfig
from aiayn.decoding.sentences import (
    hypothesis_alignments,
    join_alignments,
    join_translations,
    split_lines,
    split_sentences,
)
from aiayn.decoding.translator import Translator

PARAGRAPH = "Ein Mann fährt Fahrrad. Dr. Müller liest z.B. ein Buch. Zwei Hunde spielen im Schnee!"


def test_the_moses_splitter_keeps_non_breaking_prefixes_of_the_language():
    assert split_sentences(PARAGRAPH, "de") == [
        "Ein Mann fährt Fahrrad.", "Dr. Müller liest z.B. ein Buch.", "Zwei Hunde spielen im Schnee!"]
    assert split_sentences("  ", "de") == [] and split_sentences("Ein Satz", "de") == ["Ein Satz"]
    with pytest.warns(RuntimeWarning, match="no sentence-splitting rules for language 'xx'; the English ones"):
        assert split_sentences("One. Two.", "xx") == ["One.", "Two."]


def test_lines_are_joined_back_with_summed_scores_and_the_kth_hypotheses():
    split = split_lines(["One dog. Two cats.", "", "Three."], "en")
    assert split.sentences == ["One dog.", "Two cats.", "Three."] and split.owners == [0, 0, 2] and split.lines == 3
    per_sentence = [[("a", -1.0), ("a2", -2.0)], [("b", -0.5)], [("c", -3.0), ("c2", -4.0)]]
    assert join_translations(split, per_sentence) == [
        [("a b", -1.5), ("a2 b", -2.5)],  # "b" has one hypothesis: its last is reused
        [("", 0.0)],
        [("c", -3.0), ("c2", -4.0)],
    ]


def test_alignments_count_words_from_the_start_of_the_line():
    # Sentence 2's source words start after sentence 1's 3, its target words after 2.
    joined = join_alignments(["x y z", "u v", "p"], ["X Y", "U V W", "P"], ["0-0 2-1", "0-0 1-2", "0-0"],
                             [0, 0, 1], 2)
    assert joined == ["0-0 2-1 3-2 4-4", "0-0"]


def test_split_translation_is_the_join_of_each_sentence_translated_alone(tiny_model_dir):
    translator = Translator.load(tiny_model_dir)
    decode = DecodeConfig(beam_size=2, nbest=2, max_len_b=6)
    lines = [PARAGRAPH, "", "Eine Frau liest."]
    split = split_lines(lines, translator.info["src_lang"])
    per_sentence = translator.translate(split.sentences, decode, return_scores=True)
    alone = [translator.translate([sentence], decode, return_scores=True)[0] for sentence in split.sentences]
    # Batching the sentences changes no translation (scores: float rounding).
    assert [[text for text, _ in entries] for entries in per_sentence] == [[text for text, _ in e] for e in alone]
    assert [score for e in per_sentence for _, score in e] == pytest.approx([score for e in alone for _, score in e])
    joined = join_translations(split, per_sentence)
    assert joined[0][0][0] == " ".join(entries[0][0] for entries in alone[:3])
    assert joined[0][0][1] == pytest.approx(sum(entries[0][1] for entries in alone[:3]))
    aligned = hypothesis_alignments(split, per_sentence, translator.align)
    assert [len(a) for a in aligned] == [len(entries) for entries in joined]
    for (text, _), alignment in zip(joined[0], aligned[0]):
        pairs = [tuple(map(int, link.split("-"))) for link in alignment.split()]
        assert all(0 <= s < len(PARAGRAPH.split()) and 0 <= t < len(text.split()) for s, t in pairs)


def test_cli_split_sentences_with_nbest_and_alignment(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PARAGRAPH}\n\nEine Frau liest.\n"))
    common = ["translate", "--model", str(tiny_model_dir), "--beam", "2", "--max-len-b", "6", "--precision", "fp32"]
    assert main([*common, "--split-sentences"]) == 0
    best = capsys.readouterr().out.splitlines()
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PARAGRAPH}\n\nEine Frau liest.\n"))
    assert main([*common, "--split-sentences", "--nbest", "2", "--alignment"]) == 0
    rows = [line.split(" ||| ") for line in capsys.readouterr().out.splitlines()]
    assert len(best) == 3 and best[1] == ""
    assert [row[1] for row in rows if row[0] == "0"][0] == best[0]  # the first of the n-best is the best
    assert [row[:3] for row in rows if row[0] == "1"] == [["1", "", "0.0000"]]
    monkeypatch.setattr("sys.stdin", io.StringIO("x\n"))
    assert main([*common, "--split-sentences", "--prefix", "/dev/null"]) == 2
    assert "--split-sentences and --prefix do not go together" in capsys.readouterr().err
