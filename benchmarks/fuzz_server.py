"""Fuzz every route of `aiayn serve` from the server's own OpenAPI schema (schemathesis), on loopback.

Requests are generated from the schema that `create_app(...).openapi()` publishes: valid bodies
(schemathesis's positive mode) and bodies that break it (negative mode: wrong types, missing and
extra fields, out-of-range numbers, odd strings), sent over HTTP to a real uvicorn server in this
process. Each answer is checked by `problem_with`: no 5xx, every 4xx a JSON body whose "detail"
names the field (422) or says why in words, and the server logs no traceback.

    python -m benchmarks.fuzz_server --examples 1000           # per mode: ~2,000 requests
    python -m benchmarks.fuzz_server --model runs/demo --json fuzz.json

Exit status 1 if any answer has a problem or the server logged a traceback.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODES = ("positive", "negative")


def problem_with(response: Any) -> str | None:
    """What is wrong with one answer (None: nothing)."""
    status = response.status_code
    if status >= 500:
        return f"{status}: {response.text[:200]}"
    if status < 400:
        return None
    try:
        detail = response.json()["detail"]
    except (ValueError, KeyError, TypeError):
        return f"{status} without a JSON detail: {response.text[:200]!r}"
    if isinstance(detail, str):
        return None if detail.strip() else f"{status} with an empty detail"
    if status == 422 and isinstance(detail, list) and detail and all(
        isinstance(entry, dict) and entry.get("loc") and entry.get("msg") for entry in detail
    ):
        return None
    return f"{status} whose detail names no field: {str(detail)[:200]}"


class TracebackCounter(logging.Handler):
    """Counts log records that carry a traceback (the server's "unhandled error" and the like)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(f"{record.name}: {record.getMessage()}")


def fuzz(url: str, openapi: dict, examples: int, seed: int = 0) -> dict[str, Any]:
    """Send `examples` generated requests per mode to the server at `url`; counts and problems."""
    import requests
    import schemathesis

    schema = schemathesis.openapi.from_dict(openapi)
    statuses: collections.Counter = collections.Counter()
    problems: list[str] = []
    session = requests.Session()
    for mode in MODES:
        _fuzz_mode(schema, mode, url, session, examples, seed, statuses, problems)
    return {"requests": sum(statuses.values()), "statuses": dict(sorted(statuses.items())), "problems": problems}


def _fuzz_mode(schema: Any, mode: str, url: str, session: Any, examples: int, seed: int,
               statuses: collections.Counter, problems: list[str]) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from schemathesis.generation import GenerationMode

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=schema.as_strategy(generation_mode=GenerationMode(mode)))
    def send(case: Any) -> None:
        response = case.call(base_url=url, session=session, timeout=300)
        statuses[f"{case.method} {case.path} {response.status_code}"] += 1
        problem = problem_with(response)
        if problem is not None:
            problems.append(f"{mode} {case.method} {case.path} {json.dumps(case.body, default=str)[:4000]}: {problem}")

    send()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model directory (default: an untrained tiny model)")
    parser.add_argument("--examples", type=int, default=1000, help="generated requests per mode (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    from aiayn import hardware
    from aiayn.decoding.translator import Translator
    from aiayn.serve.app import create_app
    from aiayn.serve.http import background_server
    from benchmarks.serve_load import build_tiny_model

    counter = TracebackCounter()
    logging.getLogger().addHandler(counter)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model
        if model_dir is None:
            model_dir = Path(scratch) / "tiny"
            build_tiny_model(model_dir)
        app = create_app(Translator.load(model_dir))
        started = time.perf_counter()
        with background_server(app) as url:
            row = fuzz(url, app.openapi(), args.examples, args.seed)
        row["seconds"] = round(time.perf_counter() - started, 1)
    row["tracebacks"] = counter.records
    caps = hardware.detect()
    by_status: collections.Counter = collections.Counter()
    for key, count in row["statuses"].items():
        by_status[key.rsplit(" ", 1)[1]] += count
    print(f"machine: {caps.cpu_model} ({caps.cores} CPUs); model: {args.model or 'untrained tiny'}")
    print(f"{row['requests']} requests in {row['seconds']} s; by status: "
          + ", ".join(f"{status}: {n}" for status, n in sorted(by_status.items())))
    print(f"5xx: {sum(n for s, n in by_status.items() if s.startswith('5'))}; problems: {len(row['problems'])}; "
          f"tracebacks logged: {len(row['tracebacks'])}")
    print("\n| route | status | requests |\n|---|---:|---:|")
    for key, count in row["statuses"].items():
        route, status = key.rsplit(" ", 1)
        print(f"| {route} | {status} | {count} |")
    for problem in row["problems"][:10] + row["tracebacks"][:10]:
        print(problem, file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n")
    return 0 if not row["problems"] and not row["tracebacks"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
