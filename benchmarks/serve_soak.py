"""Soak test of `aiayn serve` on loopback: the hostile mix of `serve_hostile` for --minutes, with the
server process's resident memory, open file descriptors and latency sampled every --window seconds.

The server runs as a subprocess (--model DIR, or the untrained `tiny` model); each window is one
`serve_hostile.run_hostile` of --window seconds (valid requests checked against their reference
answers, malformed bodies, clients that hang up), then a reading of /proc/PID/status (VmRSS) and
/proc/PID/fd. The plateau is the largest reading of the first minute (at least two readings); the bounds are
RSS <= plateau + max(--rss-slack-mb, 10%) and fds <= plateau + --fd-slack.

    python -m benchmarks.serve_soak --minutes 10 --clients 32
    python -m benchmarks.serve_soak --minutes 2 --json soak.json

Exit status 1 if a window lost, crossed or wrongly answered a request, answered 5xx, if the server
logged a traceback, or if memory or descriptors grew past the bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.serve_hostile import run_hostile, serving


def resident_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def soak(base_url: str, pid: int, sentences: list[str], answers: dict, *, clients: int, minutes: float,
         window_s: float, seed: int) -> list[dict]:
    """One row per window: seconds since the start, requests, p50 / p99, problems, RSS and fds."""
    rows = []
    started = time.perf_counter()
    window = 0
    while time.perf_counter() - started < minutes * 60:
        result = asyncio.run(run_hostile(base_url, sentences, answers, clients, window_s, seed + window))
        time.sleep(0.5)  # let the last hang-ups be seen
        rows.append({
            "t_s": round(time.perf_counter() - started, 1),
            "requests": result["requests"],
            "p50_ms": result["p50_ms"],
            "p99_ms": result["p99_ms"],
            "problems": sum(result[key] for key in ("lost", "cross_talk", "wrong", "5xx", "unexpected_status")),
            "examples": result["examples"],
            "rss_mb": round(resident_mb(pid), 1),
            "fds": open_fds(pid),
        })
        row = rows[-1]
        print(f"{row['t_s']:7.1f} s  {row['requests']:6d} requests  p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  "
              f"RSS {row['rss_mb']} MB  fds {row['fds']}  problems {row['problems']}", file=sys.stderr, flush=True)
        window += 1
    return rows


def bounds(rows: list[dict], window_s: float, rss_slack_mb: float, fd_slack: int) -> dict:
    """The first minute's plateau and the bounds the later windows must stay under."""
    first = rows[: max(2, round(60 / window_s))]  # the first minute's readings, at least two
    rss, fds = max(row["rss_mb"] for row in first), max(row["fds"] for row in first)
    return {"rss_plateau_mb": rss, "rss_bound_mb": round(rss + max(rss_slack_mb, 0.1 * rss), 1),
            "fd_plateau": fds, "fd_bound": fds + fd_slack}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model directory (default: an untrained tiny model)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--window", type=float, default=30.0, help="seconds between readings (default 30)")
    parser.add_argument("--sentences", type=int, default=48)
    parser.add_argument("--rss-slack-mb", type=float, default=20.0)
    parser.add_argument("--fd-slack", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    with serving(args.model, args.sentences) as target:
        rows = soak(target.base_url, target.pid, target.sentences, target.answers, clients=args.clients,
                    minutes=args.minutes, window_s=args.window, seed=args.seed)
    tracebacks = target.server_log.count("Traceback")
    limit = bounds(rows, args.window, args.rss_slack_mb, args.fd_slack)
    later = rows[max(2, round(60 / args.window)):]
    grew = [row for row in later if row["rss_mb"] > limit["rss_bound_mb"] or row["fds"] > limit["fd_bound"]]
    from aiayn import hardware

    caps = hardware.detect()
    print(f"machine: {caps.cpu_model} ({caps.cores} CPUs); {args.clients} clients, {args.minutes:g} minutes, "
          f"readings every {args.window:g} s; model: {args.model or 'untrained tiny'}")
    print(f"plateau (first minute): RSS {limit['rss_plateau_mb']} MB, {limit['fd_plateau']} fds; bounds after it: "
          f"RSS <= {limit['rss_bound_mb']} MB, fds <= {limit['fd_bound']}; windows past them: {len(grew)}; "
          f"server tracebacks: {tracebacks}")
    print("\n| t (s) | requests | p50 ms | p99 ms | RSS MB | fds | problems |\n|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['t_s']} | {row['requests']} | {row['p50_ms']} | {row['p99_ms']} | {row['rss_mb']} "
              f"| {row['fds']} | {row['problems']} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "bounds": limit, "tracebacks": tracebacks}, indent=2) + "\n")
    ok = not grew and tracebacks == 0 and not any(row["problems"] for row in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
