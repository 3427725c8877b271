"""The server under bad input, bad models, overload and bad clients, against a real
uvicorn on loopback with the tiny untrained model of `test_server`.

One bad request fails alone in its batch; a worker error is a one-line 500 and the worker goes on;
the queue is bounded (503 + Retry-After); abandoned and overdue requests are never computed;
slow, idle and surplus connections are closed or refused; an oversized body gets its 413 (not a
reset); /attention's response size is bounded.
"""

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="serving needs the optional extra aiayn[serve]")
httpx = pytest.importorskip("httpx", reason="the server tests need httpx")

from aiayn.config import DecodeConfig
from aiayn.serve.app import create_app
from aiayn.serve.http import background_server
from aiayn.serve.limits import BYTES_PER_WEIGHT, ServerLimits, attention_weights, decoding_bytes
from aiayn.serve.worker import BatchingWorker, DeadlinePassed, ServerBusy
from test_server import SENTENCES


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path) -> Path:
    return tiny_model_dir


@pytest.fixture(scope="module")
def translator(model_dir: Path):
    from aiayn.decoding.translator import Translator

    return Translator.load(model_dir)


@pytest.fixture(scope="module")
def reference(model_dir: Path):
    from aiayn.decoding.translator import Translator

    return Translator.load(model_dir)


class Wrapped:
    """The real translator, with `translate` replaced by a test's version; records what it saw."""

    def __init__(self, inner, translate=None) -> None:
        self.inner = inner
        self.seen: list[str] = []
        self._translate = translate

    def translate(self, sentences, *args, **kwargs):
        self.seen.extend(sentences)
        if self._translate is not None:
            return self._translate(sentences, *args, **kwargs)
        return self.inner.translate(sentences, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def blocked(app) -> threading.Event:
    """Occupy the app's worker until the returned event is set, so later requests stay queued."""
    gate = threading.Event()
    worker = app.state.worker
    worker.submit_call(lambda: gate.wait(30))
    wait_for(lambda: worker.snapshot()["queued"] == 0, "the worker to take the blocking call")
    return gate


def wait_for(condition, what: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def raw_post(url: str, path: str, body: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the server closes `sock` within `seconds` (reads and drops what it sends)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def detail(response) -> str:
    body = response.json()["detail"]
    return body if isinstance(body, str) else "; ".join(error["msg"] for error in body)


async def post_all(url: str, bodies: list) -> list:
    async with httpx.AsyncClient(base_url=url, timeout=60) as session:
        return await asyncio.gather(
            *(
                session.post("/translate", content=body, headers={"content-type": "application/json"})
                if isinstance(body, bytes)
                else session.post("/translate", json=body)
                for body in bodies
            )
        )


# --- defect 1: one bad request fails every request batched with it ---------------------------


@pytest.mark.slow
def test_a_request_that_fails_its_batch_fails_alone(translator, reference) -> None:
    def crash_on_poison(sentences, *args, **kwargs):
        if any("POISON" in sentence for sentence in sentences):
            raise TypeError("List elements must be str or bytes")  # what the tokenizer raised
        return translator.translate(sentences, *args, **kwargs)

    wrapped = Wrapped(translator, crash_on_poison)
    app = create_app(wrapped, max_batch_sentences=64, max_wait_ms=50)
    texts = [SENTENCES[i % 4] + " " * (i // 4) for i in range(7)]
    expected = [reference.translate([text], DecodeConfig(beam_size=1))[0] for text in texts]
    with background_server(app) as url:
        gate = blocked(app)  # all 8 requests queue up and make one batch
        bodies = [{"text": text, "beam_size": 1} for text in ["POISON"] + texts]
        results: list = []
        task = threading.Thread(target=lambda: results.extend(asyncio.run(post_all(url, bodies))))
        task.start()
        wait_for(lambda: app.state.worker.snapshot()["queued"] == 8, "8 queued requests")
        gate.set()
        task.join(60)
        stats = httpx.get(f"{url}/health").json()["stats"]
    assert results[0].status_code == 500
    assert detail(results[0]) == "translation failed: TypeError: List elements must be str or bytes"
    assert [r.status_code for r in results[1:]] == [200] * 7, [r.text for r in results[1:]]
    assert [r.json()["translations"][0] for r in results[1:]] == expected
    assert stats["retried_alone"] == 8  # they were batched, the batch failed, each ran alone
    assert stats["errors"] == 2  # the batch, then POISON alone


def test_a_lone_surrogate_is_refused_and_its_neighbours_are_answered(translator, reference) -> None:
    app = create_app(translator, max_batch_sentences=64, max_wait_ms=50)
    bodies = [b'{"text": "\\udcff"}'] + [{"text": text} for text in SENTENCES]
    with background_server(app) as url:
        responses = asyncio.run(post_all(url, bodies))
    assert responses[0].status_code == 422
    assert "text is not valid Unicode text" in detail(responses[0])
    assert [r.status_code for r in responses[1:]] == [200] * 4
    assert [r.json()["translations"][0] for r in responses[1:]] == reference.translate(SENTENCES)


# --- defect 5: an error in the worker or the model ---------------------------------------------


def test_worker_survives_an_unexpected_error_and_serves_the_next_request(translator) -> None:
    calls = []

    def broken_once(sentences, *args, **kwargs):
        calls.append(sentences)
        return None if len(calls) == 1 else translator.translate(sentences, *args, **kwargs)

    app = create_app(Wrapped(translator, broken_once))
    with background_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        first = client.post("/translate", json={"text": SENTENCES[0]})
        assert first.status_code == 500
        assert detail(first) == "translation failed: RuntimeError: the translator returned NoneType for 1 sentences"
        # A bug in the worker itself (outside any model call) must not end its thread either.
        worker = app.state.worker
        original = worker._translate_group
        worker._translate_group = lambda *args: (_ for _ in ()).throw(KeyError("bug"))
        second = client.post("/translate", json={"text": SENTENCES[0]})
        worker._translate_group = original
        assert second.status_code == 500
        assert detail(second) == "translation failed: KeyError: 'bug'"
        third = client.post("/translate", json={"text": SENTENCES[0]})
        assert third.status_code == 200, third.text
        assert client.get("/health").json()["status"] == "ok"


def test_a_model_with_nan_weights_gives_a_one_line_500_and_the_server_goes_on(model_dir) -> None:
    import torch

    from aiayn.decoding.translator import Translator

    poisoned = Translator.load(model_dir)
    with torch.no_grad():
        for parameter in poisoned.model.parameters():
            parameter.fill_(float("nan"))
    with background_server(create_app(poisoned)) as url, httpx.Client(base_url=url, timeout=30) as client:
        for path, what in (("/translate", "translation"), ("/attention", "attention")):
            response = client.post(path, json={"text": SENTENCES[0]})
            assert response.status_code == 500
            message = response.json()["detail"]
            assert message.startswith(f"{what} failed: ") and "\n" not in message and len(message) <= 300
        assert client.get("/health").json()["status"] == "ok"


# --- defect 3: admission control ---------------------------------------------------------------


def test_a_full_queue_answers_503_with_retry_after(translator) -> None:
    app = create_app(translator, limits=ServerLimits(max_queue=2))
    with background_server(app) as url:
        gate = blocked(app)
        results: list = []
        task = threading.Thread(
            target=lambda: results.extend(asyncio.run(post_all(url, [{"text": s} for s in SENTENCES])))
        )
        task.start()
        wait_for(lambda: app.state.worker.snapshot()["refused_busy"] == 2, "two refusals")
        gate.set()
        task.join(60)
        health = httpx.get(f"{url}/health").json()
    assert sorted(r.status_code for r in results) == [200, 200, 503, 503]
    for response in results:
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1"
            assert detail(response) == (
                "the server is busy: 2 requests are waiting; the limit is 2; retry later"
            )
    assert health["max_queue"] == 2
    assert (health["stats"]["max_queued"], health["stats"]["queued"]) == (2, 0)


def test_a_request_whose_client_hangs_up_is_not_computed(translator) -> None:
    wrapped = Wrapped(translator)
    app = create_app(wrapped)
    with background_server(app) as url:
        gate = blocked(app)
        sock = raw_post(url, "/translate", b'{"text": "Niemand wartet auf mich."}')
        wait_for(lambda: app.state.worker.snapshot()["queued"] == 1, "the request to be queued")
        sock.close()
        wait_for(lambda: app.state.worker.snapshot()["cancelled"] == 1, "the job to be dropped")
        gate.set()
        response = httpx.post(f"{url}/translate", json={"text": SENTENCES[0]}, timeout=30)
        assert response.status_code == 200
    assert wrapped.seen == [SENTENCES[0]]
    assert app.state.worker.snapshot()["queued"] == 0


def test_a_request_past_its_deadline_gets_503_and_is_not_computed(translator) -> None:
    # The worker is blocked until the answer has come, so the request cannot have started: the
    # 503 is the deadline's however fast the machine is.
    wrapped = Wrapped(translator)
    app = create_app(wrapped, limits=ServerLimits(request_timeout_s=0.3))
    worker = app.state.worker
    with background_server(app) as url:
        gate = blocked(app)
        started = time.monotonic()
        response = httpx.post(f"{url}/translate", json={"text": "Zu spät."}, timeout=30)
        waited = time.monotonic() - started
        gate.set()
        # The worker is alive and skips the late job: a job without a deadline, queued after it,
        # is computed, and the late one never was.
        after = worker.submit_translate([SENTENCES[0]], DecodeConfig()).result(timeout=30)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert detail(response) == "the server is busy: the request waited over 0.3 s for the model; retry later"
    assert waited >= 0.3
    assert after == translator.translate([SENTENCES[0]], DecodeConfig(), return_scores=True)
    assert wrapped.seen == [SENTENCES[0]]
    assert worker.snapshot()["cancelled"] == 1


def test_a_request_that_does_not_fit_in_memory_gets_503_and_the_server_lives_on(translator) -> None:
    import torch

    def greedy_for_memory(sentences, *args, **kwargs):
        if "Riesig." in sentences:  # a real failed allocation of PyTorch's CPU allocator
            torch.empty(2**62, dtype=torch.uint8)
        return translator.translate(sentences, *args, **kwargs)

    app = create_app(Wrapped(translator, greedy_for_memory))
    with background_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        response = client.post("/translate", json={"text": "Riesig."})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert detail(response) == ("not enough memory for this request (translation): send fewer or shorter "
                                    "sentences or a smaller beam")
        assert client.post("/translate", json={"text": SENTENCES[0]}).json() == {
            "translations": translator.translate([SENTENCES[0]], DecodeConfig())}


def test_decoding_bytes_counts_the_cache_the_cross_attention_and_one_step() -> None:
    from types import SimpleNamespace

    config = SimpleNamespace(n_decoder_layers=2, d_model=8, n_heads=2, d_ff=16, vocab_size=10, max_positions=64)
    # 2 sentences of at most 3 pieces, 4 beams: rows 8, steps 1 * 3 + 2 + 1 = 6.
    cache = 2 * 2 * 8 * 6 * 8
    cross = (2 * 2 + 1) * 2 * 3 * 8
    step = 8 * (3 * 10 + 2 * (6 + 3) + 2 * 16)
    assert decoding_bytes(config, [3, 1], 4, 1.0, 2) == 4 * (cache + cross + step)
    # Sampling: each of the 4 samples has its own memory row.
    assert decoding_bytes(config, [3, 1], 4, 1.0, 2, sampling=True) == 4 * (cache + (2 * 2 + 1) * 8 * 3 * 8 + step)
    # Batches of at most 3 padded pieces: [3] and [1] apart; the larger is the first.
    alone = decoding_bytes(config, [3], 4, 1.0, 2)
    assert decoding_bytes(config, [3, 1], 4, 1.0, 2, batch_tokens=3) == alone
    assert decoding_bytes(config, [], 4, 1.0, 2) == 0
    # Lengths past the model's positions count as its maximum.
    assert decoding_bytes(config, [1000], 1, 1.0, 50) == decoding_bytes(config, [64], 1, 1.0, 50)


def test_a_request_whose_decoding_would_not_fit_gets_413_before_the_queue(translator) -> None:
    app = create_app(translator, limits=ServerLimits(max_request_mb=1, max_body_bytes=1 << 20))
    with background_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        big = client.post("/translate", json={"texts": ["Ein Hund läuft über die Wiese. " * 30] * 64,
                                              "beam_size": 16})
        assert big.status_code == 413
        assert detail(big).startswith("this request's decoding would hold about ")
        assert detail(big).endswith("16 beams or samples each); the limit is 1 MB: send fewer or shorter "
                                    "sentences or a smaller beam")
        assert app.state.worker.snapshot()["requests"] == 0  # never queued
        assert client.post("/translate", json={"text": SENTENCES[0]}).status_code == 200


@pytest.mark.slow
def test_a_computation_past_the_deadline_gets_504(translator) -> None:
    # The computation waits until the answer has come: it is still running when the deadline
    # passes, however fast the machine is (the deadline only has to outlast the worker's pickup).
    started, gate = threading.Event(), threading.Event()

    def stuck(sentences, *args, **kwargs):
        started.set()
        gate.wait(30)
        return translator.translate(sentences, *args, **kwargs)

    app = create_app(Wrapped(translator, stuck), limits=ServerLimits(request_timeout_s=2.0))
    with background_server(app) as url:
        response = httpx.post(f"{url}/translate", json={"text": SENTENCES[0]}, timeout=30)
        gate.set()
    assert started.is_set()
    assert response.status_code == 504
    assert detail(response) == "translation took longer than the 2 s limit"


def test_worker_skips_jobs_past_their_deadline_and_cancelled_jobs() -> None:
    seen = []

    class Echo:
        def translate(self, sentences, settings, *, return_scores):
            seen.extend(sentences)
            return [[(s, 0.0)] for s in sentences]

    worker = BatchingWorker(Echo(), max_wait_ms=0, max_queue=4)
    gate = threading.Event()
    worker.start()
    worker.submit_call(gate.wait)
    late = worker.submit_translate(["late"], DecodeConfig(), deadline=time.monotonic() - 1)
    gone = worker.submit_translate(["gone"], DecodeConfig())
    kept = worker.submit_translate(["kept"], DecodeConfig())
    wait_for(lambda: worker.snapshot()["queued"] == 3, "three queued jobs")
    worker.submit_translate(["fourth"], DecodeConfig())
    with pytest.raises(ServerBusy, match="4 requests are waiting; the limit is 4"):
        worker.submit_translate(["fifth"], DecodeConfig())
    assert worker.cancel(gone)
    gate.set()
    assert kept.result(10) == [[("kept", 0.0)]]
    with pytest.raises(DeadlinePassed):
        late.result(10)
    worker.stop()
    assert seen == ["kept", "fourth"]
    stats = worker.snapshot()
    assert (stats["queued"], stats["max_queued"], stats["cancelled"], stats["expired"]) == (0, 4, 1, 1)


@pytest.mark.slow
def test_idle_slow_and_surplus_connections(translator) -> None:
    limits = ServerLimits(read_timeout_s=0.5, keep_alive_s=1, max_connections=4)
    with background_server(create_app(translator, limits=limits)) as url:
        host, port = url.removeprefix("http://").split(":")
        # Bounds are generous multiples of the limits, so that only a connection left open forever
        # fails, however slow the machine. Never sends a byte: closed after read_timeout_s
        # (uvicorn alone keeps it forever).
        silent = socket.create_connection((host, int(port)))
        assert closed_within(silent, 30)
        # Sends its headers a byte every 0.1 s (about 14 s for all of them): closed while bytes
        # keep coming, so a send fails before the last one.
        slow = socket.create_connection((host, int(port)))
        with pytest.raises(OSError):
            for byte in b"POST /translate HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 100:
                slow.sendall(bytes([byte]))
                time.sleep(0.1)
        slow.close()
        # A kept-alive connection is closed after keep_alive_s of idleness, not before.
        kept = raw_post(url, "/translate", json.dumps({"text": SENTENCES[0]}).encode())
        kept.settimeout(30)
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        assert not closed_within(kept, 0.3)
        assert closed_within(kept, 30)
        # max_connections counts open connections, the asking one included.
        others = [socket.create_connection((host, int(port))) for _ in range(4)]
        busy = httpx.get(f"{url}/health", timeout=10)
        for other in others:
            other.close()
        time.sleep(0.1)
        assert busy.status_code == 503
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200


# --- defect 9: an oversized body with Content-Length -------------------------------------------


def test_an_oversized_body_gets_413_not_a_reset(translator) -> None:
    class BrokenInfo(Wrapped):
        @property
        def num_parameters(self) -> int:
            raise RuntimeError("a bug")

    app = create_app(BrokenInfo(translator), limits=ServerLimits(max_body_bytes=4096))
    body = json.dumps({"text": "x" * 1_000_000}).encode()
    with background_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(3):
            # uvicorn closes the connection after an unhandled error: the 500 must say so, or
            # the client reuses it and the next request is reset while it sends its body.
            broken = client.get("/info")
            assert broken.status_code == 500 and broken.headers["connection"] == "close"
            assert detail(broken) == "internal error: RuntimeError: a bug"
            response = client.post("/translate", content=body, headers={"content-type": "application/json"})
            assert response.status_code == 413
            assert detail(response) == "request body too large: the limit is 4096 bytes"
        # The connection of a 413 stays usable.
        assert client.post("/translate", json={"text": SENTENCES[0]}).status_code == 200
        # A client that waits for "100 Continue" is answered without sending its body.
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000000\r\nExpect: 100-continue\r\n\r\n"
            )
            assert sock.recv(65536).startswith(b"HTTP/1.1 413")


# --- defect 3: /attention's response size ------------------------------------------------------


def test_attention_response_is_bounded_at_the_limit(translator, reference) -> None:
    text, target = SENTENCES[3], "Children play football on a meadow."
    expected = reference.attention(text, target)
    weights = sum(w.numel() for w in (expected.encoder_self, expected.decoder_self, expected.cross))
    config = reference.model.config
    assert weights == attention_weights(config, len(expected.source_tokens), len(expected.target_tokens))
    body = {"text": text, "target": target}
    app = create_app(translator, limits=ServerLimits(max_attention_weights=weights))
    with background_server(app) as url:
        at_limit = httpx.post(f"{url}/attention", json=body, timeout=30)
    tokens = sum(len(json.dumps(at_limit.json()[key])) for key in ("source_tokens", "target_input_tokens",
                                                                    "target_tokens", "translation"))
    assert at_limit.status_code == 200
    assert len(at_limit.content) <= BYTES_PER_WEIGHT * weights + tokens + 200
    app = create_app(translator, limits=ServerLimits(max_attention_weights=weights - 1))
    with background_server(app) as url:
        over = httpx.post(f"{url}/attention", json=body, timeout=30)
    assert over.status_code == 422
    assert detail(over) == (
        f"this sentence pair gives {weights} attention weights ({len(expected.source_tokens)} source and "
        f"{len(expected.target_tokens)} target pieces, 2+2 layers x 4 heads); the limit is {weights - 1}: "
        "send a shorter sentence"
    )


@pytest.mark.slow
def test_attention_near_the_default_character_limit_stays_under_1_mb(translator, reference) -> None:
    limits = ServerLimits()
    # Letters the small test vocabulary mostly lacks: one piece per character, refused before
    # decoding; the next is refused once its (untrained, long) translation is known.
    jumble = "".join("qxzjvkwyäöüß0123456789QXZJ"[i * 7 % 26] for i in range(limits.max_attention_chars))
    texts = [jumble, ("Mann " * 61)[: limits.max_attention_chars], "Fahrrad " * 37]
    with background_server(create_app(translator, limits=limits)) as url:
        responses = [httpx.post(f"{url}/attention", json={"text": text}, timeout=30) for text in texts]
    assert [r.status_code for r in responses] == [422, 422, 200]
    second = reference.attention(texts[1])  # its source alone is within the limit: refused after decoding
    assert attention_weights(reference.model.config, len(second.source_tokens), 1) <= limits.max_attention_weights
    for text, response in zip(texts, responses):
        expected = reference.attention(text)
        weights = attention_weights(reference.model.config, len(expected.source_tokens), len(expected.target_tokens))
        if response.status_code == 422:
            assert weights > limits.max_attention_weights
            assert detail(response).endswith("the limit is 100000: send a shorter sentence")
        else:
            assert weights <= limits.max_attention_weights
            assert len(response.content) < BYTES_PER_WEIGHT * weights + 10_000 < 1_000_000


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_queue must be a positive int, got 0"):
        ServerLimits(max_queue=0)
    with pytest.raises(ValueError, match="request_timeout_s must be a positive number of seconds, got nan"):
        ServerLimits(request_timeout_s=float("nan"))
    with pytest.raises(ValueError, match="keep_alive_s must be a positive int, got 0.5"):
        ServerLimits(keep_alive_s=0.5)
