"""The training techniques compared at the demo's scale: BLEU against training compute (TFLOP).

Every variant is the demo recipe (configs/multi30k-de-en-demo.yaml, Multi30k De->En) with one
thing changed, trained for the same compute budget (--tflop, `aiayn.training.compute`), so that a choice
that makes updates cheaper or dearer is charged for it. Each run is scored with beam 4 on `val`
(where choices are made) and on test_2016_flickr (the report), cased sacreBLEU; its log.jsonl has
greedy validation BLEU on 300 sentences every few updates, against TFLOP, for the curves.
Runs whose results exist are not redone, so the command can be repeated or extended with more seeds;
the report is rebuilt from every result under --out.

    python benchmarks/training_study.py --tflop 10 --seeds 1 --variants old-demo demo
    python benchmarks/training_study.py --tflop 10 --seeds 1 2 3          # every variant
    python benchmarks/training_study.py --report-only --plot docs/training-techniques.png

Outputs: --out/<variant>-tflop<N>-seed<k>/ (model directory, log.jsonl, results.json), --out/report.md.
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

import torch

from aiayn import ModelConfig, Transformer
from aiayn.config import TrainConfig
from aiayn.decoding.translator import Translator
from aiayn.evaluate import score
from aiayn.files.data import encode_parallel, read_parallel
from aiayn.files.tokenizer import Tokenizer
from aiayn.training.compute import mean_update_flops
from aiayn.training.loop import fit
from aiayn.training.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "multi30k-de-en-demo.yaml"

# The demo recipe before budgeted schedules: the paper's post-LN, sinusoids, Adam + inverse square root.
OLD_DEMO = {"model": {"dropout": 0.1, "norm_first": False, "positional_encoding": "sinusoidal"},
            "train": {"schedule": "inverse_sqrt", "lr_scale": 0.5, "warmup_steps": 400, "optimizer": "adam",
                      "batch_tokens": 2048}}

# How the demo recipe was chosen (on val, 10 TFLOP, seed 1), step by step from the old demo recipe.
_OLD_MODEL = {"norm_first": False, "positional_encoding": "sinusoidal"}
_LINEAR = {"schedule": "linear", "warmup_fraction": 0.05, "optimizer": "adam", "batch_tokens": 2048}
_PRELN_ROPE = {"norm_first": True, "positional_encoding": "rope"}
SELECTION: dict[str, dict] = {
    "path-linear": {"model": {**_OLD_MODEL, "dropout": 0.1}, "train": {**_LINEAR, "peak_lr": 2.2e-3}},
    "path-linear-d0-lr3e-3": {"model": {**_OLD_MODEL, "dropout": 0.0}, "train": {**_LINEAR, "peak_lr": 3e-3}},
    "path-muon": {"model": {**_OLD_MODEL, "dropout": 0.0}, "train": {**_LINEAR, "peak_lr": 3e-3, "optimizer": "muon"}},
    # Post-LN stalls at these rates with a short warmup (above); pre-LN (Xiong et al. 2020) does not.
    "path-preln-rope-b1k": {"model": {**_PRELN_ROPE, "dropout": 0.0},
                            "train": {**_LINEAR, "peak_lr": 3e-3, "batch_tokens": 1024}},
    "path-preln-rope-b1k-d0.1": {"model": {**_PRELN_ROPE, "dropout": 0.1},
                                 "train": {**_LINEAR, "peak_lr": 3e-3, "batch_tokens": 1024}},
    "path-preln-rope-b1k-muon": {"model": {**_PRELN_ROPE, "dropout": 0.0},
                                 "train": {**_LINEAR, "peak_lr": 3e-3, "batch_tokens": 1024, "optimizer": "muon"}},
}

# name -> changes to the demo recipe ("model", "train", "vocab_size"). One thing at a time.
VARIANTS: dict[str, dict] = {
    "demo": {},
    "old-demo": OLD_DEMO,
    # optimizer
    "adam": {"train": {"optimizer": "adam"}},
    "adamw": {"train": {"optimizer": "adamw", "weight_decay": 0.01}},
    "sgd": {"train": {"optimizer": "sgd", "peak_lr": 0.3}},
    # schedule (inverse_sqrt: the same peak, 3e-3, after the same 35 warmup updates)
    "inverse-sqrt": {"train": {"schedule": "inverse_sqrt", "warmup_steps": 35, "lr_scale": 0.2}},
    "constant": {"train": {"schedule": "constant"}},
    "cosine": {"train": {"schedule": "cosine"}},
    "wsd": {"train": {"schedule": "wsd"}},
    # regularisation
    "ls0": {"train": {"label_smoothing": 0.0}},
    "ls0.2": {"train": {"label_smoothing": 0.2}},
    "dropout0.1": {"model": {"dropout": 0.1}},
    "dropout0.3": {"model": {"dropout": 0.3}},
    # tokens per update at fixed compute
    "batch512": {"train": {"batch_tokens": 512}},
    "batch2k": {"train": {"batch_tokens": 2048}},
    # shape at fixed compute
    "wide": {"model": {"d_model": 256, "d_ff": 1024, "n_encoder_layers": 2, "n_decoder_layers": 2}},
    "deep-enc": {"model": {"n_encoder_layers": 6, "n_decoder_layers": 1}},
    "vocab3k": {"vocab_size": 3000},
    "vocab8k": {"vocab_size": 8000},
    "sinusoidal": {"model": {"positional_encoding": "sinusoidal"}},
    "post-ln": {"model": {"norm_first": False}},
    **SELECTION,
}


def read_gz(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return handle.read().rstrip("\n").split("\n")


def recipe_for(variant: str) -> tuple[dict, dict, int]:
    """(model overrides, train values, vocab size) of a variant: the demo recipe with its changes."""
    recipe = load_recipe(DEMO)
    change = VARIANTS[variant]
    model = {**recipe.get("model", {}), **change.get("model", {})}
    train = {**recipe.get("train", {}), **change.get("train", {})}
    return model, train, change.get("vocab_size", recipe["vocab_size"])


def tokenizer_for(vocab_size: int, train_text, out: Path) -> Tokenizer:
    directory = out / f"tokenizer-{vocab_size}"
    if (directory / Tokenizer.MODEL_FILE).exists():
        return Tokenizer.load(directory)
    tokenizer = Tokenizer.train(train_text.src + train_text.tgt, vocab_size=vocab_size)
    tokenizer.save(directory)
    return tokenizer


def run_one(variant: str, seed: int, tflop: float, data_dir: Path, out: Path, threads: int | None) -> dict:
    run_dir = out / f"{variant}-tflop{tflop:g}-seed{seed}"
    if (run_dir / "results.json").exists():
        return json.loads((run_dir / "results.json").read_text())
    model_overrides, train_values, vocab_size = recipe_for(variant)
    train_text = read_parallel(data_dir / "train.de.gz", data_dir / "train.en.gz")
    valid_text = read_parallel(data_dir / "val.de.gz", data_dir / "val.en.gz")
    tokenizer = tokenizer_for(vocab_size, train_text, out)
    config = TrainConfig.from_dict({
        **train_values, "max_minutes": None, "max_tflop": tflop, "seed": seed, "threads": threads,
        "eval_every": 0, "save_every": 100000, "keep_last": 1, "log_every": 25, "valid_beam": 1,
        "valid_max_sentences": 300,
    })
    corpus = encode_parallel(tokenizer, train_text, config.max_sentence_tokens)
    valid = encode_parallel(tokenizer, valid_text, 255)
    by_line = dict(zip(valid_text.line_numbers, valid_text.tgt))
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.preset("small", **{**model_overrides, "vocab_size": tokenizer.vocab_size}))
    # Validation BLEU about six times in the run, for the curve against TFLOP.
    steps = tflop * 1e12 / mean_update_flops(model.config, corpus, config.batch_tokens, config.accumulate)
    config = config.replace(eval_every=max(1, int(steps / 6)))
    started = time.monotonic()
    summary = fit(model, tokenizer, corpus, config, run_dir, valid_corpus=valid,
                  valid_references=[by_line[n] for n in valid.line_numbers], progress=False)
    train_minutes = (time.monotonic() - started) / 60
    translator = Translator.load(run_dir)  # the best validation checkpoint is the run's model
    result = {"variant": variant, "seed": seed, "tflop_budget": tflop, "tflop": summary["tflop"],
              "steps": summary["steps"], "epochs": round(summary["epochs"], 3),
              "train_minutes": round(train_minutes, 2),
              "precision": summary["precision"], "parameters": model.num_parameters(),
              "machine": machine(), "curve": _curve(run_dir / "log.jsonl")}
    for split, src, ref in (("val", "val.de.gz", "val.en.gz"), ("test2016", "test_2016_flickr.de.gz",
                                                                 "test_2016_flickr.en.gz")):
        hyps = translator.translate(read_gz(data_dir / src))
        refs = read_gz(data_dir / ref)
        result[f"{split}_bleu"] = round(score(hyps, refs)["bleu"], 2)
        result[f"{split}_bleu_lc"] = round(score(hyps, refs, lowercase=True)["bleu"], 2)
        if split == "test2016":
            result["example"] = translator.translate(["Ein Mann fährt Fahrrad auf einer Straße."])[0]
    (run_dir / "results.json").write_text(json.dumps(result, indent=1))
    return result


def _curve(log_path: Path) -> list[list[float]]:
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    return [[r["tflop"], r["valid_bleu"]] for r in records if "valid_bleu" in r]


def machine() -> str:
    from aiayn import hardware

    found = hardware.detect()
    return f"{found.cpu_model} ({found.machine_class}, {torch.get_num_threads()} threads, {platform.machine()})"


def report(out: Path) -> str:
    """Per variant: mean test / val BLEU over seeds, each seed, and the paired difference from `demo`."""
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/results.json"))]
    by_key: dict[tuple[str, float], dict[int, dict]] = {}
    for r in results:
        by_key.setdefault((r["variant"], r["tflop_budget"]), {})[r["seed"]] = r
    lines = ["| variant | TFLOP | seeds | updates | val BLEU | test2016 BLEU (per seed) | mean | paired vs demo |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (variant, tflop), seeds in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][0] != "demo", kv[0][0])):
        base = by_key.get(("demo", tflop), {})
        paired = [seeds[s]["test2016_bleu"] - base[s]["test2016_bleu"] for s in seeds if s in base]
        tests = [seeds[s]["test2016_bleu"] for s in sorted(seeds)]
        vals = [seeds[s]["val_bleu"] for s in sorted(seeds)]
        lines.append(
            f"| {variant} | {tflop:g} | {','.join(map(str, sorted(seeds)))} | "
            f"{statistics.mean(seeds[s]['steps'] for s in seeds):.0f} | {statistics.mean(vals):.2f} | "
            f"{' / '.join(f'{t:.2f}' for t in tests)} | {statistics.mean(tests):.2f} | "
            f"{'' if variant == 'demo' or not paired else f'{statistics.mean(paired):+.2f} (n={len(paired)})'} |")
    machines = sorted({r["machine"] for r in results})
    return "\n".join(lines) + "\n\nMachine: " + "; ".join(machines) + "\n"


def plot(out: Path, png: Path) -> None:
    from aiayn.visualize import require_matplotlib

    mpl = require_matplotlib()
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/results.json"))]
    figure = mpl.figure.Figure(figsize=(10, 6), dpi=100, layout="constrained")
    mpl.backends.backend_agg.FigureCanvasAgg(figure)
    ax = figure.subplots()
    ax.set_prop_cycle(color=mpl.colormaps["tab20"].colors)
    for variant in sorted({r["variant"] for r in results}):
        runs = [r for r in results if r["variant"] == variant and r["seed"] == min(
            x["seed"] for x in results if x["variant"] == variant)]
        for r in runs:
            xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
            ax.plot(xs, ys, "o-", label=f"{variant} ({r['tflop_budget']:g} TFLOP)", linewidth=2.5 if variant in (
                "demo", "old-demo") else 1.0, markersize=3)
    ax.set(xlabel="training compute (TFLOP)", ylabel="validation BLEU (greedy, 300 sentences)",
           title="Multi30k De->En, demo model: BLEU against compute, one line per choice (seed 1)")
    ax.legend(fontsize=7, ncol=2)
    figure.savefig(png, format="png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "multi30k")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "training-study")
    parser.add_argument("--tflop", type=float, default=10.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for seed in args.seeds:
            for variant in args.variants:
                r = run_one(variant, seed, args.tflop, args.data_dir, args.out, args.threads)
                print(f"{variant} seed {seed}: {r['steps']} updates, {r['tflop']} TFLOP, {r['train_minutes']} min, "
                      f"val {r['val_bleu']}, test2016 {r['test2016_bleu']} | {r['example']}", flush=True)
    text = report(args.out)
    (args.out / "report.md").write_text(text)
    print(text)
    if args.plot:
        plot(args.out, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
