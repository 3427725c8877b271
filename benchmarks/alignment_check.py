"""A hand check of `aiayn translate --alignment`: ten Multi30k test_2016 sentences, their
translations by a De->En model, and the source words a reader aligns each target word with.

For each decoder layer (cross-attention averaged over heads) and two row conventions (the query
that predicts the target piece, as fairseq, or the query whose input it is), prints the share
of target words aligned to a word the reader accepts, and the alignment error rate (Och & Ney
2003) with the reader's links as both sure and possible.

    python benchmarks/alignment_check.py --model runs/demo
"""

import argparse
import gzip
import os
from pathlib import Path

import torch

MULTI30K = Path(os.environ.get("AIAYN_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k")

# Sentence index in test_2016_flickr (0-based), the translation the gold refers to, and for each
# target word (whitespace-separated) the source words (0-based) a reader aligns it with.
GOLD = [
    (0, "A man in an orange hat is looking at something.",
     [{0}, {1}, {2}, {3}, {4}, {5}, {6, 8}, {8}, {8}, {7, 8}]),
    (4, "People are working on a roof of a house.",
     [{0}, {1}, {1}, {1, 2}, {2}, {3}, {4}, {4}, {5}]),
    (6, "A group of people are standing in front of a van.",
     [{0}, {1}, {2}, {3}, {4}, {4}, {5}, {5}, {5}, {6}, {7}]),
    (8, "A guy works on a building.", [{0}, {1}, {2}, {3}, {4}, {5}]),
    (14, "Three people are sitting in a tube.", [{0}, {1}, {2}, {2}, {3}, {4}, {5}]),
    (15, "A girl in a denim dress is walking over a tininininy sword.",
     [{0}, {1}, {2}, {3}, {4}, {4}, {5}, {5}, {6}, {7}, {8}, {9}]),
    (16, "A blond man holds a man in the sand with a man in the sand.",
     [{0}, {1}, {1}, {2, 8}, {4}, {5}, {6}, {6}, {7}, {3}, {4}, {5}, {6}, {6}, {7, 8}]),
    (18, "The person in the striped shirt is climbing a mountain.",
     [{0}, {1}, {2}, {2}, {3}, {4}, {5}, {5}, {7}, {8}]),
    (20, "People standing in front of a building.", [{0}, {5}, {2}, {2}, {2}, {3}, {4, 5}]),
    (21, "A teenage boy is playing in a field.", [{0}, {1}, {1}, {2}, {2}, {7}, {8}, {9}]),
]


def main() -> None:
    from aiayn.decoding.alignment import word_alignment
    from aiayn.decoding.translator import Translator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/demo")
    args = parser.parse_args()
    with gzip.open(MULTI30K / "test_2016_flickr.de.gz", "rt", encoding="utf-8") as handle:
        sources = [line.rstrip("\n") for line in handle]
    translator = Translator.load(args.model)
    model, tokenizer, config = translator.model, translator.tokenizer, translator.model.config
    rows = []
    for index, translation, gold in GOLD:
        source = sources[index]
        assert len(gold) == len(translation.split()), (index, translation)
        src_ids, tgt_ids = tokenizer.encode(source), tokenizer.encode(translation)
        with torch.inference_mode():
            decoded = model.decode(torch.tensor([[config.bos_id, *tgt_ids, config.eos_id]]),
                                   model.encode(torch.tensor([src_ids])), need_weights=True, project=False)
        rows.append((tokenizer.pieces(src_ids), tokenizer.pieces(tgt_ids), decoded.cross_attention, gold))
    print(f"model {args.model}: {config.n_decoder_layers} decoder layers, {len(GOLD)} sentences, "
          f"{sum(len(g) for *_, g in GOLD)} target words")
    print("layer  row                        words right   AER")
    for layer in range(config.n_decoder_layers):
        for shift, name in ((0, "predicts the piece (fairseq)"), (1, "reads the piece")):
            right = total = predicted = in_gold = 0
            gold_links = 0
            for source_pieces, target_pieces, cross, gold in rows:
                weights = cross[layer][0].float().mean(dim=0)[shift : shift + len(target_pieces), :]  # [T, S]
                pairs = word_alignment(weights, source_pieces, target_pieces)
                right += sum(source in gold[target] for source, target in pairs)
                total += len(gold)
                predicted += len(pairs)
                in_gold += sum(source in gold[target] for source, target in pairs)
                gold_links += sum(len(g) for g in gold)
            aer = 1 - 2 * in_gold / (predicted + gold_links)
            print(f"{layer:5d}  {name:28s} {right:3d}/{total:3d} {right / total:6.1%}  {aer:.3f}")


if __name__ == "__main__":
    main()
