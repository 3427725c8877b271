"""Measure the data pipeline on Multi30k: round trip, padding, throughput.

    python benchmarks/data_pipeline.py --data-dir ../shared/data/multi30k

Prints a table and one JSON line (prefix `RESULT `). Numbers:
- round_trip[lang]: fraction of train sentences with decode(encode(s)) == s, per language,
  using the joint tokenizer trained for that language's pair (de-en for en / de, fr-cs else);
- padding[max_tokens]: padding tokens / all tokens of src_tokens + tgt_output over one epoch;
- read_tokenize_pairs_per_s: read_parallel + encode_parallel on train de-en;
- collate_batches_per_s: building every Batch of an epoch from the tokenized corpus.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from aiayn.files.data import BatchIterator, encode_parallel, multi30k_paths, read_parallel
from aiayn.files.tokenizer import Tokenizer


def round_trip(tokenizer: Tokenizer, sentences: list[str]) -> tuple[float, list[str]]:
    decoded = tokenizer.decode_batch(tokenizer.encode_batch(sentences))
    mismatches = [s for s, d in zip(sentences, decoded) if s != d]
    return 1 - len(mismatches) / len(sentences), mismatches[:3]


def padding_fraction(iterator: BatchIterator) -> tuple[float, int]:
    pad = total = count = 0
    for batch in iterator:
        for tensor in (batch.src_tokens, batch.tgt_output):
            total += tensor.numel()
        pad += batch.src_tokens.numel() - batch.num_src_tokens
        pad += batch.tgt_output.numel() - batch.num_tgt_tokens
        count += 1
    return pad / total, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[8192, 25000])
    args = parser.parse_args()

    result: dict = {"vocab_size": args.vocab_size, "round_trip": {}, "padding": {}}
    texts = {}
    for pair in (("de", "en"), ("fr", "cs")):
        src_path, tgt_path = multi30k_paths(*pair, "train", data_dir=args.data_dir)
        start = time.perf_counter()
        text = read_parallel(src_path, tgt_path)
        read_s = time.perf_counter() - start
        start = time.perf_counter()
        tokenizer = Tokenizer.train(text.src + text.tgt, args.vocab_size)
        train_s = time.perf_counter() - start
        for lang, sentences in zip(pair, (text.src, text.tgt)):
            fraction, examples = round_trip(tokenizer, sentences)
            result["round_trip"][lang] = fraction
            if examples:
                result.setdefault("round_trip_mismatches", {})[lang] = examples
        # Held-out splits: characters absent from train become <unk> ("⁇" when decoded).
        for split in ("val", "test_2016_flickr"):
            held_out = read_parallel(*multi30k_paths(*pair, split, data_dir=args.data_dir))
            for lang, sentences in zip(pair, (held_out.src, held_out.tgt)):
                fraction, examples = round_trip(tokenizer, sentences)
                result.setdefault(f"round_trip_{split}", {})[lang] = fraction
                if examples:
                    result.setdefault("round_trip_mismatches", {})[f"{split}.{lang}"] = examples
        texts[pair] = (text, tokenizer, read_s, train_s)

    text, tokenizer, read_s, train_s = texts[("de", "en")]
    start = time.perf_counter()
    src_path, tgt_path = multi30k_paths("de", "en", "train", data_dir=args.data_dir)
    text = read_parallel(src_path, tgt_path)
    corpus = encode_parallel(tokenizer, text)
    pipeline_s = time.perf_counter() - start
    result["pairs"] = len(corpus)
    result["tokenizer_train_s"] = round(train_s, 2)
    result["read_tokenize_s"] = round(pipeline_s, 3)
    result["read_tokenize_pairs_per_s"] = round(len(corpus) / pipeline_s)

    for max_tokens in args.max_tokens:
        iterator = BatchIterator(corpus, max_tokens, shuffle=True, seed=1)
        start = time.perf_counter()
        fraction, count = padding_fraction(iterator)
        elapsed = time.perf_counter() - start
        result["padding"][str(max_tokens)] = {"fraction": round(fraction, 4), "batches": count}
        if max_tokens == args.max_tokens[0]:
            result["collate_batches_per_s"] = round(count / elapsed, 1)

    print(f"{'measure':<34}{'value':>12}")
    for key in ("round_trip", "round_trip_val", "round_trip_test_2016_flickr"):
        for lang, fraction in result[key].items():
            label = key.replace("round_trip", "round trip train").replace("train_", "")
            print(f"{label + ' ' + lang:<34}{fraction:>12.5f}")
    for max_tokens, entry in result["padding"].items():
        label = f"padding @{max_tokens} ({entry['batches']} batches)"
        print(f"{label:<34}{entry['fraction']:>12.4f}")
    print(f"{'read+tokenize pairs/s':<34}{result['read_tokenize_pairs_per_s']:>12}")
    print(f"{'collate batches/s':<34}{result['collate_batches_per_s']:>12}")
    print(f"{'tokenizer training s':<34}{result['tokenizer_train_s']:>12}")
    print("RESULT " + json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
