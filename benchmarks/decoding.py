"""Decoding speed: greedy and beam 4 on Multi30k test sources, aiayn vs HF generate vs CTranslate2.

All systems hold the *same weights*: a random (seeded) aiayn model of the `small` shape, copied
into a Hugging Face `MarianMTModel` (`benchmarks.peers.marian_from_aiayn`) and from there into a
CTranslate2 model. Each system runs fp32 and its faster CPU modes: aiayn bf16 and int8 (as
`Translator(precision=...)` converts them: fp32 and bf16 linear layers pre-packed for oneDNN,
`aiayn.inference.prepack`, bf16 weights cast once; int8 weights and per-row int8 activations in every
linear layer, `aiayn.inference.quantize`), HF Marian bf16 (`model.to(torch.bfloat16)`) and int8
(`torch.ao.quantization.quantize_dynamic` on its nn.Linear layers: fbgemm, one activation scale
per call), CTranslate2 int8 weights (its CPU build has no bf16). int8 runs on the CPU only. They
get the same batches of source ids (sentences sorted by length, `batch_size` per batch, one call
per batch and system, systems round-robin).

Lengths: an untrained model practically never emits EOS, so every hypothesis runs to the length
cap. The cap is one fixed number for every sentence, `round(mean reference length)` target
pieces (aiayn max_len_a=0, max_len_b=cap; HF max_new_tokens=cap + 1 with EOS forced at the end;
CTranslate2 max_decoding_length=cap + 1), so each system runs cap + 1 decoder steps per sentence,
the work a trained model would do on average. tokens/s counts output tokens without EOS, at most
`cap` per sentence (CTranslate2 ends without EOS and reports cap + 1 tokens).

Length penalty: aiayn uses GNMT's ((5 + |Y|) / 6) ** alpha (|Y| counts EOS), HF and CTranslate2
divide by |Y| ** alpha (HF: generated length; CTranslate2: output length). With all
hypotheses the same length the ranking is the same, so alpha = 0.6 is passed to all three.
Early stopping: aiayn finishes a sentence with `beam` finished hypotheses, HF
`early_stopping=True` the same; CTranslate2 stops when the best beam has finished (its default).
<pad> and <s> are never generated (HF `suppress_tokens`, CTranslate2 `suppress_sequences`).
"""

from __future__ import annotations

import copy
import tempfile
import time
import warnings
from typing import Callable

import torch

from aiayn import hardware
from aiayn.allocator import retain_freed_memory
from aiayn.config import ModelConfig
from aiayn.model.transformer import Transformer
from aiayn.decoding.search import beam_search, greedy_search
from aiayn.inference import beam_step_for, prepare

from benchmarks.peers import ct2_from_marian, marian_from_aiayn, vocabulary

LENGTH_PENALTY = 0.6


def _pad(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    longest = max(len(r) for r in rows)
    tokens = torch.full((len(rows), longest), pad_id, dtype=torch.long)  # [B, S]
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return tokens


def _aiayn(model: Transformer, beam: int, cap: int, device: torch.device) -> Callable:
    step = beam_step_for(device)  # as the Translator searches

    def translate(rows: list[list[int]]) -> list[list[int]]:
        src = _pad(rows, model.config.pad_id).to(device)
        with torch.inference_mode():
            if beam == 1:
                return greedy_search(model, src, max_len_a=0.0, max_len_b=cap)
            hyps = beam_search(model, src, beam_size=beam, length_penalty=LENGTH_PENALTY, max_len_a=0.0, max_len_b=cap,
                               step=step)
        return [h[0].tokens for h in hyps]

    return translate


def _hf(marian, config: ModelConfig, beam: int, cap: int, device: torch.device) -> Callable:
    def translate(rows: list[list[int]]) -> list[list[int]]:
        src = _pad(rows, config.pad_id).to(device)
        beam_options = {"early_stopping": True, "length_penalty": LENGTH_PENALTY} if beam > 1 else {}
        with torch.inference_mode():
            out = marian.generate(
                input_ids=src, attention_mask=(src != config.pad_id).long(), num_beams=beam, do_sample=False,
                max_new_tokens=cap + 1, **beam_options, forced_eos_token_id=config.eos_id,
                suppress_tokens=[config.pad_id, config.bos_id],
                decoder_start_token_id=config.bos_id, eos_token_id=config.eos_id, pad_token_id=config.pad_id,
                num_return_sequences=1,
            )
        results = []
        for row in out[:, 1:].tolist():  # drop the decoder start token
            results.append(row[: row.index(config.eos_id)] if config.eos_id in row else row)
        return results

    return translate


def _ct2(translator, vocab: list[str], beam: int, cap: int) -> Callable:
    index = {token: i for i, token in enumerate(vocab)}

    def translate(rows: list[list[int]]) -> list[list[int]]:
        source = [[vocab[i] for i in row] for row in rows]
        results = translator.translate_batch(
            source, beam_size=beam, length_penalty=LENGTH_PENALTY, max_decoding_length=cap + 1,
            suppress_sequences=[["<pad>"], ["<s>"]], max_input_length=0,
        )
        return [[index[t] for t in r.hypotheses[0]] for r in results]

    return translate


def run(
    sources,
    *,
    batch_sizes: list[int],
    beams: list[int],
    threads: int,
    device: torch.device,
    compile: bool = False,
    log: Callable[[str], None] = print,
    seed: int = 0,
) -> dict:
    """Tokens/s and sentences/s of every available system for each batch size and beam size.

    Large batches measure the matmuls; batch 1 (interactive use) measures the per-step overhead.
    compile=True adds aiayn fp32, bf16 and int8 (CPU) with encoder and decoder step through torch.compile
    (`Translator(compile=True)`); their compilation happens in the untimed warm-up, whose
    seconds are reported apart.

    All systems run in this one process, with the same allocator settings: glibc malloc keeps freed
    memory (`retain_freed_memory`, which aiayn's inference setup calls) for the peers too.
    """
    torch.manual_seed(seed)
    config = ModelConfig.preset("small")
    model = Transformer(config).to(device).eval()
    cap = round(sources.mean_reference_length)
    order = sorted(range(len(sources.ids)), key=lambda i: len(sources.ids[i]), reverse=True)
    notes = []
    if retain_freed_memory():
        notes.append("glibc malloc keeps freed memory (aiayn.allocator.retain_freed_memory) for every system")
    # bf16 only where it is native: elsewhere every bf16 system runs a reference GEMM, ~30x slower.
    bf16 = hardware.detect().native_bf16(device)
    if not bf16:
        notes.append("no native bf16 on this device: bf16 systems skipped")
    # What Translator(precision=...) runs: on the CPU, fp32 and bf16 linear layers pre-packed for oneDNN.
    # int8 only with VNNI: elsewhere `torch._int_mm` has no fast kernel (and Translator runs fp32).
    int8 = device.type == "cpu" and hardware.detect().cpu_vnni
    if device.type == "cpu" and not int8:
        notes.append("no VNNI on this CPU: aiayn int8 systems skipped")
    precisions = [p for p in ("fp32", "bf16", "int8") if (bf16 or p != "bf16") and (int8 or p != "int8")]
    systems: dict[str, Callable[[int], Callable]] = {}
    for precision in precisions:
        converted = prepare(model, precision=precision, device=device)
        systems[f"aiayn {precision}"] = lambda beam, m=converted: _aiayn(m, beam, cap, device)
    if compile:
        for precision in precisions:
            compiled = prepare(model, precision=precision, device=device, compile=True)
            systems[f"aiayn {precision}+compile"] = lambda beam, m=compiled: _aiayn(m, beam, cap, device)
    workdir = tempfile.TemporaryDirectory(prefix="aiayn-bench-")
    try:
        import transformers  # noqa: F401

        marian = marian_from_aiayn(model.cpu()).to(device).eval()
        systems["HF Marian fp32"] = lambda beam: _hf(marian, config, beam, cap, device)
        if bf16:
            marian_bf16 = copy.deepcopy(marian).to(torch.bfloat16)
            systems["HF Marian bf16"] = lambda beam: _hf(marian_bf16, config, beam, cap, device)
        if device.type == "cpu":
            with warnings.catch_warnings():  # torch marks its ao.quantization API deprecated
                warnings.simplefilter("ignore")
                marian_int8 = torch.ao.quantization.quantize_dynamic(
                    copy.deepcopy(marian), {torch.nn.Linear}, dtype=torch.qint8
                )
            systems["HF Marian int8"] = lambda beam: _hf(marian_int8, config, beam, cap, device)
    except ImportError:
        marian = None
        notes.append("transformers not installed: HF Marian and CTranslate2 columns skipped")
    if marian is not None:
        try:
            import ctranslate2

            vocab = vocabulary(config.vocab_size)
            for compute_type in ("float32", "int8"):
                path = ct2_from_marian(marian.cpu(), f"{workdir.name}/{compute_type}")
                translator = ctranslate2.Translator(
                    str(path), device=device.type, compute_type=compute_type, intra_threads=threads, inter_threads=1
                )
                label = "fp32" if compute_type == "float32" else compute_type
                systems[f"CTranslate2 {label}"] = (
                    lambda beam, translator=translator: _ct2(translator, vocab, beam, cap)
                )
            marian.to(device)
        except ImportError:
            notes.append("ctranslate2 not installed: CTranslate2 columns skipped")

    out = {
        "sources": sources.origin, "sentences": len(sources.ids), "batch_sizes": batch_sizes,
        "length_cap": cap, "length_penalty": LENGTH_PENALTY, "notes": notes, "modes": {},
    }
    for batch_size in batch_sizes:
        batches = [[sources.ids[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
        for beam in beams:
            mode = ("greedy" if beam == 1 else f"beam {beam}") + f", batch {batch_size}"
            translators = {name: make(beam) for name, make in systems.items()}
            seconds = dict.fromkeys(translators, 0.0)
            warmup = dict.fromkeys(translators, 0.0)
            outputs: dict[str, list[list[int]]] = {name: [] for name in translators}
            # Warm-up: first calls allocate, pick kernels, compile. The first and the last batch:
            # torch.compile specialises on size 1 (one sentence, one row at the first step).
            for name, translate in translators.items():
                start = time.perf_counter()
                translate(batches[0])
                translate(batches[-1])
                warmup[name] = time.perf_counter() - start
            for batch in batches:
                for name, translate in translators.items():
                    start = time.perf_counter()
                    result = translate(batch)
                    seconds[name] += time.perf_counter() - start
                    outputs[name].extend(result)
            reference = outputs["aiayn fp32"]
            rows = []
            for name in translators:
                tokens = sum(min(len(o), cap) for o in outputs[name])
                same = sum(o[:cap] == r[:cap] for o, r in zip(outputs[name], reference))
                rows.append({
                    "system": name, "precision": name.rsplit(" ", 1)[1], "seconds": round(seconds[name], 3),
                    "warmup_seconds": round(warmup[name], 3),
                    "tokens_per_s": round(tokens / seconds[name], 1),
                    "sentences_per_s": round(len(reference) / seconds[name], 2),
                    "output_tokens": tokens, "same_output_as_aiayn": round(same / len(reference), 4),
                })
            log(f"decoding {mode}: " + ", ".join(f"{r['system']} {r['tokens_per_s']:,.0f} tok/s" for r in rows))
            out["modes"][mode] = rows
    workdir.cleanup()
    return out
