"""What the benchmarks feed the models: Multi30k-shaped training batches and test sources.

Training batches use the real subword lengths of Multi30k train de-en (an 8k joint SentencePiece
BPE, trained once and cached under benchmarks/results/.cache) cut into token-budget batches by
`aiayn.files.data.make_batches`, the batcher `aiayn train` uses; the token *ids* are random, since
throughput depends on shapes alone. Without the data, lengths are drawn from N(14, 5) clipped to
[1, 100] (the Multi30k mean is about 14 pieces) and the results say so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aiayn.config import PAD_ID
from aiayn.files.data import Batch, TokenizedCorpus, collate, make_batches, read_lines
from aiayn.files.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / "results" / ".cache"
FIRST_ID = PAD_ID + 4  # ids 0..3 are pad / unk / bos / eos


def multi30k_dir() -> Path | None:
    """The shared Multi30k folder (`../shared/data/multi30k` or $AIAYN_DATA), or None."""
    for candidate in (os.environ.get("AIAYN_DATA"), ROOT.parent / "shared" / "data"):
        if candidate:
            for folder in (Path(candidate), Path(candidate) / "multi30k"):
                if (folder / "train.de.gz").is_file():
                    return folder
    return None


def tokenizer(data_dir: Path, vocab_size: int = 8000, threads: int = 1) -> Tokenizer:
    """Joint de-en BPE trained on Multi30k train, cached (training it takes ~10 s at 1 thread)."""
    path = CACHE / f"tokenizer-de-en-{vocab_size}.model"
    if path.is_file():
        return Tokenizer.load(path)
    texts = read_lines(data_dir / "train.de.gz") + read_lines(data_dir / "train.en.gz")
    trained = Tokenizer.train(texts, vocab_size, num_threads=threads)
    CACHE.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(trained.to_bytes())
    temporary.replace(path)
    return trained


@dataclass
class Lengths:
    src: np.ndarray  # subword pieces per source sentence
    tgt: np.ndarray  # per target sentence (without BOS / EOS)
    origin: str  # where the lengths come from


def training_lengths(threads: int = 1, seed: int = 0) -> Lengths:
    """Subword lengths of Multi30k train de-en, or synthetic N(14, 5) lengths without the data."""
    data_dir = multi30k_dir()
    if data_dir is None:
        rng = np.random.default_rng(seed)
        draw = lambda: np.clip(np.rint(rng.normal(14, 5, 29000)), 1, 100).astype(np.int64)  # noqa: E731
        return Lengths(draw(), draw(), "synthetic N(14, 5), clipped to [1, 100] (Multi30k not found)")
    cached = CACHE / "multi30k-de-en-lengths.npz"
    if cached.is_file():
        arrays = np.load(cached)
        return Lengths(arrays["src"], arrays["tgt"], "Multi30k train de-en, 8k joint BPE")
    bpe = tokenizer(data_dir, threads=threads)
    src = np.array([len(ids) for ids in bpe.encode_batch(read_lines(data_dir / "train.de.gz"))])
    tgt = np.array([len(ids) for ids in bpe.encode_batch(read_lines(data_dir / "train.en.gz"))])
    np.savez(cached, src=src, tgt=tgt)
    return Lengths(src, tgt, "Multi30k train de-en, 8k joint BPE")


def training_batches(
    lengths: Lengths, *, max_tokens: int, vocab_size: int, count: int, seed: int = 0
) -> list[Batch]:
    """The first `count` shuffled `make_batches` batches, filled with random ids in [4, V)."""
    rng = np.random.default_rng(seed)
    keep = (lengths.src <= 250) & (lengths.tgt + 1 <= 250)  # aiayn train's max_sentence_tokens
    src_lengths, tgt_lengths = lengths.src[keep], lengths.tgt[keep]
    order = make_batches(src_lengths, tgt_lengths, max_tokens, shuffle=True, seed=seed, epoch=0)[:count]
    needed = sorted({i for batch in order for i in batch})
    corpus_index = {i: row for row, i in enumerate(needed)}
    corpus = TokenizedCorpus(
        src=[rng.integers(FIRST_ID, vocab_size, src_lengths[i], dtype=np.int32) for i in needed],
        tgt=[rng.integers(FIRST_ID, vocab_size, tgt_lengths[i], dtype=np.int32) for i in needed],
        line_numbers=[i + 1 for i in needed],
    )
    return [collate(corpus, [corpus_index[i] for i in batch]) for batch in order]


@dataclass
class DecodingSources:
    ids: list[list[int]]  # source pieces per sentence (no BOS / EOS)
    mean_reference_length: float  # mean target pieces of the references
    origin: str


def decoding_sources(count: int, vocab_size: int = 8000, threads: int = 1, seed: int = 0) -> DecodingSources:
    """The first `count` German sources of Multi30k test_2016_flickr as 8k-BPE ids (or synthetic)."""
    data_dir = multi30k_dir()
    if data_dir is None:
        rng = np.random.default_rng(seed)
        lengths = np.clip(np.rint(rng.normal(14, 5, count)), 1, 100).astype(int)
        ids = [rng.integers(FIRST_ID, vocab_size, n).tolist() for n in lengths]
        return DecodingSources(ids, 14.0, "synthetic N(14, 5) lengths, random ids (Multi30k not found)")
    bpe = tokenizer(data_dir, vocab_size, threads=threads)
    german = read_lines(data_dir / "test_2016_flickr.de.gz")[:count]
    english = read_lines(data_dir / "test_2016_flickr.en.gz")[:count]
    ids = bpe.encode_batch(german)
    reference = float(np.mean([len(x) for x in bpe.encode_batch(english)]))
    return DecodingSources(ids, reference, f"Multi30k test_2016_flickr de (first {len(ids)}), 8k joint BPE")
