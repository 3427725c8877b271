"""How often the Marian and CTranslate2 exports give aiayn's output, through each library's user path.

Exports --model (a trained model directory) to HF Marian, CTranslate2 float32 and CTranslate2 int8
(`aiayn.export`), then translates test_2016_flickr (De->En by default) with

    aiayn        beam_search on Translator.load(model, precision="fp32"), token ids
    HF Marian    MarianTokenizer(add_special_tokens=False) + generate (or, "with </s>", the
                 tokenizer's default, which appends </s> to every source)
    CTranslate2  translate_batch on SentencePiece pieces (with </s>: the pieces + "</s>")

and counts the sentences whose outputs are the same pieces, for greedy search, beam 4 with aiayn's
default GNMT alpha = 0.6 against the exports' nearest length penalty (`marian_length_penalty`,
`ctranslate2_length_penalty`), and beam 4 without length penalty (alpha = 0: beta = 0 for HF, the
one penalty both forms share; 1e-6 for CTranslate2, whose 0 also changes its stopping rule).
Each library gets aiayn's maximum length (S + 50 pieces) by translating the sentences of one
source length per call (one maximum per call is all either library takes).
For every disagreement it scores both outputs under the aiayn model (teacher forcing, aiayn's
length penalty) to tell near-ties from real differences. Then BLEU: CTranslate2 int8 against
aiayn's int8 (`Translator.load(model, precision="int8")`), both beam 4 with the default penalty,
and the float32 ones beside them.

    python -m benchmarks.export_agreement --model runs/demo
    python -m benchmarks.export_agreement --model runs/demo --sentences 200 --json agreement.json

Threads: one for torch and one for CTranslate2 (the machine may be shared; times are not the point).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from aiayn.config import DecodeConfig
from aiayn.files.data import read_lines
from aiayn.evaluate import bleu
from aiayn.export import ctranslate2_length_penalty, export, marian_length_penalty
from aiayn.decoding.search import beam_search, length_penalty
from aiayn.decoding.translator import Translator
from benchmarks.machine import describe

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = Path(os.environ.get("AIAYN_DATA") or ROOT.parent / "shared" / "data" / "multi30k")
SEARCHES = {  # name: (beam size, aiayn's alpha); the exports get the nearest beta
    "greedy": (1, 0.0),
    "beam4": (4, DecodeConfig().length_penalty),
    "beam4-no-penalty": (4, 0.0),
}


def padded(rows: list[list[int]], pad_id: int = 0) -> torch.Tensor:
    batch = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)  # [B, S]
    for i, row in enumerate(rows):
        batch[i, : len(row)] = torch.tensor(row)
    return batch


def by_length(sources: list[list[int]]) -> dict[int, list[int]]:
    """Sentence indices grouped by source length: one maximum output length per group."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, row in enumerate(sources):
        groups[len(row)].append(i)
    return groups


def aiayn_outputs(translator: Translator, sources: list[list[int]], beam: int, alpha: float) -> list[list[int]]:
    """aiayn's best pieces per source: the search `Translator.translate` runs, in batches of 64."""
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    outputs: list[list[int]] = [[] for _ in sources]
    for start in range(0, len(order), 64):
        rows = order[start:start + 64]
        with torch.inference_mode():
            hypotheses = beam_search(translator.model, padded([sources[i] for i in rows]), beam_size=beam,
                                     length_penalty=alpha, step=translator.step)
        for i, hyps in zip(rows, hypotheses):
            outputs[i] = hyps[0].tokens
    return outputs


def marian_outputs(model, hf_tokenizer, texts: list[str], sources: list[list[int]], beam: int, beta: float,
                   with_eos: bool) -> list[list[int]]:
    """generate on MarianTokenizer's ids (no </s> unless `with_eos`), one source length per call."""
    outputs: list[list[int]] = [[] for _ in sources]
    special = {model.config.eos_token_id, model.config.pad_token_id}
    for length, rows in by_length(sources).items():
        inputs = hf_tokenizer([texts[i] for i in rows], add_special_tokens=with_eos, padding=True,
                              return_tensors="pt")
        with torch.inference_mode():
            generated = model.generate(**inputs, num_beams=beam, length_penalty=beta,
                                       max_length=length + 52)  # start + S + 50 pieces + EOS
        for i, row in zip(rows, generated.tolist()):
            outputs[i] = [token for token in row[1:] if token not in special]
    return outputs


def ctranslate2_outputs(translator, pieces: list[list[str]], vocabulary: dict[str, int], beam: int, beta: float,
                        with_eos: bool) -> list[list[int]]:
    """translate_batch on SentencePiece pieces (+ "</s>" if `with_eos`), one source length per call."""
    outputs: list[list[int]] = [[] for _ in pieces]
    for length, rows in by_length(pieces).items():
        batch = [pieces[i] + (["</s>"] if with_eos else []) for i in rows]
        results = translator.translate_batch(batch, beam_size=beam, length_penalty=beta,
                                             max_decoding_length=length + 50,
                                             suppress_sequences=[["<pad>"], ["<s>"]])
        for i, result in zip(rows, results):
            outputs[i] = [vocabulary[piece] for piece in result.hypotheses[0]]
    return outputs


def aiayn_score(translator: Translator, source: list[int], output: list[int], alpha: float) -> float:
    """aiayn's search score of `output` (log-prob with EOS, <pad> / <s> masked, / GNMT penalty)."""
    config = translator.model.config
    with torch.inference_mode():
        logits = translator.model(torch.tensor([source]), torch.tensor([[config.bos_id] + output]))[0]  # [T, V]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor(output + [config.eos_id])
    total = float(log_probs[torch.arange(len(targets)), targets].sum())
    return total / length_penalty(len(targets), alpha)


def compare(name: str, translator: Translator, sources, expected, got, alpha: float) -> dict:
    """Share of equal outputs; for each other one, aiayn's score of its output minus aiayn's score of
    the library's (a small gap is a near-tie decided by rounding; a large one a real difference)."""
    different = [i for i, (a, b) in enumerate(zip(expected, got)) if a != b]
    gaps = sorted(aiayn_score(translator, sources[i], expected[i], alpha)
                  - aiayn_score(translator, sources[i], got[i], alpha) for i in different)
    result = {"equal": len(expected) - len(different), "total": len(expected),
              "share": (len(expected) - len(different)) / len(expected),
              "score_gaps": [round(gap, 6) for gap in gaps]}
    near = sum(abs(gap) < 1e-3 for gap in gaps)
    print(f"  {name:<44} {result['share']:7.2%}  ({result['equal']}/{result['total']}; "
          f"{len(different)} differ, {near} within 1e-3 of aiayn's score)", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a trained model directory")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA), help="Multi30k directory (test_2016_flickr.*.gz)")
    parser.add_argument("--src", default="de")
    parser.add_argument("--tgt", default="en")
    parser.add_argument("--sentences", type=int, help="only the first N sentences")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    import ctranslate2
    import transformers
    from transformers import MarianMTModel, MarianTokenizer

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    data = Path(args.data_dir)
    texts = read_lines(data / f"test_2016_flickr.{args.src}.gz")[: args.sentences]
    references = read_lines(data / f"test_2016_flickr.{args.tgt}.gz")[: args.sentences]
    report: dict = {"machine": describe(1), "model": args.model, "sentences": len(texts), "agreement": {}}
    translator = Translator.load(args.model, precision="fp32")
    tokenizer = translator.tokenizer
    sources = tokenizer.encode_batch(texts)
    pieces = [tokenizer.pieces(row) for row in sources]
    vocabulary = {piece: i for i, piece in enumerate(tokenizer.pieces(range(tokenizer.vocab_size)))}

    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        marian_dir = export(args.model, "marian", Path(scratch) / "marian")
        ct2_dir = export(args.model, "ctranslate2", Path(scratch) / "ct2")
        ct2_int8_dir = export(args.model, "ctranslate2", Path(scratch) / "ct2-int8", quantization="int8")
        report["export_seconds"] = round(time.perf_counter() - started, 1)
        hf_model = MarianMTModel.from_pretrained(marian_dir).eval()
        hf_tokenizer = MarianTokenizer.from_pretrained(marian_dir)
        ct2 = ctranslate2.Translator(str(ct2_dir), device="cpu", intra_threads=1)
        ct2_int8 = ctranslate2.Translator(str(ct2_int8_dir), device="cpu", compute_type="int8", intra_threads=1)

        expected_text = {}
        for search, (beam, alpha) in SEARCHES.items():
            print(f"{search}: beam {beam}, aiayn alpha {alpha}, HF beta {marian_length_penalty(alpha):.3g}, "
                  f"CTranslate2 beta {ctranslate2_length_penalty(alpha):.3g}", flush=True)
            expected = aiayn_outputs(translator, sources, beam, alpha)
            expected_text[search] = tokenizer.decode_batch(expected)
            # The libraries' defaults put </s> on every source: measured for greedy and beam 4.
            for with_eos in (False, True) if search != "beam4-no-penalty" else (False,):
                for library in ("marian", "ctranslate2"):
                    started = time.perf_counter()
                    if library == "marian":
                        got = marian_outputs(hf_model, hf_tokenizer, texts, sources, beam,
                                             marian_length_penalty(alpha), with_eos)
                    else:
                        got = ctranslate2_outputs(ct2, pieces, vocabulary, beam, ctranslate2_length_penalty(alpha),
                                                  with_eos)
                    name = library + (", with </s>" if with_eos else "")
                    entry = compare(name, translator, sources, expected, got, alpha)
                    entry["seconds"] = round(time.perf_counter() - started, 1)
                    report["agreement"][f"{search} / {name}"] = entry

        print("BLEU (beam 4, aiayn alpha 0.6 / the exports' nearest beta), sacreBLEU on detokenized text:")
        int8 = Translator.load(args.model, precision="int8")
        aiayn_int8 = int8.translate(texts)
        ct2_int8_out = ctranslate2_outputs(ct2_int8, pieces, vocabulary, 4,
                                           ctranslate2_length_penalty(DecodeConfig().length_penalty), with_eos=False)
        ct2_fp32_out = ctranslate2_outputs(ct2, pieces, vocabulary, 4,
                                           ctranslate2_length_penalty(DecodeConfig().length_penalty), with_eos=False)
        marian_out = marian_outputs(hf_model, hf_tokenizer, texts, sources, 4,
                                    marian_length_penalty(DecodeConfig().length_penalty), with_eos=False)
        systems = {
            "aiayn fp32": expected_text["beam4"],
            "aiayn int8": aiayn_int8,
            "ctranslate2 float32": tokenizer.decode_batch(ct2_fp32_out),
            "ctranslate2 int8": tokenizer.decode_batch(ct2_int8_out),
            "marian (generate) fp32": tokenizer.decode_batch(marian_out),
        }
        report["bleu"] = {name: round(bleu(hyps, references), 2) for name, hyps in systems.items()}
        for name, value in report["bleu"].items():
            print(f"  {name:<24} {value:6.2f}")
        same = sum(a == b for a, b in zip(aiayn_int8, systems["ctranslate2 int8"]))
        report["int8_same_text"] = same / len(texts)
        print(f"  ctranslate2 int8 and aiayn int8 give the same text for {same / len(texts):.1%} of the sentences")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
