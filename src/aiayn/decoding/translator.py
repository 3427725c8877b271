"""Translating text with a trained model: batching, precision, alignment of input and output lines.

`Translator.translate` is what the CLI, the evaluation and the web server call; `Translator.attention`
returns every attention map of one sentence pair for plotting (`aiayn.visualize`).

Shape legend: L layers, H heads, S source pieces, T target pieces + 1 (BOS / EOS).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from aiayn import hardware
from aiayn.config import PAPER_DECODE, DecodeConfig
from aiayn.inference import beam_step_for, check_precision, decoding_timings, prepare
from aiayn.decoding.search import generate, score_tokens, strategy


@dataclass
class AttentionResult:
    """All attention weights of one sentence pair (rows = queries, columns = keys)."""

    source_tokens: list[str]  # source pieces: the columns of encoder self- and cross-attention
    target_input_tokens: list[str]  # "<s>" + target pieces: the columns of decoder self-attention
    # target pieces + "</s>": the query rows of decoder self / cross (what each position predicts)
    target_tokens: list[str]
    encoder_self: Tensor  # [L_enc, H, S, S] float32 cpu
    decoder_self: Tensor  # [L_dec, H, T, T]
    cross: Tensor  # [L_dec, H, T, S]
    translation: str
    source_ids: list[int] = field(default_factory=list)  # the ids of source_tokens
    target_ids: list[int] = field(default_factory=list)  # the target pieces' ids (no BOS / EOS)


def _check_sentences(sentences: list[str]) -> None:
    """Every sentence a str that is valid Unicode text (a lone surrogate cannot be encoded)."""
    for line, sentence in enumerate(sentences, 1):
        if not isinstance(sentence, str):
            raise ValueError(f"line {line}: expected a str, got {type(sentence).__name__}")
        try:
            sentence.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"line {line}: not valid Unicode text ({error.reason} at character "
                             f"{error.start})") from None


def _sentence_seed(seed: int, sentence: str) -> int:
    """A sentence's own seed for sampling: from the run's seed and the sentence's text alone."""
    import hashlib

    digest = hashlib.sha256(f"{seed}\0{sentence}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Translator:
    """A model and its tokenizer, ready to translate lists of sentences.

    Args:
        model: a `Transformer`; left as it is: the Translator converts a copy of it (moved to
            `device`, in eval mode, in `precision`).
        tokenizer: the model's `Tokenizer`.
        device: "cpu", "cuda", "cuda:1", ...
        precision: "fp32"; "bf16": the weights are cast to bfloat16; the positional table,
            log-softmax and scores stay float32 (casting once is faster than torch.autocast,
            which re-casts the weights on every call).
            "int8" (CPU only): linear layers in int8 arithmetic (see `aiayn.inference.prepare`).
            "auto": bf16 where it is native on `device` and measured faster on this model
            (`decoding_timings`), else fp32 (`aiayn.hardware.choose_precision`). What it resolved
            to, and why, is `precision_choice`; an explicit bf16 where it is not native warns.
        compile: run the encoder and decoder step through `torch.compile` (`aiayn.inference.compile`); the first
            translations are slow while it compiles.
        info: the model directory's info dict (e.g. "src_lang", "tgt_lang").
    Raises:
        ValueError: unknown precision, or int8 off the CPU.
    """

    def __init__(self, model, tokenizer, *, device: str | torch.device = "cpu", precision: str = "fp32",
                 compile: bool = False, info: dict[str, Any] | None = None) -> None:
        self.device = hardware.check_device(device)
        for name, parameter in model.named_parameters():
            if not bool(torch.isfinite(parameter).all()):
                raise ValueError(f"the model's {name} holds NaN or infinite values: it cannot translate")
        self.num_parameters = sum(p.numel() for p in model.parameters())  # before packing / int8
        self.precision_choice = hardware.choose_precision(
            precision, self.device, timings=lambda: decoding_timings(model, self.device))
        if self.precision_choice.warning:
            warnings.warn(self.precision_choice.message, RuntimeWarning, stacklevel=2)
        self.precision = self.precision_choice.precision
        self.model = prepare(model, precision=self.precision, device=self.device, compile=compile)  # a copy
        self.step = beam_step_for(self.device)  # for BeamSearch(step=...); None: the search's own
        self.tokenizer = tokenizer
        self.info = dict(info or {})
        self.model_dir: Path | None = None  # set by `load`: where the original weights are (for `explain`)

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        compile: bool = False,
    ) -> Translator:
        """A Translator for a model directory written by `aiayn.files.checkpoint.save_model`.

        Raises:
            FileNotFoundError / ValueError: a missing or damaged model directory (`load_model`),
                a device this machine lacks, or a precision it cannot run.
        """
        from aiayn.files.checkpoint import load_model

        if precision != "auto":  # before loading: no model moved to a device it cannot use
            check_precision(precision, device)
        hardware.check_device(device)
        model, tokenizer, info = load_model(model_dir, device)
        translator = cls(model, tokenizer, device=device, precision=precision, compile=compile, info=info)
        translator.model_dir = Path(model_dir)
        return translator

    @property
    def max_source_len(self) -> int:
        """Longest source (in pieces) the encoder can take: one position per piece."""
        return self.model.config.max_positions

    def _encode_source(self, ids: list[int], line_number: int) -> list[int]:
        limit = self.max_source_len
        if len(ids) > limit:
            warnings.warn(
                f"line {line_number}: {len(ids)} source pieces exceed the model's max_positions "
                f"({limit}); translating only the first {limit}",
                stacklevel=3,
            )
            ids = ids[:limit]
        return ids

    def translate(
        self,
        sentences: list[str],
        decode: DecodeConfig = PAPER_DECODE,
        *,
        batch_tokens: int = 4096,
        return_scores: bool = False,
        progress: bool = False,
        prefixes: list[str] | None = None,
    ) -> list[str] | list[list[tuple[str, float]]]:
        """Translate `sentences`; output i belongs to input i.

        `decode` sets the search (`aiayn.decoding.search.strategy`; default `DecodeConfig()`: the paper's
        beam 4, length penalty 0.6, max length S + 50). With `decode.sampling`, the translations
        are random samples (`aiayn.decoding.search.Sampling`):
        nbest of them per sentence, from generators seeded with decode.seed and the sentence's
        text, so that the same seed gives the same samples whatever the batch. `prefixes`: one
        target prefix per sentence ("" for none): every translation starts with its pieces.

        Sentences are sorted by length and grouped into batches of at most `batch_tokens` padded
        source pieces (at least one sentence each), then put back in input order. An empty or
        whitespace-only line gives "" (score 0.0). A source longer than max_positions pieces is
        truncated with a warning naming its line number (1-based); outputs are capped at
        max_positions - 1 pieces by the search.

        Returns:
            list[str] (best translations), or with nbest > 1 or return_scores, for each input a
            list of (translation, length-normalised log-prob score), best first (one ("", 0.0)
            entry for an empty line; fewer than nbest where fewer hypotheses exist).
        Raises:
            ValueError: a bad batch_tokens (`DecodeConfig` checks its own fields);
                a sentence that is not a str or is not valid Unicode (a lone surrogate), named by line.
        """
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
        _check_sentences(sentences)
        if prefixes is not None:
            if len(prefixes) != len(sentences):
                raise ValueError(f"{len(prefixes)} prefixes for {len(sentences)} sentences")
            _check_sentences(prefixes)
        sources = self._encode_sources(sentences)
        prefix_ids = None if prefixes is None else {i: self.tokenizer.encode(prefixes[i]) for i in sources}
        results: list[list[tuple[str, float]]] = [[("", 0.0)] for _ in sentences]
        progress_bar = None
        if progress:
            from tqdm import tqdm

            progress_bar = tqdm(total=len(sentences), unit="sent", file=sys.stderr, dynamic_ncols=True)
            progress_bar.update(len(sentences) - len(sources))
        try:
            for batch, src_tokens in self._batches(sources, batch_tokens):
                prefix = None if prefix_ids is None else [prefix_ids[i] for i in batch]
                seeds = [_sentence_seed(decode.seed, sentences[i]) for i in batch] if decode.sampling else None
                with torch.inference_mode():
                    search = strategy(decode, step=self.step, seeds=seeds)
                    hypotheses = generate(self.model, src_tokens, decode, search, prefix=prefix)
                for i, hyps in zip(batch, hypotheses):
                    texts = self.tokenizer.decode_batch([h.tokens for h in hyps])
                    results[i] = [(text, h.score) for text, h in zip(texts, hyps)]
                if progress_bar is not None:
                    progress_bar.update(len(batch))
        finally:  # closed before an error is printed, so that the error gets its own line
            if progress_bar is not None:
                progress_bar.close()
        if decode.nbest > 1 or return_scores:
            return results
        return [entries[0][0] for entries in results]

    def _encode_sources(self, sentences: list[str]) -> dict[int, list[int]]:
        """Index -> source pieces of each sentence that has any (an empty or whitespace-only line,
        or one that encodes to nothing, has none)."""
        nonempty = [i for i, s in enumerate(sentences) if s.strip()]
        encoded = self.tokenizer.encode_batch([sentences[i] for i in nonempty]) if nonempty else []
        return {i: self._encode_source(ids, i + 1) for i, ids in zip(nonempty, encoded) if ids}

    def _batches(self, sources: dict[int, list[int]], batch_tokens: int, extra: dict[int, int] | None = None):
        """(indices, src_tokens [B, S] on the device) of batches of at most `batch_tokens` padded
        pieces (at least one sentence each), longest first; `extra` adds each sentence's target
        length to the budget (forced decoding)."""
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
        pad_id = self.model.config.pad_id
        cost = {i: max(len(ids), (extra or {}).get(i, 0), 1) for i, ids in sources.items()}
        order = sorted(sources, key=lambda i: cost[i], reverse=True)
        start = 0
        while start < len(order):
            longest = cost[order[start]]  # sorted: the first is the longest
            size = max(1, min(len(order) - start, batch_tokens // longest))
            batch = order[start : start + size]
            width = max(len(sources[i]) for i in batch)
            src_tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, S]
            for row, i in enumerate(batch):
                src_tokens[row, : len(sources[i])] = torch.tensor(sources[i], dtype=torch.long)
            yield batch, src_tokens.to(self.device)
            start += size

    def score(self, sources: list[str], targets: list[str], *, batch_tokens: int = 4096) -> list[list[float] | None]:
        """Forced decoding: the log-probability of each target piece and of the final EOS given its
        source (`aiayn.decoding.search.score_tokens`), the numbers beam search adds up. Batching never
        changes a score (beyond float rounding). A pair with an empty source gives None.

        Raises:
            ValueError: different numbers of sources and targets, text that is not valid Unicode,
                or a target longer than max_positions - 1 pieces (named by line).
        """
        if len(sources) != len(targets):
            raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
        _check_sentences(sources)
        _check_sentences(targets)
        encoded = self._encode_sources(sources)
        target_ids = {i: self.tokenizer.encode(targets[i]) for i in encoded}
        limit = self.model.config.max_positions - 1
        for i, ids in target_ids.items():
            if len(ids) > limit:
                raise ValueError(f"line {i + 1}: the target has {len(ids)} pieces; at most {limit} fit the model")
        results: list[list[float] | None] = [None for _ in sources]
        lengths = {i: len(ids) + 1 for i, ids in target_ids.items()}
        for batch, src_tokens in self._batches(encoded, batch_tokens, lengths):
            with torch.inference_mode():
                scores = score_tokens(self.model, src_tokens, [target_ids[i] for i in batch])
            for i, values in zip(batch, scores):
                results[i] = values
        return results

    def alignment_layer(self, layer: int | None = None) -> int:
        """The decoder layer `align` reads: `layer`, or the penultimate (or only) one. Raises
        ValueError for a layer out of range (callers check it before translating)."""
        layers = self.model.config.n_decoder_layers
        layer = max(layers - 2, 0) if layer is None else layer
        if not -layers <= layer < layers:
            raise ValueError(f"alignment layer {layer} out of range: the model has {layers} decoder layers")
        return layer

    def align(self, sources: list[str], translations: list[str], *, layer: int | None = None,
              batch_tokens: int = 4096) -> list[str]:
        """Word alignments (Pharaoh "i-j", `aiayn.decoding.alignment`) of each source with its translation,
        from the cross-attention of decoder `layer` (default the penultimate, or the only one)
        averaged over heads. An empty source or translation gives "".

        Raises:
            ValueError: different numbers of sources and translations, or a layer out of range.
        """
        from aiayn.decoding.alignment import pharaoh, word_alignment

        if len(sources) != len(translations):
            raise ValueError(f"{len(sources)} sources but {len(translations)} translations")
        layer = self.alignment_layer(layer)
        encoded = self._encode_sources(sources)
        limit = self.model.config.max_positions - 1
        target_ids = {i: self.tokenizer.encode(translations[i])[:limit] for i in encoded if translations[i].strip()}
        encoded = {i: ids for i, ids in encoded.items() if target_ids.get(i)}
        results = ["" for _ in sources]
        config = self.model.config
        for batch, src_tokens in self._batches(encoded, batch_tokens, {i: len(t) + 1 for i, t in target_ids.items()}):
            width = max(len(target_ids[i]) for i in batch) + 1
            tgt_input = torch.full((len(batch), width), config.pad_id, dtype=torch.long)  # [B, T]
            for row, i in enumerate(batch):
                tgt_input[row, : len(target_ids[i]) + 1] = torch.tensor([config.bos_id, *target_ids[i]])
            with torch.inference_mode():
                decoded = self.model.decode(tgt_input.to(self.device), self.model.encode(src_tokens),
                                            need_weights=True, project=False)
            cross = decoded.cross_attention[layer].float().mean(dim=1).cpu()  # [B, T, S]
            for row, i in enumerate(batch):
                source, target = encoded[i], target_ids[i]
                weights = cross[row, : len(target), : len(source)]  # row t predicts target piece t
                pairs = word_alignment(weights, self.tokenizer.pieces(source), self.tokenizer.pieces(target))
                results[i] = pharaoh(pairs)
        return results

    def attention(self, source: str, target: str | None = None) -> AttentionResult:
        """Every attention map of one sentence pair, from the reference attention (need_weights).

        With target=None the source is first translated (`DecodeConfig()`: beam 4, length penalty 0.6) and the
        weights are those of the model's own output. Teacher forcing: one decoder pass over
        "<s>" + target, so row t of decoder / cross attention is the query that predicts
        target_tokens[t].

        Raises:
            ValueError: empty source.
        """
        if not source.strip():
            raise ValueError("attention needs a non-empty source sentence")
        config = self.model.config
        src_ids = self._encode_source(self.tokenizer.encode(source), 1)
        src_tokens = torch.tensor([src_ids], dtype=torch.long, device=self.device)  # [1, S]
        with torch.inference_mode():
            if target is None:
                decode = DecodeConfig()
                best = generate(self.model, src_tokens, decode, strategy(decode, step=self.step))[0][0]
                tgt_ids = best.tokens
            else:
                tgt_ids = self.tokenizer.encode(target)[: config.max_positions - 1]
            encoder_out = self.model.encode(src_tokens, need_weights=True)
            tgt_input = torch.tensor([[config.bos_id] + tgt_ids], dtype=torch.long, device=self.device)  # [1, T]
            decoder_out = self.model.decode(tgt_input, encoder_out, need_weights=True, project=False)

        def stack(weights: list[Tensor]) -> Tensor:
            return torch.stack([w[0] for w in weights]).float().cpu()  # L x [H, Q, K] -> [L, H, Q, K]

        return AttentionResult(
            source_tokens=self.tokenizer.pieces(src_ids),
            target_input_tokens=self.tokenizer.pieces([config.bos_id] + tgt_ids),
            target_tokens=self.tokenizer.pieces(tgt_ids + [config.eos_id]),
            encoder_self=stack(encoder_out.self_attention),
            decoder_self=stack(decoder_out.self_attention),
            cross=stack(decoder_out.cross_attention),
            translation=self.tokenizer.decode(tgt_ids),
            source_ids=list(src_ids),
            target_ids=list(tgt_ids),
        )


__all__ = ["AttentionResult", "Translator"]
