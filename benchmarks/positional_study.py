"""Positional encodings compared on Multi30k De->En, with a length-extrapolation split.

Every kind of `ModelConfig.positional_encoding` is trained with the same recipe (the demo model of
configs/multi30k-de-en-demo.yaml: d_model 128, 4 heads, d_ff 512, 4 + 4 layers, 5k joint BPE) for
the same fixed number of updates, on the pairs whose source has at most N pieces (N = the 70th
percentile of train), then scored with beam 4 on:
    test2016   all of test_2016_flickr
    long       the test sentences longer than N pieces (none of this length was seen in training)
    concat2/3/4  2, 3, 4 consecutive test sentences joined, with their references joined
and the hypothesis / reference length ratio of each. BLEU by source length (all sets pooled) gives
the plot. Runs whose results exist are not redone, so the command can be repeated or extended
with more seeds; the report is rebuilt from every result under --out.

    python benchmarks/positional_study.py --steps 600 --seeds 1 2
    python benchmarks/positional_study.py --steps 600 --seeds 3 --kinds sinusoidal rope   # closest pairs
    python benchmarks/positional_study.py --report-only --plot docs/positional-encodings.png

Outputs: --out/<kind>-seed<k>/ (model directory, results.json), --out/report.md, the plot.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from aiayn import ModelConfig, Transformer
from aiayn.config import POSITIONAL_ENCODINGS, TrainConfig
from aiayn.files.data import TokenizedCorpus, encode_parallel, read_parallel
from aiayn.evaluate import score
from aiayn.files.tokenizer import Tokenizer
from aiayn.training.loop import fit
from aiayn.decoding.translator import Translator

DEMO_MODEL = dict(d_model=128, n_heads=4, d_ff=512, n_encoder_layers=4, n_decoder_layers=4, dropout=0.1,
                  attention_dropout=0.0)
VOCAB_SIZE = 5000
SPLITS = ("test2016", "long", "concat2", "concat3", "concat4")
LENGTH_BINS = (0, 10, 15, 20, 30, 45, 60, 80, 1000)  # source pieces, for BLEU by length


def read_gz(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return handle.read().rstrip("\n").split("\n")


def shared_data(data_dir: Path, out: Path, quantile: float):
    """The tokenizer (trained once, on all of train), the short training pairs and the test sets."""
    out.mkdir(parents=True, exist_ok=True)
    train = read_parallel(data_dir / "train.de.gz", data_dir / "train.en.gz")
    if (out / "tokenizer" / Tokenizer.MODEL_FILE).exists():
        tokenizer = Tokenizer.load(out / "tokenizer")
    else:
        tokenizer = Tokenizer.train(train.src + train.tgt, vocab_size=VOCAB_SIZE)
        tokenizer.save(out / "tokenizer")
    corpus = encode_parallel(tokenizer, train, 250)
    limit = int(np.quantile(corpus.src_lengths, quantile))
    keep = [i for i, length in enumerate(corpus.src_lengths) if length <= limit]
    short = TokenizedCorpus([corpus.src[i] for i in keep], [corpus.tgt[i] for i in keep],
                            [corpus.line_numbers[i] for i in keep])
    test_src, test_ref = read_gz(data_dir / "test_2016_flickr.de.gz"), read_gz(data_dir / "test_2016_flickr.en.gz")
    test_len = [len(ids) for ids in tokenizer.encode_batch(test_src)]
    sets = {"test2016": (test_src, test_ref), "long": ([], [])}
    for s, r, n in zip(test_src, test_ref, test_len):
        if n > limit:
            sets["long"][0].append(s)
            sets["long"][1].append(r)
    for k in (2, 3, 4):
        groups = range(0, len(test_src) - k + 1, k)
        sets[f"concat{k}"] = ([" ".join(test_src[g : g + k]) for g in groups],
                              [" ".join(test_ref[g : g + k]) for g in groups])
    return tokenizer, short, limit, len(corpus), sets


def train_one(kind: str, seed: int, steps: int, tokenizer, corpus, run_dir: Path, threads: int) -> dict:
    config = ModelConfig.preset("small", **DEMO_MODEL, vocab_size=tokenizer.vocab_size, positional_encoding=kind)
    train_config = TrainConfig(batch_tokens=2048, lr_scale=0.5, warmup_steps=400, label_smoothing=0.1,
                               max_steps=steps, precision="fp32", seed=seed, threads=threads, log_every=100,
                               eval_every=0, save_every=steps, keep_last=1)
    torch.manual_seed(seed)
    model = Transformer(config)
    start = time.perf_counter()
    summary = fit(model, tokenizer, corpus, train_config, run_dir, progress=False,
                  info={"src_lang": "de", "tgt_lang": "en", "data": "multi30k:de-en short 70%"})
    summary["train_seconds"] = time.perf_counter() - start
    return summary


def evaluate_one(run_dir: Path, tokenizer, sets: dict) -> dict:
    translator = Translator.load(run_dir, precision="fp32")
    results, by_length = {}, []
    for name in SPLITS:
        sources, references = sets[name]
        hypotheses = translator.translate(sources, batch_tokens=3000)
        scores = score(hypotheses, references)
        results[name] = {"sentences": len(sources), "bleu": scores["bleu"],
                         "length_ratio": scores["hyp_length"] / scores["ref_length"]}
        if name != "long":  # `long` is a subset of test2016
            lengths = [len(ids) for ids in tokenizer.encode_batch(sources)]
            by_length += list(zip(lengths, hypotheses, references))
    bins = []
    for low, high in zip(LENGTH_BINS, LENGTH_BINS[1:]):
        chosen = [(h, r) for n, h, r in by_length if low < n <= high]
        if len(chosen) >= 20:
            hyps, refs = zip(*chosen)
            bleu = score(list(hyps), list(refs))["bleu"]
            bins.append({"low": low, "high": high, "sentences": len(chosen), "bleu": bleu})
    results["by_length"] = bins
    return results


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags]
    return f"{cpu} ({' '.join(isa)}), {torch.get_num_threads()} thread(s) per run, torch {torch.__version__}"


def report(out: Path, plot: Path | None) -> str:
    runs = {}
    for path in sorted(out.glob("*-seed*/results.json")):
        result = json.loads(path.read_text())
        runs.setdefault(result["kind"], []).append(result)
    if not runs:
        return "no results yet"
    first = next(iter(runs.values()))[0]
    lines = [f"Multi30k De->En, trained on sources of at most {first['limit']} pieces "
             f"({first['train_pairs']} of {first['all_train_pairs']} pairs), {first['steps']} updates of "
             f"2048 tokens each, fp32, beam 4. Machine: {first['machine']}.", "",
             "| kind | seeds | test2016 | long | concat2 | concat3 | concat4 | ratio test | ratio concat4 "
             "| train min |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.1f}"
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"

    for kind in POSITIONAL_ENCODINGS:
        if kind not in runs:
            continue
        results = sorted(runs[kind], key=lambda r: r["seed"])
        row = [kind, ",".join(str(r["seed"]) for r in results)]
        row += [cell([r["scores"][name]["bleu"] for r in results]) for name in SPLITS]
        row += [f"{statistics.mean(r['scores'][name]['length_ratio'] for r in results):.2f}"
                for name in ("test2016", "concat4")]
        row.append(f"{statistics.mean(r['train_seconds'] for r in results) / 60:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    sets = first["set_sizes"]
    lines += ["", "Sentences per set: " + ", ".join(f"{k} {v}" for k, v in sets.items())
              + ". Per-seed numbers (" + "/".join(SPLITS) + "): " + ", ".join(
                  f"{r['kind']}-seed{r['seed']}: " + "/".join(f"{r['scores'][n]['bleu']:.1f}" for n in SPLITS)
                  for rs in runs.values() for r in rs)]
    text = "\n".join(lines)
    (out / "report.md").write_text(text + "\n")
    if plot is not None:
        draw(runs, plot, first["limit"])
    return text


def draw(runs: dict, path: Path, limit: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(7.5, 4.5), dpi=100, layout="constrained")
    for kind in POSITIONAL_ENCODINGS:
        if kind not in runs:
            continue
        per_bin: dict[tuple[int, int], list[float]] = {}
        for result in runs[kind]:
            for b in result["scores"]["by_length"]:
                per_bin.setdefault((b["low"], b["high"]), []).append(b["bleu"])
        keys = sorted(per_bin)
        xs = [(low + min(high, 100)) / 2 for low, high in keys]
        ax.plot(xs, [statistics.mean(per_bin[k]) for k in keys], marker="o", label=kind,
                linestyle="--" if kind == "none" else "-")
    ax.axvline(limit, color="grey", linewidth=1)
    ax.text(limit + 1, ax.get_ylim()[1] * 0.95, f"longest training source ({limit})", color="grey", fontsize=8,
            va="top")
    ax.set(xlabel="source length (pieces, bin centre)", ylabel="BLEU (test2016 + concatenations)",
           title="BLEU against source length, Multi30k De->En, trained on short sentences")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/multi30k"))
    parser.add_argument("--out", type=Path, default=Path("runs/positional"))
    parser.add_argument("--kinds", nargs="+", default=list(POSITIONAL_ENCODINGS), choices=POSITIONAL_ENCODINGS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--steps", type=int, default=600, help="updates per run (a budget in steps, not minutes)")
    parser.add_argument("--quantile", type=float, default=0.7, help="train on sources up to this length quantile")
    parser.add_argument("--plot", type=Path, help="PNG of BLEU against source length")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (1: on a shared machine, spinning threads stall)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.report_only:
        tokenizer, corpus, limit, all_pairs, sets = shared_data(args.data_dir, args.out, args.quantile)
        print(f"train: {len(corpus)} of {all_pairs} pairs with sources of at most {limit} pieces; "
              + ", ".join(f"{k}: {len(v[0])}" for k, v in sets.items()), flush=True)
        for seed in args.seeds:
            for kind in args.kinds:
                run_dir = args.out / f"{kind}-seed{seed}"
                if (run_dir / "results.json").exists():
                    print(f"{run_dir}: done before", flush=True)
                    continue
                if run_dir.exists():  # an interrupted run: start it again
                    import shutil

                    shutil.rmtree(run_dir)
                summary = train_one(kind, seed, args.steps, tokenizer, corpus, run_dir, args.threads)
                start = time.perf_counter()
                scores = evaluate_one(run_dir, tokenizer, sets)
                result = {"kind": kind, "seed": seed, "steps": args.steps, "limit": limit,
                          "train_pairs": len(corpus), "all_train_pairs": all_pairs,
                          "set_sizes": {k: len(v[0]) for k, v in sets.items()},
                          "train_seconds": summary["train_seconds"], "eval_seconds": time.perf_counter() - start,
                          "machine": machine(), "command": " ".join(sys.argv), "scores": scores}
                (run_dir / "results.json").write_text(json.dumps(result, indent=2))
                print(f"{kind} seed {seed}: " + ", ".join(
                    f"{n} {scores[n]['bleu']:.1f} (ratio {scores[n]['length_ratio']:.2f})" for n in SPLITS)
                    + f"; train {summary['train_seconds']:.0f} s, eval {result['eval_seconds']:.0f} s", flush=True)
    print(report(args.out, args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
