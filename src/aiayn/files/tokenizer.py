"""SentencePiece BPE tokenizer with one vocabulary shared by source and target.

The paper (section 5.1) uses byte-pair encoding with a shared source-target vocabulary, which is
what lets `model.py` tie the source, target and output embeddings. The special ids are fixed
project-wide in `aiayn.config`: pad = 0, unk = 1, bos = 2, eos = 3; a model file whose specials
sit elsewhere is rejected at load time.

Normalization is the identity and whitespace is kept as is, so `decode(encode(s)) == s` for every
sentence whose characters were seen in training (all of Multi30k train, see
`benchmarks/data_pipeline.py`). NFKC would fold e.g. a no-break space into a space and break
that round trip, and BLEU is computed on the detokenized text.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from aiayn.config import BOS_ID, EOS_ID, PAD_ID, UNK_ID

_SPECIAL_PIECES = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}


class Tokenizer:
    """Wraps a trained SentencePiece model; ids are plain Python ints.

    Raises:
        ValueError: if the model's special ids differ from `aiayn.config`'s.
    """

    MODEL_FILE = "tokenizer.model"

    def __init__(self, model_proto: bytes, *, num_threads: int | None = None) -> None:
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(model_proto)
        except RuntimeError as error:  # sentencepiece reports a corrupt proto this way
            raise ValueError(
                f"not a SentencePiece model ({len(model_proto)} bytes): {error}"
            ) from error
        found = {
            PAD_ID: processor.pad_id(),
            UNK_ID: processor.unk_id(),
            BOS_ID: processor.bos_id(),
            EOS_ID: processor.eos_id(),
        }
        if any(found[expected] != expected for expected in found):
            raise ValueError(
                "tokenizer special ids must be pad=0 unk=1 bos=2 eos=3, got "
                f"pad={found[PAD_ID]} unk={found[UNK_ID]} bos={found[BOS_ID]} eos={found[EOS_ID]}"
            )
        self._processor = processor
        self._model_proto = bytes(model_proto)
        self._num_threads = num_threads if num_threads is not None else min(os.cpu_count() or 1, 8)

    # ------------------------------------------------------------------ building and storing

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        character_coverage: float = 1.0,
        seed_sentencepiece_size: int = 1_000_000,
        input_sentence_size: int = 2_000_000,
        num_threads: int | None = None,
    ) -> Tokenizer:
        """Train a BPE model in memory on `texts` (pass both languages for a joint vocabulary).

        Args:
            texts: sentences, one per item; empty items are ignored by SentencePiece.
            vocab_size: total size including the 4 special pieces.
            character_coverage: 1.0 keeps every character seen (right for the small European
                alphabets of Multi30k); lower values map rare characters to <unk>.
            input_sentence_size: SentencePiece samples at most this many sentences.

        Raises:
            ValueError: vocab_size too small, or too large for the text given.
        """
        if vocab_size <= len(_SPECIAL_PIECES):
            raise ValueError(f"vocab_size must exceed {len(_SPECIAL_PIECES)}, got {vocab_size}")
        texts = list(texts)
        if character_coverage == 1.0:
            # Every character is a piece of its own (a space becomes "▁"), before any merge: say so
            # in our words rather than SentencePiece's internal check.
            characters = len(set("".join(texts).replace(" ", "\u2581")))
            needed = characters + len(_SPECIAL_PIECES)
            if vocab_size < needed:
                raise ValueError(
                    f"vocab_size {vocab_size} is too small for this text: its {characters} distinct characters "
                    f"and {len(_SPECIAL_PIECES)} special pieces need at least {needed}; use --vocab-size {needed} "
                    f"or more (a few thousand gives BPE room to merge: 8000 for Multi30k)"
                )
        threads = num_threads if num_threads is not None else min(os.cpu_count() or 1, 8)
        writer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts),
                model_writer=writer,
                vocab_size=vocab_size,
                model_type="bpe",
                character_coverage=character_coverage,
                seed_sentencepiece_size=seed_sentencepiece_size,
                input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True,
                normalization_rule_name="identity",
                # Keeping double / leading spaces is what makes decode(encode(s)) == s exact.
                remove_extra_whitespaces=False,
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                pad_piece=_SPECIAL_PIECES[PAD_ID],
                unk_piece=_SPECIAL_PIECES[UNK_ID],
                bos_piece=_SPECIAL_PIECES[BOS_ID],
                eos_piece=_SPECIAL_PIECES[EOS_ID],
                num_threads=threads,
                minloglevel=2,
            )
        except RuntimeError as error:  # e.g. "Vocabulary size is too high"
            raise ValueError(
                f"SentencePiece training failed (vocab_size={vocab_size}): {error}"
            ) from error
        return cls(writer.getvalue(), num_threads=num_threads)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a model directory (holding `tokenizer.model`) or from the .model file itself.

        Raises:
            FileNotFoundError: naming the path that was looked for.
        """
        path = Path(path)
        model_file = path / cls.MODEL_FILE if path.is_dir() else path
        if not model_file.is_file():
            raise FileNotFoundError(f"no tokenizer model at {model_file}")
        try:
            return cls(model_file.read_bytes())
        except ValueError as error:
            raise ValueError(f"{model_file}: {error}") from None

    def save(self, directory: str | Path) -> Path:
        """Write `directory/tokenizer.model` atomically and durably (temp file, fsync, rename);
        returns its path."""
        from aiayn.files.atomic import atomic_write_bytes

        target = Path(directory) / self.MODEL_FILE
        atomic_write_bytes(target, self._model_proto)
        return target

    def to_bytes(self) -> bytes:
        """The serialized SentencePiece model (what `save` writes)."""
        return self._model_proto

    @classmethod
    def from_bytes(cls, data: bytes) -> Tokenizer:
        """Inverse of `to_bytes`. Raises ValueError on bytes that are not a valid model."""
        return cls(data)

    # ------------------------------------------------------------------ using

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Subword ids of `text`, without BOS / EOS."""
        return self._processor.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once, multi-threaded inside SentencePiece."""
        return self._processor.encode(list(texts), num_threads=self._num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; pad / bos / eos are skipped wherever they occur (no early stop).

        Accepts any int sequence (list, numpy array, 1-D tensor). Raises IndexError for ids
        outside [0, vocab_size).
        """
        return self._processor.decode(self._clean(ids))

    def decode_batch(self, batch: Iterable[Sequence[int]]) -> list[str]:
        """`decode` for each row of `batch` (e.g. a [B, T] tensor or a list of lists)."""
        rows = [self._clean(ids) for ids in batch]
        return self._processor.decode(rows, num_threads=self._num_threads) if rows else []

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """The subword string of each id (specials included), e.g. for attention plot labels."""
        return [
            self._processor.id_to_piece(token) for token in self._clean(ids, keep_specials=True)
        ]

    def _clean(self, ids: Sequence[int], *, keep_specials: bool = False) -> list[int]:
        tokens = [int(token) for token in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        size = self.vocab_size
        for token in tokens:
            if not 0 <= token < size:
                raise IndexError(f"token id {token} outside the vocabulary [0, {size})")
        if keep_specials:
            return tokens
        return [token for token in tokens if token not in (PAD_ID, BOS_ID, EOS_ID)]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"
