"""Data: validated reading, Multi30k lookup and download, token-budget batches, exact resume."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from aiayn.files import data
from aiayn.config import BOS_ID, EOS_ID, PAD_ID
from aiayn.files.data import (
    MULTI30K_SHA256,
    Batch,
    BatchIterator,
    DataError,
    ParallelText,
    TokenizedCorpus,
    collate,
    download,
    encode_parallel,
    make_batches,
    multi30k_paths,
    parse_data_spec,
    read_lines,
    read_parallel,
)
from aiayn.files.tokenizer import Tokenizer
from conftest import MULTI30K



def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _needs_multi30k() -> None:
    if not (MULTI30K / "val.de.gz").is_file():
        pytest.skip(f"Multi30k copy not found at {MULTI30K}")


class CharTokenizer:
    """Stand-in with exactly predictable lengths: one id per character."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[4 + ord(char) % 50 for char in text] for text in texts]


def _corpus(src_lengths: list[int], tgt_lengths: list[int]) -> TokenizedCorpus:
    rng = np.random.default_rng(0)
    src = [rng.integers(4, 100, size=n, dtype=np.int32) for n in src_lengths]
    tgt = [rng.integers(4, 100, size=n, dtype=np.int32) for n in tgt_lengths]
    return TokenizedCorpus(src, tgt, list(range(1, len(src) + 1)))


# ---------------------------------------------------------------------------- reading


def test_read_parallel_skips_blank_pairs_and_keeps_line_numbers(tmp_path: Path) -> None:
    src = _write(tmp_path / "a.src", b"one\n\ntwo\nthree\n \nfour\n")
    tgt = _write(tmp_path / "a.tgt", "eins\nzwei?\nzwei\n\t\nfünf\nvier\n".encode())
    text = read_parallel(src, tgt)
    assert text.src == ["one", "two", "four"]
    assert text.tgt == ["eins", "zwei", "vier"]
    assert text.line_numbers == [1, 3, 6]
    assert text.skipped_empty == 3  # line 2 (src empty), 4 (tgt tab), 5 (src space)
    assert len(text) == 3


def test_crlf_bom_and_no_final_newline(tmp_path: Path) -> None:
    src = _write(tmp_path / "s", b"\xef\xbb\xbfHello\r\nWorld\r\n")
    tgt = _write(tmp_path / "t", b"Hallo\nWelt")
    text = read_parallel(src, tgt)
    assert text.src == ["Hello", "World"]
    assert text.tgt == ["Hallo", "Welt"]


def test_unicode_line_separators_do_not_split_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "s", "a\u2028b\x85c\x0cd\nsecond\n".encode())
    assert read_lines(path) == ["a\u2028b\x85c\x0cd", "second"]


def test_read_lines_keeps_empty_lines(tmp_path: Path) -> None:
    assert read_lines(_write(tmp_path / "m", b"a\n\n  \nb\n")) == ["a", "", "  ", "b"]
    assert read_lines(_write(tmp_path / "e", b"")) == []


def test_gzip_detected_by_magic_bytes_not_extension(tmp_path: Path) -> None:
    body = b"Ein Hund.\nZwei Katzen.\n"
    gzipped_txt = _write(tmp_path / "looks_plain.txt", gzip.compress(body))
    plain_gz = _write(tmp_path / "looks_gzipped.gz", body)
    assert read_lines(gzipped_txt) == ["Ein Hund.", "Zwei Katzen."]
    assert read_lines(plain_gz) == ["Ein Hund.", "Zwei Katzen."]


def test_corrupt_gzip_names_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "broken.gz", gzip.compress(b"a\n" * 1000)[:30])
    with pytest.raises(DataError, match="broken.gz.*corrupt gzip"):
        read_lines(path)


def test_mismatched_line_counts_name_both_files_and_counts(tmp_path: Path) -> None:
    src = _write(tmp_path / "left.de", b"a\nb\nc\n")
    tgt = _write(tmp_path / "right.en", b"a\nb\n")
    with pytest.raises(DataError) as info:
        read_parallel(src, tgt)
    message = str(info.value)
    assert str(src) in message and str(tgt) in message
    assert "has 3 lines" in message and "has 2 lines" in message


def test_invalid_utf8_reports_line_number(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.txt", b"ok\nstill ok \xc3\xa4\nbroken \xff here\nok\n")
    with pytest.raises(DataError, match=r"bad\.txt: line 3: invalid UTF-8"):
        read_lines(path)
    gz = _write(tmp_path / "bad2.gz", gzip.compress(b"\xfe first line bad\n"))
    with pytest.raises(DataError, match=r"bad2\.gz: line 1:"):
        read_parallel(gz, gz)


def test_missing_file_names_path(tmp_path: Path) -> None:
    ok = _write(tmp_path / "ok", b"a\n")
    with pytest.raises(DataError, match="no_such_file.*not found"):
        read_parallel(ok, tmp_path / "no_such_file")
    assert issubclass(DataError, ValueError)


def test_real_multi30k_validation_reads_all_pairs() -> None:
    _needs_multi30k()
    text = read_parallel(MULTI30K / "val.de.gz", MULTI30K / "val.en.gz")
    assert len(text) == 1014 and text.skipped_empty == 0
    assert text.line_numbers == list(range(1, 1015))
    assert text.src[0].startswith("Eine Gruppe von Männern")


# ---------------------------------------------------------------------------- Multi30k


def test_parse_data_spec() -> None:
    assert parse_data_spec("multi30k:de-en") == ("multi30k", "de", "en")
    assert parse_data_spec("Multi30k:cs-fr") == ("multi30k", "cs", "fr")
    with pytest.raises(ValueError, match="unknown data set 'wmt14'"):
        parse_data_spec("wmt14:de-en")
    with pytest.raises(ValueError, match="unknown language 'es'.*en, de, fr, cs"):
        parse_data_spec("multi30k:es-en")
    with pytest.raises(ValueError, match="must look like"):
        parse_data_spec("multi30k-de-en")
    with pytest.raises(ValueError, match="both 'de'"):
        parse_data_spec("multi30k:de-de")


@pytest.fixture()
def no_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A clean environment: no AIAYN_DATA, an empty cache under tmp_path."""
    monkeypatch.delenv("AIAYN_DATA", raising=False)
    monkeypatch.delenv("AIAYN_MULTI30K_URL", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "aiayn" / "multi30k"


def test_multi30k_paths_lookup_order_and_aliases(
    no_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    explicit = tmp_path / "explicit"
    (explicit / "multi30k").mkdir(parents=True)
    _write(explicit / "val.de.gz", b"x\n")
    _write(explicit / "multi30k" / "val.en.gz", b"y\n")
    assert multi30k_paths("de", "en", "valid", data_dir=explicit, download=False) == (
        explicit / "val.de.gz",
        explicit / "multi30k" / "val.en.gz",
    )
    env_dir = tmp_path / "env"
    (env_dir / "multi30k").mkdir(parents=True)
    _write(env_dir / "multi30k" / "test_2016_flickr.fr.gz", b"x\n")
    no_env.mkdir(parents=True)
    _write(no_env / "test_2016_flickr.cs.gz", b"y\n")
    monkeypatch.setenv("AIAYN_DATA", str(env_dir))
    assert multi30k_paths("fr", "cs", "test", download=False) == (
        env_dir / "multi30k" / "test_2016_flickr.fr.gz",
        no_env / "test_2016_flickr.cs.gz",
    )
    with pytest.raises(DataError, match=r"train\.fr\.gz not found.*download=False"):
        multi30k_paths("fr", "cs", "train", download=False)
    with pytest.raises(ValueError, match="unknown Multi30k split 'test2017'"):
        multi30k_paths("de", "en", "test2017", download=False)
    with pytest.raises(ValueError, match="unknown Multi30k language 'xx'"):
        multi30k_paths("xx", "en", "train", download=False)


def test_checksums_match_the_local_copy() -> None:
    _needs_multi30k()
    assert len(MULTI30K_SHA256) == 12
    for name, expected in MULTI30K_SHA256.items():
        assert hashlib.sha256((MULTI30K / name).read_bytes()).hexdigest() == expected, name


def test_download_file_url_with_checksum(tmp_path: Path) -> None:
    source = _write(tmp_path / "source.gz", gzip.compress(b"hello\n"))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    dest = download(source.as_uri(), tmp_path / "out" / "copy.gz", sha256=digest)
    assert dest.read_bytes() == source.read_bytes()
    assert read_lines(dest) == ["hello"]

    bad = tmp_path / "out2" / "copy.gz"
    with pytest.raises(DataError) as info:
        download(source.as_uri(), bad, sha256="0" * 64)
    message = str(info.value)
    assert source.as_uri() in message and "0" * 64 in message and digest in message
    assert list(bad.parent.iterdir()) == []  # neither the file nor a temp file is left


def test_download_missing_url_is_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot download file://"):
        download((tmp_path / "absent.gz").as_uri(), tmp_path / "dest.gz")
    assert not (tmp_path / "dest.gz").exists()


@pytest.fixture()
def http_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server in a thread, serving the folder it returns."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # keep test output clean
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/task1/raw", root / "task1" / "raw"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_multi30k_download_from_local_http_server(
    no_env: Path, http_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _needs_multi30k()
    url, served = http_server
    served.mkdir(parents=True)
    for name in ("val.de.gz", "val.en.gz"):
        shutil.copy(MULTI30K / name, served / name)
    monkeypatch.setenv("AIAYN_MULTI30K_URL", url)
    src, tgt = multi30k_paths("de", "en", "val")
    assert (src, tgt) == (no_env / "val.de.gz", no_env / "val.en.gz")
    assert src.read_bytes() == (MULTI30K / "val.de.gz").read_bytes()
    assert len(read_parallel(src, tgt)) == 1014

    # A tampered mirror fails the hard-coded checksum and leaves the cache without the file.
    _write(served / "val.fr.gz", gzip.compress(b"tampered\n"))
    with pytest.raises(DataError, match=rf"checksum mismatch for {url}/val\.fr\.gz"):
        multi30k_paths("fr", "en", "val")
    assert sorted(p.name for p in no_env.iterdir()) == ["val.de.gz", "val.en.gz"]

    # The module constant is the fallback when the environment variable is unset.
    monkeypatch.delenv("AIAYN_MULTI30K_URL")
    monkeypatch.setattr(data, "MULTI30K_URL", url)
    shutil.copy(MULTI30K / "val.cs.gz", served / "val.cs.gz")
    assert multi30k_paths("cs", "en", "val")[0] == no_env / "val.cs.gz"

    with pytest.raises(DataError, match="cannot download .*train.de.gz.*404"):
        multi30k_paths("de", "en", "train")


# ---------------------------------------------------------------------------- tokenizing


def test_encode_parallel_length_filter_counts() -> None:
    text = ParallelText(
        src=["abc", "abcdefgh", "ab", "abcde"],
        tgt=["xy", "x", "uvwxyz", "uvwx"],
        line_numbers=[1, 2, 4, 7],
    )
    # max_tokens=5: src must be <= 5 and tgt + 1 <= 5.
    corpus = encode_parallel(CharTokenizer(), text, max_tokens=5)
    assert corpus.line_numbers == [1, 7]
    assert corpus.skipped_too_long == 2
    assert corpus.src_lengths.tolist() == [3, 5]
    assert corpus.tgt_lengths.tolist() == [2, 4]
    assert corpus.src[0].dtype == np.int32
    assert encode_parallel(CharTokenizer(), text, max_tokens=None).skipped_too_long == 0
    with pytest.raises(ValueError, match="max_tokens"):
        encode_parallel(CharTokenizer(), text, max_tokens=1)


# ---------------------------------------------------------------------------- batches


def test_collate_shifts_target_and_pads() -> None:
    corpus = TokenizedCorpus(
        src=[np.array([10, 11, 12], np.int32), np.array([20], np.int32)],
        tgt=[np.array([30, 31], np.int32), np.array([40, 41, 42, 43], np.int32)],
        line_numbers=[1, 2],
    )
    batch = collate(corpus, [1, 0])
    assert batch.indices == [1, 0]
    assert batch.src_tokens.tolist() == [[20, PAD_ID, PAD_ID], [10, 11, 12]]
    assert batch.tgt_input.tolist() == [[BOS_ID, 40, 41, 42, 43], [BOS_ID, 30, 31, PAD_ID, PAD_ID]]
    assert batch.tgt_output.tolist() == [[40, 41, 42, 43, EOS_ID], [30, 31, EOS_ID, PAD_ID, PAD_ID]]
    assert batch.src_tokens.dtype == torch.int64
    assert batch.src_mask.shape == (2, 1, 1, 3)
    assert batch.src_mask[:, 0, 0].tolist() == [[True, False, False], [True, True, True]]
    assert (batch.size, batch.num_src_tokens, batch.num_tgt_tokens) == (2, 4, 8)
    moved = batch.to("cpu")
    assert torch.equal(moved.tgt_output, batch.tgt_output) and moved.indices == [1, 0]
    with pytest.raises(ValueError, match="at least one"):
        collate(corpus, [])


def _check_partition(batches: list[list[int]], count: int) -> None:
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(count))  # every index exactly once


def test_make_batches_respects_token_budget() -> None:
    rng = np.random.default_rng(3)
    src = rng.integers(1, 40, size=500)
    tgt = rng.integers(1, 40, size=500)
    src[7], tgt[7] = 120, 5  # longer than the budget alone: a batch of one
    for shuffle in (False, True):
        batches = make_batches(src, tgt, 100, shuffle=shuffle, seed=1, epoch=1)
        _check_partition(batches, 500)
        for batch in batches:
            cost = len(batch) * max(src[batch].max(), tgt[batch].max() + 1)
            assert cost <= 100 or len(batch) == 1
        assert [7] in batches


def test_make_batches_eval_order_is_deterministic_and_sorted() -> None:
    src = [5, 3, 9, 3, 1, 7, 2, 8]
    tgt = [4, 2, 9, 2, 6, 1, 2, 3]
    first = make_batches(src, tgt, 20, shuffle=False, seed=1, epoch=1)
    assert first == make_batches(src, tgt, 20, shuffle=False, seed=99, epoch=7)
    # budget lengths max(src, tgt + 1): [5, 3, 10, 3, 7, 7, 3, 8]; ties by (tgt, src, index)
    assert [i for batch in first for i in batch] == [6, 1, 3, 0, 5, 4, 7, 2]
    assert first == [[6, 1, 3, 0], [5, 4], [7, 2]]  # costs 4*5, 2*7, 2*10 <= 20


def test_make_batches_shuffle_per_epoch_reproducible_with_seed() -> None:
    rng = np.random.default_rng(5)
    src, tgt = rng.integers(1, 30, size=300), rng.integers(1, 30, size=300)
    epoch1 = make_batches(src, tgt, 120, shuffle=True, seed=1, epoch=1)
    epoch2 = make_batches(src, tgt, 120, shuffle=True, seed=1, epoch=2)
    assert epoch1 == make_batches(src, tgt, 120, shuffle=True, seed=1, epoch=1)
    assert epoch1 != epoch2
    assert epoch1 != make_batches(src, tgt, 120, shuffle=True, seed=2, epoch=1)
    _check_partition(epoch2, 300)
    assert len(epoch1) == len(epoch2)
    with pytest.raises(ValueError, match="must be equal"):
        make_batches([1, 2], [1], 10, shuffle=False, seed=1, epoch=1)


def _all_indices(batches: list[Batch]) -> list[int]:
    return [i for batch in batches for i in batch.indices]


def test_batch_iterator_epochs_and_eval_order_restore() -> None:
    rng = np.random.default_rng(7)
    corpus = _corpus(rng.integers(1, 20, 200).tolist(), rng.integers(1, 20, 200).tolist())
    iterator = BatchIterator(corpus, 64, shuffle=True, seed=3)
    epoch1 = list(iterator)
    assert len(epoch1) == len(iterator) and (iterator.epoch, iterator.position) == (2, 0)
    epoch2 = list(iterator)
    assert iterator.epoch == 3
    assert sorted(_all_indices(epoch1)) == sorted(_all_indices(epoch2)) == list(range(200))
    assert _all_indices(epoch1) != _all_indices(epoch2)
    for batch in epoch1:
        assert batch.size * batch.tgt_output.shape[1] <= 64 or batch.size == 1
        assert batch.size * batch.src_tokens.shape[1] <= 64 or batch.size == 1

    evaluation = BatchIterator(corpus, 64, shuffle=False)
    first, second = list(evaluation), list(evaluation)
    assert _all_indices(first) == _all_indices(second)
    # Putting rows back by `indices` restores corpus order.
    restored: list[list[int] | None] = [None] * len(corpus)
    for batch in first:
        for row, index in enumerate(batch.indices):
            length = int(corpus.src_lengths[index])
            restored[index] = batch.src_tokens[row, :length].tolist()
    assert restored == [ids.tolist() for ids in corpus.src]


def test_batch_iterator_resumes_at_exact_next_batch() -> None:
    rng = np.random.default_rng(11)
    corpus = _corpus(rng.integers(1, 25, 300).tolist(), rng.integers(1, 25, 300).tolist())
    original = BatchIterator(corpus, 80, shuffle=True, seed=5)
    list(original)  # finish epoch 1 so the resume happens inside epoch 2
    stream = iter(original)
    consumed = [next(stream) for _ in range(4)]
    state = original.state_dict()
    assert state == {"epoch": 2, "position": 4}
    remaining = list(stream)

    resumed = BatchIterator(corpus, 80, shuffle=True, seed=5)
    resumed.load_state_dict(state)
    replay = list(resumed)
    assert [b.indices for b in replay] == [b.indices for b in remaining]
    for a, b in zip(replay, remaining):
        assert torch.equal(a.src_tokens, b.src_tokens) and torch.equal(a.tgt_input, b.tgt_input)
    assert len(consumed) + len(replay) == len(original)
    assert resumed.state_dict() == original.state_dict() == {"epoch": 3, "position": 0}

    with pytest.raises(ValueError, match="bad iterator state"):
        resumed.load_state_dict({"epoch": 1, "position": len(resumed) + 1})
    with pytest.raises(ValueError, match="needs int"):
        resumed.load_state_dict({"epoch": 1})
    resumed.next_epoch()
    assert resumed.state_dict() == {"epoch": 4, "position": 0}


def test_real_multi30k_padding_is_low() -> None:
    _needs_multi30k()
    text = read_parallel(MULTI30K / "train.de.gz", MULTI30K / "train.en.gz")
    tokenizer = Tokenizer.train(text.src[:3000] + text.tgt[:3000], 1000)
    corpus = encode_parallel(tokenizer, text, max_tokens=256)
    assert len(corpus) == 29000 and corpus.skipped_too_long == 0
    assert tokenizer.decode(corpus.tgt[5]) == text.tgt[5]
    padding = total = 0
    batches = list(BatchIterator(corpus, 8192, shuffle=True, seed=1))
    for batch in batches:
        for tensor in (batch.src_tokens, batch.tgt_output):
            padding += int((tensor == PAD_ID).sum())
            total += tensor.numel()
    assert sorted(_all_indices(batches)) == list(range(29000))
    assert padding / total < 0.10
