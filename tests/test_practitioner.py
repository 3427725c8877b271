"""What practitioners expect of a translation toolkit: forced scoring, target prefixes,
sampling and word alignments; numbers checked against the search and against each other."""

import io
import math

import pytest
import torch

from aiayn import ModelConfig, Transformer
from aiayn.decoding.alignment import pharaoh, piece_words, word_alignment
from aiayn.files.checkpoint import save_model
from aiayn.cli import main
from aiayn.config import DecodeConfig
from aiayn.decoding.search import beam_search, filter_distribution, sample_search, score_tokens
from aiayn.files.tokenizer import Tokenizer
from aiayn.decoding.translator import Translator

SOURCES = ["ein hund läuft .", "zwei männer spielen fußball auf dem rasen .", "eine frau .", "",
           "ein mann fährt fahrrad ."]
TEXT = SOURCES[:3] + SOURCES[4:] + ["a dog runs .", "two men play football on the lawn .", "a woman .",
                                     "a man rides a bike ."]


@pytest.fixture(scope="module")
def parts():
    tokenizer = Tokenizer.train(TEXT * 20, vocab_size=70)
    torch.manual_seed(3)
    return Transformer(ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size)).eval(), tokenizer


@pytest.fixture(scope="module")
def translator(parts):
    return Translator(*parts)


@pytest.fixture(scope="module")
def model_dir(parts, tmp_path_factory):
    return save_model(*parts, tmp_path_factory.mktemp("model"))


def _sources(translator, sentences):
    ids = [translator.tokenizer.encode(s) for s in sentences]
    src = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    for row, tokens in enumerate(ids):
        src[row, : len(tokens)] = torch.tensor(tokens)
    return src


# --- forced scoring ---------------------------------------------------------------------------


def test_forced_score_is_the_beam_search_log_prob_of_its_own_hypotheses(translator):
    src = _sources(translator, [s for s in SOURCES if s])
    hypotheses = beam_search(translator.model, src, beam_size=4, nbest=4, length_penalty=0.0, max_len_b=12)
    flat = [(row, h) for row, hyps in enumerate(hypotheses) for h in hyps]
    scores = score_tokens(translator.model, src[[row for row, _ in flat]], [h.tokens for _, h in flat])
    worst = max(abs(sum(values) - h.log_prob) for values, (_, h) in zip(scores, flat))
    assert worst < 1e-4
    assert all(h.score == h.log_prob for _, h in flat)  # length normalisation off: score = log-prob
    assert all(len(values) == len(h.tokens) + 1 for values, (_, h) in zip(scores, flat))


def test_batching_never_changes_a_score(translator):
    targets = ["a dog runs .", "two men play football on the lawn .", "a woman .", "a dog", "a man rides a bike ."]
    together = translator.score(SOURCES, targets, batch_tokens=4096)
    alone = [translator.score([s], [t])[0] for s, t in zip(SOURCES, targets)]
    tiny_batches = translator.score(SOURCES, targets, batch_tokens=1)
    assert together[3] is None and alone[3] is None  # an empty source has no score
    for a, b, c in zip(together, alone, tiny_batches):
        if a is not None:
            assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
            assert max(abs(x - y) for x, y in zip(a, c)) < 1e-5
    with pytest.raises(ValueError, match="5 sources but 2 targets"):
        translator.score(SOURCES, targets[:2])


def test_cli_score_prints_total_mean_and_pieces(translator, model_dir, tmp_path, capsys):
    (tmp_path / "src").write_text("ein hund läuft .\n\neine frau .\n")
    (tmp_path / "tgt").write_text("a dog runs .\nanything\na woman .\n")
    assert main(["score", "--model", str(model_dir), "--src", str(tmp_path / "src"), "--tgt", str(tmp_path / "tgt"),
                 "--per-token", "--precision", "fp32"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert lines[1] == "" and len(lines) == 4
    total, mean, pieces = lines[0].split("\t")
    values = [float(v) for v in pieces.split()]
    expected = translator.score(["ein hund läuft ."], ["a dog runs ."])[0]
    assert values == pytest.approx(expected, abs=1e-4)
    assert float(total) == pytest.approx(sum(expected), abs=1e-3)
    assert float(mean) == pytest.approx(sum(expected) / len(expected), abs=1e-3)


# --- target prefix ----------------------------------------------------------------------------


def test_a_prefix_starts_every_hypothesis_and_is_scored_by_the_model(translator):
    src = _sources(translator, SOURCES[:3])
    prefix = [translator.tokenizer.encode("two men"), [], translator.tokenizer.encode("a")]
    hypotheses = beam_search(translator.model, src, beam_size=3, nbest=3, length_penalty=0.0, max_len_b=10,
                             prefix=prefix)
    for hyps, tokens in zip(hypotheses, prefix):
        for h in hyps:
            assert h.tokens[: len(tokens)] == tokens
    flat = [(row, h) for row, hyps in enumerate(hypotheses) for h in hyps]
    scores = score_tokens(translator.model, src[[row for row, _ in flat]], [h.tokens for _, h in flat])
    assert max(abs(sum(v) - h.log_prob) for v, (_, h) in zip(scores, flat)) < 1e-4
    # An empty prefix changes nothing; a prefix longer than max_len still fits.
    plain = beam_search(translator.model, src[1:2], beam_size=3, nbest=3, length_penalty=0.0, max_len_b=10)
    assert [h.tokens for h in hypotheses[1]] == [h.tokens for h in plain[0]]
    long = translator.tokenizer.encode("two men play football on the lawn on the lawn .")
    out = beam_search(translator.model, src[2:3], beam_size=2, max_len_a=0.0, max_len_b=1, prefix=[long])
    assert out[0][0].tokens == long
    texts = translator.translate(SOURCES, prefixes=["a dog", "", "x", "y", ""])
    assert texts[0].startswith("a dog") and texts[3] == ""  # an empty source stays empty


# --- sampling ---------------------------------------------------------------------------------


def test_filter_distribution_values():
    log_probs = torch.tensor([[0.5, 0.2, 0.2, 0.1]]).log()
    torch.testing.assert_close(filter_distribution(log_probs),
                               torch.tensor([[0.5, 0.2, 0.2, 0.1]], dtype=torch.float64))
    torch.testing.assert_close(filter_distribution(log_probs, topk=2),
                               torch.tensor([[5 / 7, 2 / 7, 0.0, 0.0]], dtype=torch.float64))
    # nucleus 0.6: 0.5 is below it, so the next (0.2, the lower id of the tie) is kept too
    torch.testing.assert_close(filter_distribution(log_probs, topp=0.6),
                               torch.tensor([[5 / 7, 2 / 7, 0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(filter_distribution(log_probs, topp=0.5), torch.tensor([[1.0, 0, 0, 0]],
                                                                                        dtype=torch.float64))
    hot = filter_distribution(log_probs, temperature=2.0)
    expected = torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=torch.float64).sqrt()
    torch.testing.assert_close(hot[0], expected / expected.sum())


def test_sampling_is_reproducible_and_batching_never_changes_a_sample(translator):
    decode = DecodeConfig(sampling_topk=0, temperature=1.5, nbest=3, seed=11, max_len_b=8)
    first = translator.translate(SOURCES, decode, return_scores=True)
    again = translator.translate(SOURCES, decode, return_scores=True)
    reversed_one_by_one = [translator.translate([s], decode, return_scores=True, batch_tokens=1)[0]
                           for s in reversed(SOURCES)][::-1]
    texts = [[t for t, _ in entries] for entries in first]
    assert texts == [[t for t, _ in entries] for entries in again]
    assert texts == [[t for t, _ in entries] for entries in reversed_one_by_one]
    other_seed = translator.translate(SOURCES, decode.replace(seed=12), return_scores=True)
    assert [[t for t, _ in e] for e in other_seed] != texts
    assert first[3] == [("", 0.0)]
    assert len({t for entries in texts for t in entries}) > 3  # temperature 1.5: samples differ


def test_a_vanishing_temperature_is_the_most_probable_token_not_nan():
    log_probs = torch.log_softmax(torch.tensor([[0.3, 2.0, -1.0, 1.9]]), dim=-1)
    for temperature in (5e-324, 1e-300, 1e-5):
        assert filter_distribution(log_probs, temperature=temperature).tolist() == [[0.0, 1.0, 0.0, 0.0]]
    assert torch.allclose(filter_distribution(log_probs, temperature=2.0).float(),
                          torch.softmax(log_probs / 2.0, dim=-1))


def test_a_tiny_nucleus_is_greedy_search(translator):
    src = _sources(translator, [s for s in SOURCES if s])
    greedy = beam_search(translator.model, src, beam_size=1, max_len_b=10, length_penalty=0.0)
    nucleus = DecodeConfig(sampling_topk=0, sampling_topp=1e-9, max_len_b=10, length_penalty=0.0)
    sampled = sample_search(translator.model, src, nucleus, seeds=[1, 2, 3, 4])
    assert [h[0].tokens for h in sampled] == [h[0].tokens for h in greedy]
    assert [h[0].log_prob for h in sampled] == pytest.approx([h[0].log_prob for h in greedy], abs=1e-4)


def test_sampling_settings_are_checked():
    with pytest.raises(ValueError, match="sampling_topp must be > 0"):
        DecodeConfig(sampling_topp=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        DecodeConfig(sampling_topk=5, temperature=0.0)
    assert DecodeConfig(sampling_topk=5, nbest=20).sampling  # samples: nbest is not bounded by the beam
    assert not DecodeConfig().sampling


# --- alignment --------------------------------------------------------------------------------


def test_word_alignment_from_piece_attention():
    assert piece_words(["▁Ein", "▁Fahr", "rad", ".", "▁x"]) == [0, 1, 1, 1, 2]
    source = ["▁Ein", "▁Fahr", "rad", "."]  # words: Ein, Fahrrad.
    target = ["▁A", "▁bi", "cycle", "."]  # words: A, bicycle.
    weights = torch.tensor([[0.7, 0.1, 0.1, 0.1],
                            [0.4, 0.3, 0.3, 0.0],  # "bi": Fahrrad (0.6) beats Ein (0.4) over its pieces
                            [0.5, 0.2, 0.0, 0.3],
                            [0.2, 0.0, 0.0, 0.8]])
    assert word_alignment(weights, source, target) == [(0, 0), (1, 1)]
    assert pharaoh([(0, 0), (1, 1)]) == "0-0 1-1"


def test_translate_alignment_follows_each_hypothesis_and_keeps_empty_lines(translator, model_dir, monkeypatch,
                                                                            capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(SOURCES) + "\n"))
    assert main(["translate", "--model", str(model_dir), "--alignment", "--nbest", "2", "--beam", "2",
                 "--max-len-b", "8", "--precision", "fp32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * len(SOURCES) - 1  # the empty line has one entry
    for line in lines:
        index, text, score, alignment = line.split(" ||| ")
        pairs = [tuple(map(int, link.split("-"))) for link in alignment.split()]
        assert [t for _, t in pairs] == list(range(len(text.split())))  # one link per target word
        assert all(0 <= s < len(SOURCES[int(index)].split()) for s, _ in pairs)
        assert math.isfinite(float(score))
    assert translator.align(SOURCES, ["a", "b c", "", "d", "e"])[2:4] == ["", ""]
    with pytest.raises(ValueError, match="alignment layer 5 out of range"):
        translator.align(SOURCES, SOURCES, layer=5)


def test_a_bad_alignment_layer_is_refused_before_the_input_is_read(model_dir, tmp_path, capsys):
    # The input does not exist: the layer's error comes first, so nothing was read or translated.
    assert main(["translate", "--model", str(model_dir), "--alignment", "--alignment-layer", "99",
                 "--input", str(tmp_path / "missing.de"), "--precision", "fp32"]) == 2
    assert capsys.readouterr().err.strip().endswith("error: alignment layer 99 out of range: the model has "
                                                    "2 decoder layers")
