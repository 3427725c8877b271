"""sacreBLEU scores on strings whose values are known by hand; the `aiayn evaluate` command."""

import json
import math

import pytest
import torch

from aiayn import ModelConfig, Transformer
from aiayn.cli import main
from aiayn.evaluate import bleu, format_scores, score
from aiayn.files.tokenizer import Tokenizer
from aiayn.files.checkpoint import save_model
from aiayn.decoding.translator import Translator
from aiayn.config import DecodeConfig

HYP = "the cat sat on the mat"
REF = "the cat sat on a mat"


def test_identical_text_scores_perfectly():
    lines = ["A man rides a bike down the road .", "Two dogs play in the snow ."]
    scores = score(lines, lines)
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["chrf"] == pytest.approx(100.0)
    assert scores["ter"] == pytest.approx(0.0)
    assert scores["sentences"] == 2
    assert "tok:13a" in scores["bleu_signature"] and "nrefs:1" in scores["bleu_signature"]


def test_bleu_and_ter_by_hand():
    # n-gram precisions 5/6 ("the" clipped to one), 3/5, 2/4, 1/3; equal lengths so BP = 1.
    expected_bleu = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25  # 53.73
    scores = score([HYP], [REF])
    assert scores["bleu"] == pytest.approx(expected_bleu)
    assert scores["bleu_precisions"] == pytest.approx([500 / 6, 60.0, 50.0, 100 / 3])
    assert scores["bleu_brevity_penalty"] == 1.0
    assert scores["ter"] == pytest.approx(100 / 6)  # one substitution over six reference words
    assert bleu([HYP], [REF]) == pytest.approx(expected_bleu)
    # A shorter hypothesis pays the brevity penalty exp(1 - r / c).
    short = score(["the cat sat on the"], [REF])
    assert short["bleu_brevity_penalty"] == pytest.approx(math.exp(1 - 6 / 5))


def test_lowercase_bleu():
    hyp = ["The Cat Sat On The Mat Today"]
    ref = ["the cat sat on the mat today"]
    scores = score(hyp, ref, lowercase=True)
    assert scores["bleu"] < 50
    assert scores["bleu_lowercase"] == pytest.approx(100.0)
    assert "case:lc" in scores["bleu_lowercase_signature"]
    assert "bleu_lowercase" not in score(hyp, ref)
    assert bleu(hyp, ref, lowercase=True) == pytest.approx(100.0)


def test_length_mismatch_names_both_counts():
    with pytest.raises(ValueError, match="3 hypotheses, 2 references"):
        score(["a", "b", "c"], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        bleu([], [])


def test_format_scores_lines():
    text = format_scores(score([HYP], [REF], lowercase=True))
    assert text.startswith("BLEU = 53.73 83.3/60.0/50.0/33.3 (BP = 1.000")
    assert "chrF = " in text and "TER = 16.67" in text and "BLEU (lowercased) = 53.73" in text


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_evaluate_hyp_json(tmp_path, capsys):
    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp.write_text(f"{HYP}\n", encoding="utf-8")
    ref.write_text(f"{REF}\n", encoding="utf-8")
    assert main(["evaluate", "--hyp", str(hyp), "--ref", str(ref), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["bleu"] == pytest.approx(score([HYP], [REF])["bleu"])
    ref.write_text(f"{REF}\n{REF}\n", encoding="utf-8")
    assert main(["evaluate", "--hyp", str(hyp), "--ref", str(ref)]) == 2
    assert "1 hypotheses, 2 references" in capsys.readouterr().err


def test_cli_evaluate_model_translates_then_scores(tmp_path, capsys):
    sentences = ["ein mann fährt fahrrad .", "zwei hunde spielen im schnee .", "eine frau singt ."] * 20
    tokenizer = Tokenizer.train(sentences, vocab_size=40, num_threads=1)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, max_positions=32))
    save_model(model, tokenizer, tmp_path / "model")
    src, ref, out = tmp_path / "src.txt", tmp_path / "ref.txt", tmp_path / "hyp.txt"
    src.write_text("\n".join(sentences[:3]) + "\n", encoding="utf-8")
    ref.write_text("a man rides a bike .\ntwo dogs play .\na woman sings .\n", encoding="utf-8")
    args = ["evaluate", "--model", str(tmp_path / "model"), "--src", str(src), "--ref", str(ref),
            "--beam", "2", "--max-len-b", "5", "--save-hyp", str(out), "--json"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    expected_hyps = Translator.load(tmp_path / "model").translate(sentences[:3], DecodeConfig(beam_size=2, max_len_b=5))
    assert out.read_text(encoding="utf-8").splitlines() == expected_hyps
    assert printed["bleu"] == pytest.approx(score(expected_hyps, ref.read_text().splitlines())["bleu"])
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--ref", str(ref)]) == 2
    assert "--src" in capsys.readouterr().err
