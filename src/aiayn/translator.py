"""Translating text with a trained model: batching, precision, alignment of input and output lines.

`Translator.translate` is what the CLI, the evaluation and the web server call; `Translator.attention`
returns every attention map of one sentence pair for plotting (`aiayn.visualize`).

Shape legend: L layers, H heads, S source pieces, T target pieces + 1 (BOS / EOS).
"""

from __future__ import annotations

import copy
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from aiayn import hardware
from aiayn.allocator import retain_freed_memory
from aiayn.search import beam_search

PRECISIONS = ("fp32", "bf16", "int8")  # what a model is cast to; "auto" resolves to one of them


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


def _check_precision(precision: str, device: str | torch.device) -> torch.device:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "int8" and device.type != "cpu":
        raise ValueError(f"precision int8 runs on the CPU only, got device {device}")
    return device


def decoding_timings(model, device: str | torch.device, precisions=("fp32", "bf16"), *, rows: int = 32,
                     source_len: int = 16, steps: int = 8) -> dict[str, float]:
    """Seconds per precision for an encoder pass and `steps` cached decoder steps of `rows`
    sentences, each on its own inference copy of `model` (left untouched): what
    `--precision auto` weighs. Random source tokens; the work does not depend on their values."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    src_tokens = torch.randint(4, model.config.vocab_size, (rows, source_len), generator=generator).to(device)
    tokens = torch.full((rows, 1), model.config.bos_id, dtype=torch.long, device=device)  # [B, 1]

    def run(candidate) -> None:
        with torch.inference_mode():
            encoder_out = candidate.encode(src_tokens)
            cache = candidate.new_cache()
            for _ in range(steps):
                candidate.decode(tokens, encoder_out, cache=cache)

    runs = {}
    for precision in precisions:
        candidate = cast_for_inference(copy.deepcopy(model).eval(), precision, device)
        runs[precision] = lambda candidate=candidate: run(candidate)
        runs[precision]()  # warm-up: first-call allocations and kernel selection
    return hardware.time_each(runs)


def cast_for_inference(model, precision: str, device: str | torch.device = "cpu", *, compile: bool = False):
    """The model in `precision` on `device`, converted in place and returned.

    fp32: as trained. bf16 casts every weight once (faster than torch.autocast, which re-casts the
    weights at every call); the positional table stays float32 (sin / cos of far positions would
    lose digits), and the search computes log-softmax and scores in float32. int8 (CPU only): every
    linear layer in int8 arithmetic with per-row scales (`aiayn.quantize`), the rest float32.
    On the CPU, fp32 and bf16 linear layers are pre-packed for oneDNN (`aiayn.prepack`: the same
    arithmetic, 1.1-2.6x faster matrix products at decoding sizes). The model serves inference
    only afterwards.

    compile=True runs the encoder and the decoder step through `torch.compile` (`compile_model`)
    instead of pre-packing: the first calls take seconds to minutes while kernels are generated.
    On the CPU this also calls `aiayn.allocator.retain_freed_memory` (no page faults between steps).
    Raises:
        ValueError: unknown precision, or int8 on a device other than the CPU.
    """
    device = _check_precision(precision, device)
    if device.type == "cpu":
        retain_freed_memory()
    if precision == "int8":
        from aiayn.quantize import quantize_int8

        model = quantize_int8(model.float().cpu())
    else:
        if precision == "bf16":
            model.to(torch.bfloat16)
            model.positions.float()
        model = model.to(device)
    if compile and device.type == "cpu" and hardware.detect().cpp_compiler is None:
        warnings.warn("--compile needs a C++ compiler on the CPU (g++ or clang++, or set CXX); none was found, "
                      "so the model runs eagerly", RuntimeWarning, stacklevel=2)
        compile = False
    if compile:
        return compile_model(model, freeze=precision != "int8")
    if device.type == "cpu" and precision != "int8":
        from aiayn import prepack

        # oneDNN packs bf16 weights only where its bf16 kernels run (it raises elsewhere).
        if prepack.available() and (precision == "fp32" or hardware.detect().onednn_bf16):
            prepack.pack_linear_layers(model)
    return model


# Float models compiled on the CPU autotune their linear layers (see `compile_model`). The tests
# turn it off: it multiplies compile time, and the kernels it picks are inductor's own.
CPU_AUTOTUNE = True


def compile_model(model, *, freeze: bool):
    """Route `model.encode` and `model.decode` through `torch.compile`, in place; returns the model.

    Inductor fuses what eager mode runs as separate small ops (int8 quantise / rescale, residual
    adds, LayerNorm, softmax) and calls a decoder step as one graph, so the per-op overhead of
    incremental decoding mostly goes. Shapes are dynamic (batch, cache and source lengths change
    at every step).

    freeze: treat the weights as constants (inductor then pre-packs float linear layers for
    oneDNN itself). For float models only: with int8 layers (`aiayn.quantize`) freezing makes
    this PyTorch's compiled step produce no usable scores, so it raises ValueError.

    Float models on the CPU also compile with `max_autotune` (`CPU_AUTOTUNE`): each linear layer's
    shape is timed with inductor's C++ GEMM template against ATen's kernel, and the faster one is
    kept. That adds a few minutes to the first calls. At a few rows per step the template streams
    the weights far faster than MKL's matrix-vector product, with AVX-512 and with AVX2 kernels
    alike (benchmarks/RESULTS.md). Int8 layers call `torch._int_mm` directly: nothing to tune.

    Dynamo traces without duck shaping: by default it gives dimensions that happen to be equal
    the same symbol. At beam 4 and one sentence, the decoder's 4 rows then share the symbol of the
    4 heads, and the step is specialised to 4 rows; a float32 linear layer of fixed row count
    goes to MKL's packed sgemm, which at 4 rows is about 2x slower than oneDNN (fp32, beam 4,
    batch 1, same process: 243 -> 333 tokens/s; int8 and bf16 unchanged).
    """
    from aiayn.quantize import Int8Linear

    if freeze and any(isinstance(module, Int8Linear) for module in model.modules()):
        raise ValueError("compile_model: freeze=True with int8 layers gives unusable scores in this PyTorch; "
                         "compile int8 models with freeze=False")
    # Dynamo keeps at most `recompile_limit` graphs per code object, shared by every compiled
    # model (all run Transformer.decode), then falls back to eager. One model needs about 8 (first
    # step / cache length 1 / longer; one row / more rows; with / without weights).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    autotune = CPU_AUTOTUNE and freeze and next(model.parameters()).device.type == "cpu"
    options = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"} if autotune else None
    for name in ("encode", "decode"):
        compiled = torch.compile(getattr(model, name), dynamic=True, options=options)
        setattr(model, name, _traced_with_settings(compiled, freeze=freeze))
    return model


def _traced_with_settings(compiled, *, freeze: bool):
    """`compiled`, called with duck shaping off (and inductor freezing on, if `freeze`)."""
    import torch._inductor.config as inductor
    import torch.fx.experimental._config as shapes

    def call(*args, **kwargs):
        # Both are read while dynamo traces and inductor compiles: at the first calls and at
        # recompiles, which can come at any call. `torch.compile(options=...)` leaves the linear
        # layers unpacked in this PyTorch; setting the config freezes them. Set and restored by
        # hand: `config.patch` costs 16 us per decoder step, this 4 us per setting.
        saved_freezing, saved_duck = inductor.freezing, shapes.use_duck_shape
        if freeze:
            inductor.freezing = True
        shapes.use_duck_shape = False
        try:
            return compiled(*args, **kwargs)
        finally:
            inductor.freezing, shapes.use_duck_shape = saved_freezing, saved_duck

    return call


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
            "int8" (CPU only): linear layers in int8 arithmetic (see `cast_for_inference`).
            "auto": bf16 where it is native on `device` and measured faster on this model
            (`decoding_timings`), else fp32 (`aiayn.hardware.choose_precision`). What it resolved
            to, and why, is `precision_choice`; an explicit bf16 where it is not native warns.
        compile: run the encoder and decoder step through `torch.compile` (`compile_model`); the first
            translations are slow while it compiles.
        info: the model directory's info dict (e.g. "src_lang", "tgt_lang").
    Raises:
        ValueError: unknown precision, or int8 off the CPU.
    """

    def __init__(self, model, tokenizer, *, device: str | torch.device = "cpu", precision: str = "fp32",
                 compile: bool = False, info: dict[str, Any] | None = None, _owned: bool = False) -> None:
        self.device = torch.device(device)
        self.num_parameters = sum(p.numel() for p in model.parameters())  # before packing / int8
        self.precision_choice = hardware.choose_precision(
            precision, self.device, timings=lambda: decoding_timings(model, self.device))
        if self.precision_choice.warning:
            warnings.warn(self.precision_choice.message, RuntimeWarning, stacklevel=2)
        self.precision = self.precision_choice.precision
        # The conversion replaces layers and casts weights in place: on a copy, so that the
        # caller's model stays as it was (same modules, trainable, a complete state dict).
        model = model if _owned else copy.deepcopy(model)
        self.model = cast_for_inference(model.eval(), self.precision, self.device, compile=compile)
        self.tokenizer = tokenizer
        self.info = dict(info or {})

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        compile: bool = False,
    ) -> Translator:
        """A Translator for a model directory written by `aiayn.train.save_model`."""
        from aiayn.train import load_model

        if precision != "auto":  # before loading: no model moved to a device it cannot use
            _check_precision(precision, device)
        model, tokenizer, info = load_model(model_dir, device)
        return cls(model, tokenizer, device=device, precision=precision, compile=compile, info=info, _owned=True)

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
        *,
        beam_size: int = 4,
        length_penalty: float = 0.6,
        max_len_a: float = 1.0,
        max_len_b: int = 50,
        batch_tokens: int = 4096,
        nbest: int = 1,
        return_scores: bool = False,
        progress: bool = False,
    ) -> list[str] | list[list[tuple[str, float]]]:
        """Translate `sentences`; output i belongs to input i.

        Sentences are sorted by length and grouped into batches of at most `batch_tokens` padded
        source pieces (at least one sentence each), then put back in input order. An empty or
        whitespace-only line gives "" (score 0.0). A source longer than max_positions pieces is
        truncated with a warning naming its line number (1-based); outputs are capped at
        max_positions - 1 pieces by the search.

        Returns:
            list[str] (best translations), or with nbest > 1 or return_scores, for each input a
            list of (translation, length-normalised log-prob score), best first (one ("", 0.0)
            entry for an empty line).
        Raises:
            ValueError: bad beam_size / nbest / length_penalty / batch_tokens.
        """
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
        if not 1 <= nbest <= beam_size:
            raise ValueError(f"nbest must be in [1, beam_size={beam_size}], got {nbest}")
        pad_id = self.model.config.pad_id
        nonempty = [i for i, s in enumerate(sentences) if s.strip()]
        encoded = self.tokenizer.encode_batch([sentences[i] for i in nonempty]) if nonempty else []
        # A line that encodes to no pieces at all is treated like an empty line.
        sources = {i: self._encode_source(ids, i + 1) for i, ids in zip(nonempty, encoded) if ids}
        results: list[list[tuple[str, float]]] = [[("", 0.0)] for _ in sentences]
        order = sorted(sources, key=lambda i: len(sources[i]), reverse=True)
        progress_bar = None
        if progress:
            from tqdm import tqdm

            progress_bar = tqdm(total=len(sentences), unit="sent", file=sys.stderr, dynamic_ncols=True)
            progress_bar.update(len(sentences) - len(order))
        start = 0
        while start < len(order):
            longest = max(len(sources[order[start]]), 1)  # sorted: the first is the longest
            size = max(1, min(len(order) - start, batch_tokens // longest))
            batch = order[start : start + size]
            src_tokens = torch.full((len(batch), longest), pad_id, dtype=torch.long)  # [B, S]
            for row, i in enumerate(batch):
                src_tokens[row, : len(sources[i])] = torch.tensor(sources[i], dtype=torch.long)
            with torch.inference_mode():
                hypotheses = beam_search(
                    self.model, src_tokens.to(self.device), beam_size=beam_size, length_penalty=length_penalty,
                    max_len_a=max_len_a, max_len_b=max_len_b, nbest=nbest,
                )
            for i, hyps in zip(batch, hypotheses):
                texts = self.tokenizer.decode_batch([h.tokens for h in hyps])
                results[i] = [(text, h.score) for text, h in zip(texts, hyps)]
            if progress_bar is not None:
                progress_bar.update(len(batch))
            start += size
        if progress_bar is not None:
            progress_bar.close()
        if nbest > 1 or return_scores:
            return results
        return [entries[0][0] for entries in results]

    def attention(self, source: str, target: str | None = None) -> AttentionResult:
        """Every attention map of one sentence pair, from the reference attention (need_weights).

        With target=None the source is first translated (beam 4, length penalty 0.6) and the
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
                tgt_ids = beam_search(self.model, src_tokens, beam_size=4, length_penalty=0.6)[0][0].tokens
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
        )


__all__ = ["PRECISIONS", "AttentionResult", "Translator", "cast_for_inference", "compile_model"]
