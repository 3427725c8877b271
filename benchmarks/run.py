"""One entry point for aiayn's speed benchmarks (training, decoding, attention memory).

    python -m benchmarks.run [--quick | --full | --smoke] [--only training,decoding,attention]
                             [--threads N] [--json PATH] [--results-md PATH] [--note TEXT]

Writes a JSON file (default benchmarks/results/<UTC timestamp>.json, git-ignored) and makes its
Markdown the latest section of its machine class (AVX2, AVX-512, AVX512-BF16, AMX) in
benchmarks/RESULTS.md (or --results-md), replacing that class's earlier run (git keeps it).
Every table compares aiayn and its peers in the same process, under the same threads and load,
with steps / batches interleaved, so the ratios hold even on a busy machine; absolute numbers do
not. Peers (Hugging Face Marian,
CTranslate2) are optional: a missing package drops its column with a note.

Modes: --quick (default; under 10 minutes on 2 cores), --full (base shape with more steps,
attention up to 8192), --smoke (tiny shapes, one step: for tests). With CUDA available the same
runs on the GPU, and training reports MFU against the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SECTIONS = ("training", "decoding", "attention")
ROOT = Path(__file__).resolve().parent.parent

ALL_TRAINING_SYSTEMS = [
    ("aiayn", "fp32"), ("aiayn", "bf16"), ("nn.Transformer", "fp32"), ("nn.Transformer", "bf16"),
    ("HF Marian", "fp32"), ("HF Marian", "bf16"),
]

PLANS = {
    "smoke": {
        "training": {"tiny": {"vocab_size": 64, "max_tokens": 256, "warmup": 0, "steps": 1}},
        "decoding": {"sentences": 4, "batch_sizes": [4], "beams": [1, 2], "compile": False},
        "attention": {"lengths": [64, 512], "repeats": 1},
    },
    "quick": {
        "training": {
            "small": {"vocab_size": 8000, "max_tokens": 4096, "warmup": 1, "steps": 3},
            "base": {"vocab_size": 37000, "max_tokens": 2048, "warmup": 1, "steps": 2},
        },
        "decoding": {"sentences": 200, "batch_sizes": [32, 1], "beams": [1, 4], "compile": True},
        "attention": {"lengths": [128, 256, 512, 1024, 2048], "repeats": 2},
    },
    "full": {
        "training": {
            "small": {"vocab_size": 8000, "max_tokens": 4096, "warmup": 2, "steps": 10},
            "base": {"vocab_size": 37000, "max_tokens": 4096, "warmup": 1, "steps": 5},
        },
        "decoding": {"sentences": 1000, "batch_sizes": [32, 8, 1], "beams": [1, 4], "compile": True},
        "attention": {"lengths": [128, 256, 512, 1024, 2048, 4096, 8192], "repeats": 3},
    },
}


def _have(package: str) -> bool:
    try:
        __import__(package)
    except ImportError:
        return False
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="the default")
    mode.add_argument("--full", dest="mode", action="store_const", const="full")
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke", help="tiny, for tests")
    parser.set_defaults(mode="quick")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch / CTranslate2 threads (default: all cores)")
    parser.add_argument("--json", type=Path, default=None, help="default benchmarks/results/<timestamp>.json")
    parser.add_argument("--results-md", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--note", default="", help="a line added to the Markdown section (e.g. machine busy)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for subprocesses (attention points)
    import torch

    from aiayn import hardware
    from benchmarks import machine, workload

    torch.set_num_threads(threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    plan = PLANS[args.mode]
    started = time.perf_counter()
    result = {"mode": args.mode, "device": device.type, "machine": machine.describe(threads), "notes": []}
    if args.note:
        result["notes"].append(args.note)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731

    if "training" in args.only:
        from benchmarks import training

        systems = list(ALL_TRAINING_SYSTEMS)
        if not _have("transformers"):
            systems = [s for s in systems if s[0] != "HF Marian"]
            result["notes"].append("transformers not installed: no HF Marian training column")
        if args.mode == "quick":  # nn.Transformer bf16 adds little; keep quick mode quick
            systems = [s for s in systems if s != ("nn.Transformer", "bf16")]
        if not hardware.detect().native_bf16(device):  # a reference GEMM there, ~30x slower than fp32
            systems = [s for s in systems if s[1] != "bf16"]
            result["notes"].append("no native bf16 on this device: bf16 training systems skipped")
        lengths = workload.training_lengths(threads=threads)
        peak = machine.peak_bf16_tflops(machine.gpu_name()) if device.type == "cuda" else None
        result["training"] = training.run(plan["training"], lengths, systems, device=device, peak_tflops=peak, log=log)
        if peak:
            result["training"]["peak_bf16_tflops"] = peak
    if "decoding" in args.only:
        from benchmarks import decoding

        settings = plan["decoding"]
        sources = workload.decoding_sources(settings["sentences"], threads=threads)
        result["decoding"] = decoding.run(
            sources, batch_sizes=settings["batch_sizes"], beams=settings["beams"], threads=threads, device=device,
            compile=settings["compile"], log=log,
        )
    if "attention" in args.only:
        from benchmarks import attention_memory

        settings = plan["attention"]
        result["attention"] = attention_memory.run(
            settings["lengths"], device=device.type, threads=threads, repeats=settings["repeats"], log=log
        )

    result["machine"]["load_average_end"] = machine.load_average()
    result["seconds"] = round(time.perf_counter() - started, 1)
    json_path = args.json or ROOT / "benchmarks" / "results" / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    if args.results_md:
        from benchmarks.report import markdown, update_results

        arguments = argv if argv is not None else sys.argv[1:]
        section = markdown(result, command="python -m benchmarks.run " + " ".join(arguments))
        update_results(args.results_md, section, result["machine"]["machine_class"])
    log(f"wrote {json_path}" + (f" and the latest {result['machine']['machine_class']} section of {args.results_md}"
                                if args.results_md else ""))
    return result


if __name__ == "__main__":
    main()
