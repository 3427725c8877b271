"""Checks of `aiayn score` and sampling on a trained model and all of test_2016_flickr.

1. Forced scoring against the search: each beam-4 hypothesis (4-best, length penalty 0, so that
   a hypothesis's score is its log-probability) is scored by `Translator.score`; prints the
   largest |score - beam log-prob| and how many hypotheses re-encode to other pieces (the search
   may produce a segmentation SentencePiece would not, and scoring re-encodes the text).
2. Batching: every score computed in batches of 4096 pieces and one sentence at a time.
3. Sampling: 3 samples per sentence (top-k 10, seed 1) in one batch run, and in reverse order
   one sentence per batch; counts the sentences whose samples differ.

    python benchmarks/practitioner_checks.py --model runs/demo [--limit 1000]
"""

import argparse
import os
import time
from pathlib import Path

MULTI30K = Path(os.environ.get("AIAYN_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k")


def main() -> None:
    from aiayn.config import DecodeConfig
    from aiayn.files.data import read_lines
    from aiayn.decoding.search import beam_search
    from aiayn.decoding.translator import Translator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/demo")
    parser.add_argument("--limit", type=int, default=1000)
    args = parser.parse_args()
    sources = read_lines(MULTI30K / "test_2016_flickr.de.gz")[: args.limit]
    translator = Translator.load(args.model)
    tokenizer = translator.tokenizer
    start = time.monotonic()
    flat_sources, flat_targets, log_probs, noncanonical = [], [], [], 0
    encoded = translator._encode_sources(sources)
    for batch, src_tokens in translator._batches(encoded, 4096):
        hypotheses = beam_search(translator.model, src_tokens, beam_size=4, nbest=4, length_penalty=0.0)
        for i, hyps in zip(batch, hypotheses):
            for h in hyps:
                text = tokenizer.decode(h.tokens)
                if tokenizer.encode(text) != h.tokens:
                    noncanonical += 1
                    continue
                flat_sources.append(sources[i])
                flat_targets.append(text)
                log_probs.append(h.log_prob)
    scores = translator.score(flat_sources, flat_targets)
    worst = max(abs(sum(s) - lp) for s, lp in zip(scores, log_probs))
    print(f"1. {len(log_probs)} beam hypotheses of {len(sources)} sentences: largest |score - beam log-prob| "
          f"= {worst:.2e} ({noncanonical} hypotheses whose text re-encodes to other pieces left out)")
    alone = [translator.score([s], [t])[0] for s, t in zip(flat_sources[:: 4], flat_targets[:: 4])]
    worst_batch = max(max(abs(a - b) for a, b in zip(x, y)) for x, y in zip(scores[:: 4], alone))
    print(f"2. {len(alone)} pairs scored in batches and one at a time: largest per-piece difference "
          f"{worst_batch:.2e}")
    decode = DecodeConfig(sampling_topk=10, nbest=3, seed=1)
    together = translator.translate(sources, decode, return_scores=True)
    apart = [translator.translate([s], decode, return_scores=True)[0] for s in reversed(sources)][::-1]
    differ = sum([t for t, _ in a] != [t for t, _ in b] for a, b in zip(together, apart))
    print(f"3. sampling (top-k 10, 3 samples, seed 1): {differ} of {len(sources)} sentences differ between one "
          f"batched run and sentence-by-sentence in reverse order")
    print(f"({time.monotonic() - start:.0f} s)")


if __name__ == "__main__":
    main()
