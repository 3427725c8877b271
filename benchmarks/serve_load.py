"""Load test of `aiayn serve` on loopback: micro-batching against one model call per request.

Starts `aiayn serve` as a subprocess (with --model DIR, or an untrained `tiny` model built from
Multi30k val in a temporary directory), then for each mode (batching on / off) and each number of
concurrent clients runs closed-loop clients for --seconds: every client posts one sentence to
/translate, waits for the answer and posts the next. Reports requests/s, p50/p99 latency, model
calls per request and checks that every request was answered with one translation.

    python benchmarks/serve_load.py                        # ~1 minute, tiny model
    python benchmarks/serve_load.py --model runs/small --clients 1 8 32 --seconds 10 --json load.json
"""

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

MULTI30K = Path("/work/shared/data/multi30k")
FALLBACK_SENTENCES = [
    "Ein Mann fährt Fahrrad.",
    "Zwei Hunde spielen im Schnee.",
    "Eine Frau liest ein Buch auf einer Bank im Park.",
    "Kinder spielen Fußball auf einer Wiese.",
]


def build_tiny_model(directory: Path) -> list[str]:
    """Write an untrained `tiny` model to `directory`; returns the German sentences to send."""
    import torch

    from aiayn.config import ModelConfig
    from aiayn.files.data import read_parallel
    from aiayn.model.transformer import Transformer
    from aiayn.files.tokenizer import Tokenizer
    from aiayn.files.checkpoint import save_model

    pairs = read_parallel(MULTI30K / "val.de.gz", MULTI30K / "val.en.gz")
    tokenizer = Tokenizer.train(pairs.src[:300] + pairs.tgt[:300], vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, max_positions=512)
    )
    save_model(model, tokenizer, directory, {"src_lang": "de", "tgt_lang": "en"})
    return pairs.src[:500]


def load_sentences() -> list[str]:
    path = MULTI30K / "val.de.gz"
    if path.is_file():
        from aiayn.files.data import read_lines

        return [line for line in read_lines(path)[:500] if line.strip()]
    return FALLBACK_SENTENCES


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    model_dir: Path, port: int, batching: bool, args: argparse.Namespace
) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "aiayn",
        "serve",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--max-batch-sentences",
        str(args.max_batch_sentences),
        "--max-wait-ms",
        str(args.max_wait_ms),
    ]
    if not batching:
        command.append("--no-batching")
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    return wait_until_healthy(process, port, lambda: process.stderr.read())


def wait_until_healthy(process: subprocess.Popen, port: int, stderr, seconds: float = 60) -> subprocess.Popen:
    """`process` once its /health answers 200; raises RuntimeError with `stderr()` if it exits first,
    and kills it if it does not answer within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}:\n{stderr()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the server did not answer /health within {seconds:g} s")


async def run_load(
    base_url: str, sentences: list[str], clients: int, seconds: float, beam_size: int
) -> dict:
    latencies: list[float] = []
    failures: list[str] = []
    sent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as session:
        before = (await session.get("/health")).json()["stats"]
        deadline = time.perf_counter() + seconds

        async def client(index: int) -> None:
            nonlocal sent
            position = index
            while time.perf_counter() < deadline:
                text = sentences[position % len(sentences)]
                position += clients
                sent += 1
                start = time.perf_counter()
                try:
                    response = await session.post(
                        "/translate", json={"text": text, "beam_size": beam_size}
                    )
                except httpx.HTTPError as error:
                    failures.append(f"{type(error).__name__}: {error}")
                    continue
                latencies.append(time.perf_counter() - start)
                translations = (
                    response.json().get("translations") if response.status_code == 200 else None
                )
                if not (isinstance(translations, list) and len(translations) == 1):
                    failures.append(f"{response.status_code}: {response.text[:200]}")

        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - started
        after = (await session.get("/health")).json()["stats"]

    ordered = sorted(latencies)
    model_calls = after["model_calls"] - before["model_calls"]
    return {
        "clients": clients,
        "requests": sent,
        "answered": len(latencies) - len(failures),
        "failures": failures[:5],
        "seconds": round(elapsed, 3),
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "p50_ms": round(1000 * statistics.median(ordered), 1) if ordered else None,
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1)
        if ordered
        else None,
        "model_calls": model_calls,
        "requests_per_model_call": round(sent / model_calls, 2) if model_calls else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, help="model directory (default: an untrained tiny model)"
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--seconds", type=float, default=4.0, help="load duration per cell (default 4)"
    )
    parser.add_argument("--beam-size", type=int, default=4)
    parser.add_argument("--max-batch-sentences", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        if args.model is None:
            model_dir = Path(scratch) / "tiny"
            sentences = [s for s in build_tiny_model(model_dir) if s.strip()]
        else:
            model_dir, sentences = args.model, load_sentences()

        rows = []
        for batching in (True, False):
            port = free_port()
            server = start_server(model_dir, port, batching, args)
            try:
                base_url = f"http://127.0.0.1:{port}"
                asyncio.run(run_load(base_url, sentences, 1, 0.5, args.beam_size))  # warm-up
                for clients in args.clients:
                    row = asyncio.run(
                        run_load(base_url, sentences, clients, args.seconds, args.beam_size)
                    )
                    row["batching"] = batching
                    rows.append(row)
                    print(
                        f"batching={batching!s:5} clients={clients:3}: {row['requests_per_s']} req/s",
                        file=sys.stderr,
                    )
            finally:
                server.terminate()
                server.wait(30)

    print(
        "| batching | clients | requests | answered | req/s | p50 ms | p99 ms | requests / model call |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {'on' if row['batching'] else 'off'} | {row['clients']} | {row['requests']} | {row['answered']} "
            f"| {row['requests_per_s']} | {row['p50_ms']} | {row['p99_ms']} | {row['requests_per_model_call']} |"
        )

    all_answered = all(row["answered"] == row["requests"] for row in rows)
    if args.json:
        import torch

        report = {
            "model": str(args.model) if args.model else "untrained tiny (Multi30k val vocabulary)",
            "beam_size": args.beam_size,
            "max_batch_sentences": args.max_batch_sentences,
            "max_wait_ms": args.max_wait_ms,
            "seconds_per_cell": args.seconds,
            "machine": {
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "python": platform.python_version(),
                "torch": torch.__version__,
            },
            "all_answered": all_answered,
            "results": rows,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if not all_answered:
        print(
            "some requests were not answered: "
            + "; ".join(f for row in rows for f in row["failures"]),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
