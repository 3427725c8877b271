"""Paragraphs with and without `--split-sentences`: test_2016_flickr and its joins of 2, 3 and 4
consecutive sentences (the positional study's concat sets: sources joined by a space, references
likewise), each translated whole and sentence by sentence; sacreBLEU (cased, 13a) and the length
ratio against the joined references.

    python -m benchmarks.paragraphs --model runs/demo
    python -m benchmarks.paragraphs --model runs/demo --beam 4 --json paragraphs.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

MULTI30K = Path(os.environ.get("AIAYN_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k")


def read_gz(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle]


def joined_sets(sources: list[str], references: list[str]) -> dict[str, tuple[list[str], list[str]]]:
    sets = {"test2016": (sources, references)}
    for k in (2, 3, 4):
        groups = range(0, len(sources) - k + 1, k)
        sets[f"concat{k}"] = ([" ".join(sources[g: g + k]) for g in groups],
                              [" ".join(references[g: g + k]) for g in groups])
    return sets


def main(argv: list[str] | None = None) -> int:
    import sacrebleu

    from aiayn.config import DecodeConfig
    from aiayn.decoding.sentences import join_translations, split_lines
    from aiayn.decoding.translator import Translator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--data-dir", type=Path, default=MULTI30K)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    translator = Translator.load(args.model, precision="auto")
    src_lang, tgt_lang = translator.info.get("src_lang", "de"), translator.info.get("tgt_lang", "en")
    sources = read_gz(args.data_dir / f"test_2016_flickr.{src_lang}.gz")
    references = read_gz(args.data_dir / f"test_2016_flickr.{tgt_lang}.gz")
    decode = DecodeConfig(beam_size=args.beam)
    rows = []
    for name, (src, ref) in joined_sets(sources, references).items():
        for split in (False, True):
            started = time.perf_counter()
            if split:
                pieces = split_lines(src, src_lang)
                per_sentence = translator.translate(pieces.sentences, decode, return_scores=True)
                hyp = [entries[0][0] for entries in join_translations(pieces, per_sentence)]
                sentences = len(pieces.sentences)
            else:
                hyp, sentences = translator.translate(src, decode), len(src)
            bleu = sacrebleu.corpus_bleu(hyp, [ref])
            rows.append({"set": name, "split": split, "lines": len(src), "sentences_translated": sentences,
                         "bleu": round(bleu.score, 2), "length_ratio": round(bleu.sys_len / bleu.ref_len, 3),
                         "seconds": round(time.perf_counter() - started, 1)})
            print(rows[-1], file=sys.stderr, flush=True)
    print(f"model {args.model}, beam {args.beam}, sacreBLEU {sacrebleu.__version__} (cased, 13a)\n")
    print("| set | lines | without splitting: BLEU | length ratio | with --split-sentences: BLEU | length ratio "
          "| sentences translated |\n|---|---:|---:|---:|---:|---:|---:|")
    for whole, split in zip(rows[::2], rows[1::2]):
        print(f"| {whole['set']} | {whole['lines']} | {whole['bleu']} | {whole['length_ratio']} | {split['bleu']} "
              f"| {split['length_ratio']} | {split['sentences_translated']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
