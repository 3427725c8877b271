"""Hostile load test of `aiayn serve` on loopback: valid requests mixed with malformed ones and
clients that hang up, checked for lost answers, cross-talk, 5xx and the queue bound.

Starts `aiayn serve` as a subprocess (with --model DIR, or the untrained `tiny` model of
`serve_load.build_tiny_model`), asks for every reference answer one request at a time, then runs
--clients closed-loop clients for --seconds. Each request is drawn from KINDS: valid /translate
requests (one or two sentences, beam 4 or greedy) whose answer must equal the reference for that
input, malformed ones with the status they must get (a lone surrogate and NaN as raw JSON, a body
over the limit, wrong types, broken JSON), and raw-socket clients that hang up after sending
their request or in the middle of its body (no answer expected; the server should drop the work).
A monitor polls /health for the queue length.

    python -m benchmarks.serve_hostile --seconds 30 --clients 32
    python -m benchmarks.serve_hostile --model runs/small --json hostile.json

Exit status 1 if anything was lost, crossed, answered 5xx, wrong or with an unexpected status,
if the queue exceeded its bound, or if the server logged a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.serve_load import build_tiny_model, free_port, load_sentences, wait_until_healthy

# (kind, share of requests). Shares are weights for random.choices.
KINDS = [
    ("valid", 55),
    ("valid-two", 10),
    ("lone-surrogate", 5),
    ("nan-penalty", 5),
    ("too-large", 5),
    ("wrong-type", 5),
    ("broken-json", 5),
    ("hang-up-after-send", 7),
    ("hang-up-mid-body", 3),
]
EXPECTED_STATUS = {
    "lone-surrogate": 422,
    "nan-penalty": 422,
    "too-large": 413,
    "wrong-type": 422,
    "broken-json": 422,
}
BEAMS = (4, 1)


def start_server(model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    """`aiayn serve` with its default limits; stderr (tracebacks) goes to `log`."""
    command = [sys.executable, "-m", "aiayn", "serve", "--model", str(model_dir), "--port", str(port)]
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    return wait_until_healthy(process, port, log.read_text)


@dataclass
class Target:
    """A running `aiayn serve` and the reference answers of its sentences (see `serving`)."""

    base_url: str
    pid: int
    sentences: list[str]
    answers: dict[tuple[str, int], str]
    server_log: str = ""  # read once the server has stopped


@contextmanager
def serving(model: Path | None, count: int) -> Iterator[Target]:
    """`aiayn serve` on `model` (default: an untrained tiny model) with the reference answers of
    `count` distinct sentences; stopped on exit, its stderr then in `server_log`."""
    with tempfile.TemporaryDirectory() as scratch:
        if model is None:
            model_dir = Path(scratch) / "tiny"
            pool = [s for s in build_tiny_model(model_dir) if s.strip()]
        else:
            model_dir, pool = model, load_sentences()
        sentences = list(dict.fromkeys(pool))[:count]
        port, log = free_port(), Path(scratch) / "server.log"
        server = start_server(model_dir, port, log)
        try:
            base_url = f"http://127.0.0.1:{port}"
            started = time.perf_counter()
            answers = reference_answers(base_url, sentences)
            print(f"{len(answers)} reference answers in {time.perf_counter() - started:.1f} s", file=sys.stderr)
            target = Target(base_url, server.pid, sentences, answers)
            yield target
        finally:
            server.terminate()
            server.wait(30)
        target.server_log = log.read_text()


def reference_answers(base_url: str, sentences: list[str]) -> dict[tuple[str, int], str]:
    """The answer to each (sentence, beam) alone: one request at a time, nothing to batch with."""
    answers = {}
    with httpx.Client(base_url=base_url, timeout=120) as client:
        for sentence in sentences:
            for beam in BEAMS:
                response = client.post("/translate", json={"text": sentence, "beam_size": beam})
                response.raise_for_status()
                answers[sentence, beam] = response.json()["translations"][0]
    return answers


async def hang_up(host: str, port: int, body: bytes, mid_body: bool, rng: random.Random) -> None:
    """Send a /translate request (all of it, or half its body) and close without reading."""
    reader, writer = await asyncio.open_connection(host, port)
    head = (
        f"POST /translate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    writer.write(head + (body[: len(body) // 2] if mid_body else body))
    await writer.drain()
    await asyncio.sleep(rng.uniform(0.0, 0.2))
    writer.close()
    await writer.wait_closed()


async def run_hostile(
    base_url: str, sentences: list[str], answers: dict, clients: int, seconds: float, seed: int
) -> dict:
    host, port = base_url.removeprefix("http://").split(":")
    kinds, weights = zip(*KINDS)
    by_answer = {answer: key for key, answer in answers.items()}
    counts = {kind: 0 for kind in kinds}
    statuses: dict[str, dict[int, int]] = {kind: {} for kind in kinds}
    latencies: list[float] = []
    problems = {"lost": [], "wrong": [], "cross_talk": [], "5xx": [], "unexpected_status": []}
    max_queued_seen = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as session:
        health = (await session.get("/health")).json()
        before, bound = health["stats"], health["max_queue"]
        deadline = time.perf_counter() + seconds

        async def monitor() -> None:
            nonlocal max_queued_seen
            async with httpx.AsyncClient(base_url=base_url, timeout=10) as probe:
                while time.perf_counter() < deadline:
                    queued = (await probe.get("/health")).json()["stats"]["queued"]
                    max_queued_seen = max(max_queued_seen, queued)
                    await asyncio.sleep(0.05)

        async def client(index: int) -> None:
            rng = random.Random(seed * 1000 + index)
            while time.perf_counter() < deadline:
                kind = rng.choices(kinds, weights)[0]
                counts[kind] += 1
                picked = rng.sample(sentences, 2)
                beam = rng.choice(BEAMS)
                if kind.startswith("hang-up"):
                    body = json.dumps({"text": picked[0], "beam_size": beam}).encode()
                    try:
                        await hang_up(host, int(port), body, kind == "hang-up-mid-body", rng)
                    except OSError as error:  # refused or reset: the server must not do that
                        problems["lost"].append(f"{kind}: {type(error).__name__}: {error}")
                    continue
                texts = picked if kind == "valid-two" else picked[:1]
                body = {
                    "valid": {"text": texts[0], "beam_size": beam},
                    "valid-two": {"texts": texts, "beam_size": beam},
                    "lone-surrogate": b'{"texts": ["Ein Hund.", "\\udcff"]}',
                    "nan-penalty": b'{"text": "Ein Hund.", "length_penalty": NaN}',
                    "too-large": json.dumps({"text": "x" * 100_000}).encode(),
                    "wrong-type": {"text": 5},
                    "broken-json": b'{"text": "Ein Hund',
                }[kind]
                start = time.perf_counter()
                try:
                    if isinstance(body, bytes):
                        response = await session.post(
                            "/translate", content=body, headers={"content-type": "application/json"}
                        )
                    else:
                        response = await session.post("/translate", json=body)
                except httpx.HTTPError as error:
                    problems["lost"].append(f"{kind}: {type(error).__name__}: {error}")
                    continue
                elapsed = time.perf_counter() - start
                statuses[kind][response.status_code] = statuses[kind].get(response.status_code, 0) + 1
                if response.status_code >= 500:
                    problems["5xx"].append(f"{kind}: {response.status_code} {response.text[:200]}")
                    continue
                if kind in EXPECTED_STATUS:
                    if response.status_code != EXPECTED_STATUS[kind]:
                        problems["unexpected_status"].append(f"{kind}: {response.status_code}")
                    continue
                if response.status_code != 200:
                    problems["unexpected_status"].append(f"{kind}: {response.status_code} {response.text[:200]}")
                    continue
                latencies.append(elapsed)
                got = response.json()["translations"]
                want = [answers[text, beam] for text in texts]
                for text, translation, expected in zip(texts, got, want):
                    if translation != expected:
                        problems["wrong"].append(f"{text!r} (beam {beam}): {translation!r} != {expected!r}")
                        other = by_answer.get(translation)
                        if other is not None and other != (text, beam):
                            problems["cross_talk"].append(f"{text!r} got the answer of {other!r}")
                if len(got) != len(texts):
                    problems["wrong"].append(f"{len(got)} translations for {len(texts)} texts")

        started = time.perf_counter()
        await asyncio.gather(monitor(), *(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - started
        await asyncio.sleep(0.5)  # let the server see the last hang-ups
        after = (await session.get("/health")).json()["stats"]

    ordered = sorted(latencies)
    delta = {key: after[key] - before[key] for key in ("requests", "model_calls", "cancelled", "expired",
                                                        "retried_alone", "errors", "refused_busy")}
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "requests": sum(counts.values()),
        "by_kind": {kind: {"sent": counts[kind], "statuses": statuses[kind]} for kind in kinds},
        "valid_answered": len(latencies),
        "lost": len(problems["lost"]),
        "cross_talk": len(problems["cross_talk"]),
        "wrong": len(problems["wrong"]),
        "5xx": len(problems["5xx"]),
        "unexpected_status": len(problems["unexpected_status"]),
        "examples": {key: values[:5] for key, values in problems.items() if values},
        "p50_ms": round(1000 * statistics.median(ordered), 1) if ordered else None,
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1) if ordered else None,
        "queue_bound": bound,
        "max_queued_seen": max_queued_seen,
        "max_queued_server": after["max_queued"],
        "server": delta,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model directory (default: an untrained tiny model)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--sentences", type=int, default=48, help="distinct valid inputs (default 48)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    with serving(args.model, args.sentences) as target:
        row = asyncio.run(run_hostile(target.base_url, target.sentences, target.answers, args.clients,
                                      args.seconds, args.seed))
    server_log = target.server_log
    row["server_tracebacks"] = server_log.count("Traceback")
    from aiayn import hardware

    row["machine"] = {"cpu": hardware.detect().cpu_model, "cpus": os.cpu_count()}

    print(f"machine: {row['machine']['cpu']} ({row['machine']['cpus']} CPUs); "
          f"{args.clients} clients for {row['seconds']} s; model: {args.model or 'untrained tiny'}")
    print("| requests | valid answered | lost | cross-talk | wrong | 5xx | unexpected status "
          "| p50 ms | p99 ms | max queued (seen / server) | queue bound | dropped (client gone) | tracebacks |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    print(f"| {row['requests']} | {row['valid_answered']} | {row['lost']} | {row['cross_talk']} | {row['wrong']} "
          f"| {row['5xx']} | {row['unexpected_status']} | {row['p50_ms']} | {row['p99_ms']} "
          f"| {row['max_queued_seen']} / {row['max_queued_server']} | {row['queue_bound']} "
          f"| {row['server']['cancelled']} | {row['server_tracebacks']} |")
    print()
    print("| kind | sent | statuses |")
    print("|---|---:|---|")
    for kind, entry in row["by_kind"].items():
        shown = ", ".join(f"{status}: {n}" for status, n in sorted(entry["statuses"].items())) or "(no answer expected)"
        print(f"| {kind} | {entry['sent']} | {shown} |")
    if row["examples"]:
        print("\nproblems: " + json.dumps(row["examples"], indent=2), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n")

    ok = (
        row["lost"] == row["cross_talk"] == row["wrong"] == row["5xx"] == row["unexpected_status"] == 0
        and row["server_tracebacks"] == 0
        and max(row["max_queued_seen"], row["max_queued_server"]) <= row["queue_bound"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
