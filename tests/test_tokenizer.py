"""Tokenizer: fixed special ids, exact round trip on Multi30k, save / load gives identical ids."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from aiayn.config import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from aiayn.files.tokenizer import Tokenizer

MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"
VOCAB_SIZE = 1000


def _lines(name: str, limit: int | None = None) -> list[str]:
    path = MULTI30K / name
    if not path.is_file():
        pytest.skip(f"Multi30k copy not found at {MULTI30K}")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")[:-1]
    return lines[:limit]


@pytest.fixture(scope="module")
def train_lines() -> dict[str, list[str]]:
    return {lang: _lines(f"train.{lang}.gz", 3000) for lang in ("de", "en")}


@pytest.fixture(scope="module")
def tokenizer(train_lines: dict[str, list[str]]) -> Tokenizer:
    return Tokenizer.train(train_lines["de"] + train_lines["en"], VOCAB_SIZE)


def test_specials_at_fixed_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == VOCAB_SIZE
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert tokenizer.pieces([0, 1, 2, 3]) == ["<pad>", "<unk>", "<s>", "</s>"]


def test_round_trip_on_training_sentences(tokenizer: Tokenizer, train_lines) -> None:
    for lang, lines in train_lines.items():
        decoded = tokenizer.decode_batch(tokenizer.encode_batch(lines))
        mismatches = [(s, d) for s, d in zip(lines, decoded) if s != d]
        assert mismatches == [], lang


def test_round_trip_on_unseen_validation_sentences(tokenizer: Tokenizer) -> None:
    # Only characters never seen in the 3000 training lines can break the round trip (-> <unk>).
    for lang in ("de", "en"):
        lines = _lines(f"val.{lang}.gz")
        assert len(lines) == 1014
        decoded = tokenizer.decode_batch(tokenizer.encode_batch(lines))
        exact = sum(s == d for s, d in zip(lines, decoded))
        assert exact / len(lines) > 0.99, (lang, exact)


def test_whitespace_is_kept_exactly(tokenizer: Tokenizer) -> None:
    # remove_extra_whitespaces=False: double, leading and trailing spaces survive.
    for text in ["Ein  Mann.", " A man.", "A man. "]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_unseen_character_is_unk(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a \u4e2d b")  # a CJK character never appears in Multi30k
    assert UNK_ID in ids


def test_encode_adds_no_specials_and_batch_matches_single(
    tokenizer: Tokenizer, train_lines
) -> None:
    lines = train_lines["en"][:50]
    batch = tokenizer.encode_batch(lines)
    assert batch == [tokenizer.encode(line) for line in lines]
    assert all(token > EOS_ID for ids in batch for token in ids)


def test_decode_skips_pad_bos_eos_anywhere(tokenizer: Tokenizer) -> None:
    text = "Zwei junge Männer spielen Fußball."
    ids = tokenizer.encode(text)
    noisy = [BOS_ID] + ids[:2] + [PAD_ID] + ids[2:] + [EOS_ID, PAD_ID, PAD_ID]
    assert tokenizer.decode(noisy) == text
    assert tokenizer.decode(torch.tensor(noisy)) == text
    rows = torch.tensor([noisy, [BOS_ID] + ids + [EOS_ID] + [PAD_ID] * 3])
    assert tokenizer.decode_batch(rows) == [text, text]
    assert tokenizer.pieces([BOS_ID, ids[0]])[0] == "<s>"
    with pytest.raises(IndexError, match="1000"):
        tokenizer.decode([VOCAB_SIZE])


def test_save_load_gives_identical_ids(tokenizer: Tokenizer, train_lines, tmp_path: Path) -> None:
    path = tokenizer.save(tmp_path / "model")
    assert path == tmp_path / "model" / Tokenizer.MODEL_FILE
    assert sorted(p.name for p in path.parent.iterdir()) == [Tokenizer.MODEL_FILE]  # no temp left
    lines = train_lines["de"][:200]
    expected = tokenizer.encode_batch(lines)
    for source in (tmp_path / "model", path, str(path)):
        assert Tokenizer.load(source).encode_batch(lines) == expected
    restored = Tokenizer.from_bytes(tokenizer.to_bytes())
    assert restored.encode_batch(lines) == expected
    assert restored.to_bytes() == path.read_bytes()


def test_load_missing_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.tokenizer\.model"):
        Tokenizer.load(tmp_path / "empty")


def test_bad_model_bytes_and_bad_vocab_size() -> None:
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.from_bytes(b"definitely not a model")
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["a b c"], 4)
    with pytest.raises(ValueError, match="vocab_size=5000"):
        Tokenizer.train(["a tiny corpus", "with few pieces"], 5000)


def test_vocab_smaller_than_the_character_set_says_what_size_to_use() -> None:
    texts = ["Ein Mann fährt Fahrrad.", "A man rides a bike."]
    characters = len(set("".join(texts).replace(" ", "\u2581")))  # 21 letters and signs + "▁"
    needed = characters + 4
    with pytest.raises(ValueError, match=rf"its {characters} distinct characters .* use --vocab-size {needed} or more"):
        Tokenizer.train(texts, needed - 1, num_threads=1)
    assert Tokenizer.train(texts, needed, num_threads=1).vocab_size == needed  # the size it names works
