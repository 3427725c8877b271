"""HTTP API and web page: `aiayn serve --model DIR`.

Endpoints (OpenAPI docs at `/docs`):
    POST /translate   {"text": str} or {"texts": [str]}, optional beam_size, nbest, length_penalty
    POST /attention   {"text": str, "target": str | null} -> tokens and attention weights
    GET  /health      liveness plus request / model-call / queue counters
    GET  /info        model config, languages, vocabulary and parameter counts, limits, counters
    GET  /            the single static page (src/aiayn/static/index.html)

The model is not thread-safe, so one worker thread owns it. Requests put jobs on a queue; the
worker takes up to `max_batch_sentences` sentences, waiting at most `max_wait_ms` for more,
groups them by decode settings and runs one `Translator.translate` call per group (micro-batching).
The parallel work happens inside torch's intra-op threads; the event loop only waits on futures.

Admission control (`ServerLimits`): at most `max_queue` requests wait for the model (more get 503
with Retry-After); a request not answered within `request_timeout_s` gets 503 if it never started
(and is dropped) or 504 if it was being computed; a request whose client hangs up is dropped
before it is computed; one request that fails a batched model call fails alone (the others of
its batch are run again without it). uvicorn caps open connections (`max_connections`, 503
beyond), closes idle keep-alive connections (`keep_alive_s`) and, here, connections whose request
does not arrive in full within `read_timeout_s` (slow or silent clients).

FastAPI and uvicorn are the optional extra `aiayn[serve]` and are imported lazily.
"""

import asyncio
import contextlib
import logging
import math
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiayn.config import SERVER_MAX_BEAM_SIZE, DecodeConfig

STATIC_DIR = Path(__file__).parent / "static"
RETRY_AFTER_S = 1  # the Retry-After of a 503: the queue drains in about a batch's time
# One attention weight in JSON: "0.1234," (rounded to 4 decimals, never negative, never 1e-05).
BYTES_PER_WEIGHT = 7

logger = logging.getLogger("aiayn.server")


def _require_fastapi() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            f"serving needs FastAPI and uvicorn ({error.name} is missing); "
            "install them with: pip install 'aiayn[serve]'"
        ) from error


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on requests, the queue and connections; what exceeds them is refused (413, 422, 503)
    before reaching the model.

    /attention's response holds at most `max_attention_weights` numbers of at most
    `BYTES_PER_WEIGHT` bytes each, so with the defaults it stays under 0.7 MB plus the tokens.
    """

    max_body_bytes: int = 64 * 1024
    max_chars: int = 1000  # per sentence
    max_texts: int = 64  # sentences per /translate request
    max_attention_chars: int = 300  # per /attention sentence
    # /attention returns O(layers * heads * length^2) numbers: this bounds the response itself.
    max_attention_weights: int = 100_000
    max_queue: int = 128  # requests waiting for the model; one more gets 503 + Retry-After
    request_timeout_s: float = 30.0  # from submission to answer
    max_connections: int = 256  # open connections (uvicorn's limit_concurrency)
    keep_alive_s: int = 5  # an idle keep-alive connection is closed after this
    read_timeout_s: float = 10.0  # a request's headers and body must arrive within this

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_chars", "max_texts", "max_attention_chars",
                     "max_attention_weights", "max_queue", "max_connections", "keep_alive_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("request_timeout_s", "read_timeout_s"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


# --- micro-batching worker -------------------------------------------------------------------


# Micro-batching defaults, shared by `BatchingWorker`, `create_app`, `serve` and `aiayn serve`.
MAX_BATCH_SENTENCES = 32
MAX_WAIT_MS = 5.0


class ServerBusy(RuntimeError):
    """The queue is full (HTTP 503 with Retry-After)."""


class DeadlinePassed(TimeoutError):
    """A job's deadline passed while it waited in the queue, so it was not computed (HTTP 503)."""


class RequestRefused(ValueError):
    """A request found too large only once the model's tokenizer has seen it (HTTP 422); not a
    model failure, so not logged or counted as an error."""


@dataclass
class _TranslateJob:
    sentences: list[str]
    settings: DecodeConfig
    deadline: float | None = None  # time.monotonic() after which it is not worth computing
    future: Future = field(default_factory=Future)


@dataclass
class _CallJob:
    """Any other use of the model (attention); runs alone, in order with the translations."""

    function: Callable[[], Any]
    deadline: float | None = None
    future: Future = field(default_factory=Future)


_STOP = object()


class BatchingWorker:
    """One thread that owns the translator and merges concurrent translation requests.

    With `batching=False` every request gets its own `translate` call (still on the one thread),
    which is the baseline `benchmarks/serve_load.py` compares against. At most `max_queue` jobs
    wait at a time (`ServerBusy` beyond). A job's future is cancelled by `cancel` (its client has
    gone); the worker skips cancelled jobs and jobs past their deadline without computing them.
    """

    def __init__(
        self,
        translator: Any,
        *,
        max_batch_sentences: int = MAX_BATCH_SENTENCES,
        max_wait_ms: float = MAX_WAIT_MS,
        batching: bool = True,
        max_queue: int = ServerLimits.max_queue,
    ) -> None:
        if max_batch_sentences < 1:
            raise ValueError(f"max_batch_sentences must be >= 1, got {max_batch_sentences}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.translator = translator
        self.max_batch_sentences = max_batch_sentences
        self.max_wait_s = max_wait_ms / 1000.0
        self.batching = batching
        self.max_queue = max_queue
        # Unbounded itself: `_STOP` must always get in; `stats["queued"]` is the bounded count.
        self._queue: queue.Queue = queue.Queue()
        self._held: Any = None  # a job taken while collecting that belongs to the next batch
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.stats = {
            "requests": 0,
            "sentences": 0,
            "model_calls": 0,
            "errors": 0,  # model calls that raised
            "retried_alone": 0,  # requests run again on their own after their batch failed
            "queued": 0,  # jobs waiting now (submitted, not yet started, not cancelled)
            "max_queued": 0,  # the most that ever waited at once
            "refused_busy": 0,  # submissions refused because the queue was full
            "cancelled": 0,  # jobs dropped before computing: client gone or deadline passed
            "expired": 0,  # jobs the worker found past their deadline
        }

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="aiayn-model-worker", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.stats)

    def _enqueue(self, job: Any, sentences: int) -> Future:
        with self._lock:
            if self.stats["queued"] >= self.max_queue:
                self.stats["refused_busy"] += 1
                raise ServerBusy(f"{self.stats['queued']} requests are waiting; the limit is {self.max_queue}")
            self.stats["queued"] += 1
            self.stats["max_queued"] = max(self.stats["max_queued"], self.stats["queued"])
            if sentences:
                self.stats["requests"] += 1
                self.stats["sentences"] += sentences
        self._queue.put(job)
        return job.future

    def submit_translate(
        self, sentences: list[str], settings: DecodeConfig, *, deadline: float | None = None
    ) -> Future:
        """Queue a translation; its future gets one list of (text, score) per sentence.

        Raises:
            ServerBusy: `max_queue` jobs are waiting already.
        """
        return self._enqueue(_TranslateJob(list(sentences), settings, deadline), len(sentences))

    def submit_call(self, function: Callable[[], Any], *, deadline: float | None = None) -> Future:
        """Queue `function()` to run on the worker thread, alone.

        Raises:
            ServerBusy: `max_queue` jobs are waiting already.
        """
        return self._enqueue(_CallJob(function, deadline), 0)

    def cancel(self, future: Future) -> bool:
        """Drop a queued job (its client has gone, or its deadline passed). True if it will never
        run; False if it is running or done already."""
        if not future.cancel():
            return False
        with self._lock:
            self.stats["queued"] -= 1
            self.stats["cancelled"] += 1
        return True

    # -- worker thread

    def _next_job(self, timeout: float | None) -> Any:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        return (
            self._queue.get(timeout=timeout)
            if timeout is None or timeout > 0
            else self._queue.get_nowait()
        )

    def _claim(self, job: Any) -> bool:
        """Take a queued job for computing: False (and skip it) if it was cancelled or its
        deadline has passed. After this a job can no longer be cancelled."""
        if not job.future.set_running_or_notify_cancel():
            return False  # `cancel` took it off the count
        with self._lock:
            self.stats["queued"] -= 1
        if job.deadline is not None and time.monotonic() > job.deadline:
            with self._lock:
                self.stats["expired"] += 1
            job.future.set_exception(DeadlinePassed("the request waited past its deadline"))
            return False
        return True

    def _collect(self, jobs: list[_TranslateJob]) -> None:
        """Add to `jobs` (one claimed job) whatever arrives within max_wait, up to
        max_batch_sentences sentences. A job is never split; one that would overflow the batch
        waits for the next."""
        count = len(jobs[0].sentences)
        deadline = time.monotonic() + self.max_wait_s
        while self.batching and count < self.max_batch_sentences:
            try:
                job = self._next_job(deadline - time.monotonic())
            except queue.Empty:
                break
            if (
                not isinstance(job, _TranslateJob)
                or count + len(job.sentences) > self.max_batch_sentences
            ):
                self._held = job
                break
            if self._claim(job):
                jobs.append(job)
                count += len(job.sentences)

    def _loop(self) -> None:
        while True:
            job = self._next_job(None)
            if job is _STOP:
                return
            if not self._claim(job):
                continue
            jobs = [job]
            try:
                if isinstance(job, _CallJob):
                    self._call(job)
                    continue
                self._collect(jobs)
                groups: dict[DecodeConfig, list[_TranslateJob]] = {}
                for member in jobs:
                    groups.setdefault(member.settings, []).append(member)
                for settings, members in groups.items():
                    self._translate_group(settings, members)
            except Exception as error:  # noqa: BLE001 - a bug here fails these jobs, not the thread
                logger.exception("worker error")
                for member in jobs:
                    if not member.future.done():
                        member.future.set_exception(error)

    def _call(self, job: _CallJob) -> None:
        try:
            job.future.set_result(self._run(job.function))
        except Exception as error:  # noqa: BLE001 - reported to the request as a 500
            job.future.set_exception(error)

    def _translate_group(self, settings: DecodeConfig, jobs: list[_TranslateJob]) -> None:
        sentences = [sentence for job in jobs for sentence in job.sentences]

        def call() -> list[list[tuple[str, float]]]:
            results = self.translator.translate(sentences, settings, return_scores=True)
            if not isinstance(results, list) or len(results) != len(sentences):
                raise RuntimeError(
                    f"the translator returned {type(results).__name__} for {len(sentences)} sentences"
                )
            return results

        try:
            results = self._run(call)
        except Exception as error:  # noqa: BLE001 - reported to the waiting requests as a 500
            if len(jobs) > 1:
                # One bad request must not fail the others merged with it: run each alone, so
                # only those that fail alone get an error.
                with self._lock:
                    self.stats["retried_alone"] += len(jobs)
                for job in jobs:
                    self._translate_group(settings, [job])
                return
            jobs[0].future.set_exception(error)
            return
        start = 0
        for job in jobs:
            job.future.set_result(results[start : start + len(job.sentences)])
            start += len(job.sentences)

    def _run(self, function: Callable[[], Any]) -> Any:
        """One model call, counted; the caller hands an exception to the waiting requests, so a
        failure fails only the requests in that call, never the thread."""
        with self._lock:
            self.stats["model_calls"] += 1
        try:
            return function()
        except RequestRefused:
            raise
        except Exception:
            logger.exception("model call failed")
            with self._lock:
                self.stats["errors"] += 1
            raise


# --- the application -------------------------------------------------------------------------


def _printable(text: str) -> str:
    """`text` with lone surrogates escaped, so it can go into a UTF-8 JSON response."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _one_line(error: BaseException, max_chars: int = 300) -> str:
    """'Type: first line of the message', short and printable: for a 500's detail."""
    lines = str(error).strip().splitlines()
    message = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    if len(message) > max_chars:
        message = message[: max_chars - 3] + "..."
    return _printable(message)


async def _client_gone(receive: Callable) -> None:
    """Return when the client hangs up. Only once the body has been read: the next message
    uvicorn gives is then the disconnect (it waits for it)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class _BodySizeLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with 413, before any parsing.

    Checks Content-Length up front and also counts the bytes of chunked bodies (which have none).
    The unread rest of a refused body is uvicorn's to drop; the connection stays usable.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        too_large = JSONResponse(
            {"detail": f"request body too large: the limit is {self.max_bytes} bytes"},
            status_code=413,
        )
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await too_large(scope, receive, send)
            return
        # Buffer the (small) body so an oversized chunked upload is refused before the app runs.
        messages, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client has gone: nobody to answer
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def _rounded(weights: Any, decimals: int = 4) -> list:
    """A tensor as nested lists of floats rounded to `decimals` (keeps /attention responses small)."""
    return weights.double().round(decimals=decimals).tolist()  # float64: prints as 0.1234


def attention_weights(config: Any, source_len: int, target_len: int) -> int:
    """How many numbers /attention returns for `source_len` source and `target_len` target
    pieces: encoder self [L_enc, H, S, S], decoder self [L_dec, H, T, T], cross [L_dec, H, T, S]."""
    return config.n_heads * (
        config.n_encoder_layers * source_len * source_len
        + config.n_decoder_layers * target_len * (target_len + source_len)
    )


def create_app(
    translator: Any,
    *,
    max_batch_sentences: int = MAX_BATCH_SENTENCES,
    max_wait_ms: float = MAX_WAIT_MS,
    batching: bool = True,
    limits: ServerLimits | None = None,
) -> Any:
    """The FastAPI application serving `translator` (an `aiayn.translator.Translator`).

    The batching worker thread starts and stops with the application's lifespan.

    Raises:
        RuntimeError: if FastAPI is not installed.
        ValueError: on a bad batching setting.
    """
    _require_fastapi()
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse

    from aiayn.server_schemas import (
        AttentionRequest,
        AttentionResponse,
        ExplainRequest,
        TranslateRequest,
        TranslateResponse,
    )

    limits = limits or ServerLimits()
    worker = BatchingWorker(
        translator,
        max_batch_sentences=max_batch_sentences,
        max_wait_ms=max_wait_ms,
        batching=batching,
        max_queue=limits.max_queue,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> Any:
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(
        title="aiayn translation server",
        description="Transformer (Vaswani et al., 2017) translation with micro-batching.",
        lifespan=lifespan,
    )
    app.state.worker = worker
    app.state.translator = translator
    app.state.limits = limits

    def check_lengths(texts: list[str], max_chars: int) -> None:
        for index, text in enumerate(texts):
            if len(text) > max_chars:
                where = f"text {index}" if len(texts) > 1 else "text"
                raise HTTPException(
                    422,
                    f"{where} has {len(text)} characters; the limit is {max_chars} per sentence",
                )

    def busy(reason: str) -> HTTPException:
        return HTTPException(
            503, f"the server is busy: {reason}; retry later", headers={"Retry-After": str(RETRY_AFTER_S)}
        )

    def enqueue(submit_job: Callable[..., Future], *args: Any) -> Future:
        try:
            return submit_job(*args, deadline=time.monotonic() + limits.request_timeout_s)
        except ServerBusy as error:
            raise busy(str(error)) from None

    async def answer(job: Future, what: str, request: Request) -> Any:
        """The job's result, or the HTTP error that says why not; drops the job if the client
        hangs up or the deadline passes before it starts."""
        result = asyncio.wrap_future(job)
        hangup = asyncio.ensure_future(_client_gone(request.receive))
        try:
            done, _ = await asyncio.wait(
                {result, hangup}, timeout=limits.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            hangup.cancel()
        if result in done:
            error = result.exception()
            if error is None:
                return result.result()
            if isinstance(error, DeadlinePassed):
                raise busy(f"the request waited over {limits.request_timeout_s:g} s for the model")
            if isinstance(error, RequestRefused):
                raise HTTPException(422, str(error))
            raise HTTPException(500, f"{what} failed: {_one_line(error)}")
        never_started = worker.cancel(job)  # before result.cancel(), which would cancel it uncounted
        result.cancel()
        if hangup in done:
            raise HTTPException(499, "the client closed the connection")  # nobody reads this
        if never_started:
            raise busy(f"the request waited over {limits.request_timeout_s:g} s for the model")
        raise HTTPException(504, f"{what} took longer than the {limits.request_timeout_s:g} s limit")

    @app.post("/translate", response_model=TranslateResponse, response_model_exclude_none=True)
    async def translate(body: TranslateRequest, request: Request) -> dict:
        """Translate one or more sentences (merged with concurrent requests into one model call)."""
        texts = [body.text] if body.texts is None else body.texts
        if not texts:
            raise HTTPException(422, "'texts' is empty; give at least one sentence")
        if len(texts) > limits.max_texts:
            raise HTTPException(
                422, f"{len(texts)} texts in one request; the limit is {limits.max_texts}"
            )
        check_lengths(texts, limits.max_chars)
        settings = DecodeConfig(beam_size=body.beam_size, nbest=body.nbest, length_penalty=body.length_penalty,
                                sampling_topk=body.sampling_topk, sampling_topp=body.sampling_topp,
                                temperature=body.temperature, seed=body.seed)
        job = enqueue(worker.submit_translate, texts, settings)
        results = await answer(job, "translation", request)
        response: dict[str, Any] = {"translations": [hypotheses[0][0] for hypotheses in results]}
        alignments = None
        if body.alignment:  # from the cross-attention of each hypothesis, on the worker like any model call
            flat = [(texts[i], text) for i, hypotheses in enumerate(results) for text, _ in hypotheses]
            job = enqueue(worker.submit_call, lambda: translator.align([s for s, _ in flat], [t for _, t in flat]))
            alignments = iter(await answer(job, "alignment", request))
        nbest = [[{"text": text, "score": float(score)} for text, score in hypotheses] for hypotheses in results]
        if alignments is not None:
            for hypotheses in nbest:
                for hypothesis in hypotheses:
                    hypothesis["alignment"] = next(alignments)
            response["alignments"] = [hypotheses[0]["alignment"] for hypotheses in nbest]
        if body.nbest > 1:
            response["nbest"] = nbest
        return response

    def attention_call(text: str, target: str | None) -> Any:
        """Runs on the worker: refuses a pair whose response would exceed max_attention_weights,
        before decoding where the sizes are known (always the source; the target if forced)."""
        config = translator.model.config
        source_len = min(len(translator.tokenizer.encode(text)), config.max_positions)
        target_len = 1  # at least "</s>"
        if target is not None:
            target_len = len(translator.tokenizer.encode(target)[: config.max_positions - 1]) + 1

        def check(source_len: int, target_len: int, known: bool) -> None:
            weights = attention_weights(config, source_len, target_len)
            if weights > limits.max_attention_weights:
                raise RequestRefused(
                    f"this sentence pair gives {'' if known else 'at least '}{weights} attention "
                    f"weights ({source_len} source and {target_len} target pieces, "
                    f"{config.n_encoder_layers}+{config.n_decoder_layers} layers x {config.n_heads} "
                    f"heads); the limit is {limits.max_attention_weights}: send a shorter sentence"
                )

        check(source_len, target_len, known=target is not None)
        result = translator.attention(text, target)
        check(len(result.source_tokens), len(result.target_tokens), known=True)
        for weights in (result.encoder_self, result.decoder_self, result.cross):
            if not bool(weights.isfinite().all()):
                raise RuntimeError("the model gave NaN or infinite attention weights")
        return result

    @app.post("/attention", response_model=AttentionResponse)
    async def attention(body: AttentionRequest, request: Request) -> dict:
        """Attention weights of every layer and head for one sentence (translated with beam 4
        unless `target` is given), rounded to 4 decimals; at most `max_attention_weights` numbers
        (see /info), each at most 7 bytes of JSON."""
        if not body.text.strip():
            raise HTTPException(422, "'text' is empty; attention needs a source sentence")
        check_lengths([body.text], limits.max_attention_chars)
        if body.target is not None:
            check_lengths([body.target], limits.max_attention_chars)
        job = enqueue(worker.submit_call, lambda: attention_call(body.text, body.target))
        result = await answer(job, "attention", request)
        return {
            "translation": result.translation,
            "source_tokens": list(result.source_tokens),
            "target_input_tokens": list(result.target_input_tokens),
            "target_tokens": list(result.target_tokens),
            "cross": _rounded(result.cross),
            "encoder_self": _rounded(result.encoder_self),
            "decoder_self": _rounded(result.decoder_self),
        }

    explain_model: list = []  # the float64 model of the walk, loaded on the first /explain

    def explain_call(body: Any) -> dict:
        """Runs on the worker: one kind and layer of the walk (`aiayn.explain`), for the pair the
        heatmaps show; refused when its numbers would exceed max_attention_weights."""
        from aiayn.checkpoint import load_model
        from aiayn.explain import page_data, page_numbers
        from aiayn.explain import explain as walk

        config = translator.model.config
        if getattr(translator, "model_dir", None) is None:
            raise RequestRefused("the walk needs the model directory (serve it with `aiayn serve --model DIR`)")
        layers = config.n_encoder_layers if body.kind == "encoder" else config.n_decoder_layers
        if body.layer >= layers:
            raise RequestRefused(f"layer {body.layer} out of range: the model has {layers} {body.kind} layers")

        def check(source_len: int, target_len: int, known: bool) -> None:
            numbers = page_numbers(config, source_len, target_len)
            if numbers > limits.max_attention_weights:
                raise RequestRefused(
                    f"the walk of this sentence pair holds {'' if known else 'at least '}{numbers} numbers "
                    f"({source_len} source and {target_len} target pieces); the limit is "
                    f"{limits.max_attention_weights}: send a shorter sentence")

        source_len = min(len(translator.tokenizer.encode(body.text)), config.max_positions)
        target_len = 1 if body.target is None else len(translator.tokenizer.encode(body.target)) + 1
        check(source_len, target_len, known=body.target is not None)
        maps = translator.attention(body.text, body.target)  # the pair the heatmaps show
        check(len(maps.source_tokens), len(maps.target_tokens), known=True)
        if not explain_model:
            model, tokenizer, _ = load_model(translator.model_dir)
            explain_model.append((model.double().eval(), tokenizer))
        model, tokenizer = explain_model[0]
        return page_data(walk(model, tokenizer, body.text, body.target, maps=maps), only=(body.kind, body.layer))

    @app.post("/explain")
    async def explain(body: ExplainRequest, request: Request) -> dict:
        """One sentence pair through the model, step by step (`aiayn explain`): for the chosen kind
        and layer, every head's Q, K, V, scores, scaled scores, mask, weights and output, then
        Concat, W^O, Add & Norm, FFN; the embeddings, positions and next-piece distribution. Other
        layers are null (ask for them one at a time). At most `max_attention_weights` numbers."""
        if not body.text.strip():
            raise HTTPException(422, "'text' is empty; the walk needs a source sentence")
        check_lengths([body.text], limits.max_attention_chars)
        if body.target is not None:
            check_lengths([body.target], limits.max_attention_chars)
        job = enqueue(worker.submit_call, lambda: explain_call(body))
        return await answer(job, "explain", request)

    @app.get("/health")
    async def health() -> dict:
        """Liveness and counters (`model_calls` < `requests` shows micro-batching at work;
        `queued` is the number of requests waiting, at most `max_queue`)."""
        return {
            "status": "ok" if worker.alive else "worker stopped",
            "max_queue": worker.max_queue,
            "stats": worker.snapshot(),
        }

    @app.get("/info")
    async def info() -> dict:
        """The served model: configuration, languages, sizes, server limits and counters."""
        model = translator.model
        model_info = dict(getattr(translator, "info", None) or {})
        return {
            "model": model.config.to_dict(),
            "src_lang": model_info.get("src_lang"),
            "tgt_lang": model_info.get("tgt_lang"),
            "info": model_info,
            "vocab_size": translator.tokenizer.vocab_size,
            "parameters": translator.num_parameters,
            "batching": {
                "enabled": worker.batching,
                "max_batch_sentences": worker.max_batch_sentences,
                "max_wait_ms": worker.max_wait_s * 1000.0,
            },
            "limits": {
                "max_body_bytes": limits.max_body_bytes,
                "max_chars": limits.max_chars,
                "max_texts": limits.max_texts,
                "max_attention_chars": limits.max_attention_chars,
                "max_attention_weights": limits.max_attention_weights,
                "max_beam_size": SERVER_MAX_BEAM_SIZE,
                "max_queue": limits.max_queue,
                "request_timeout_s": limits.request_timeout_s,
                "max_connections": limits.max_connections,
                "keep_alive_s": limits.keep_alive_s,
                "read_timeout_s": limits.read_timeout_s,
            },
            "stats": worker.snapshot(),
        }

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/explain.js", include_in_schema=False)
    async def explain_script() -> FileResponse:
        return FileResponse(STATIC_DIR / "explain.js", media_type="text/javascript")

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Any, error: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes each bad input, which may not be JSON at all (NaN) or not
        # encodable (a lone surrogate): the 422 then became a 500. Where and why is enough.
        detail = [
            {
                "type": entry["type"],
                "loc": [_printable(part) if isinstance(part, str) else part for part in entry["loc"]],
                "msg": _printable(entry["msg"]),
            }
            for entry in error.errors()
        ]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(_: Any, error: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        # Starlette re-raises after this response and uvicorn then closes the connection: say so,
        # or a client that reuses it has its next request (a large body: before the 413) reset.
        return JSONResponse(
            {"detail": f"internal error: {_one_line(error)}"},
            status_code=500,
            headers={"connection": "close"},
        )

    app.add_middleware(_BodySizeLimit, max_bytes=limits.max_body_bytes)
    return app


# --- running it ------------------------------------------------------------------------------


def _h11_with_read_timeout(read_timeout_s: float) -> type:
    """uvicorn's h11 protocol plus one timer: a request's headers and body must arrive within
    `read_timeout_s` of its first byte (or of the connection opening). uvicorn alone waits forever
    on a client that sends nothing, or a byte at a time (its keep-alive timer only runs between
    requests, and any byte stops it), and each such client holds one of `max_connections`."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class ReadTimeoutH11Protocol(H11Protocol):
        _read_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._read_timer = self.loop.call_later(read_timeout_s, self._read_timed_out)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _read_timed_out(self) -> None:
            self._read_timer = None
            if not self.transport.is_closing():
                logger.info("closing a connection whose request took over %g s to arrive", read_timeout_s)
                self.transport.close()  # the app, if it waits for the body, sees a disconnect

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._read_timer is None and self.conn.their_state is h11.IDLE:
                self._arm()  # the first byte of the next request on a kept-alive connection
            super().data_received(data)
            if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
                self._disarm()  # the whole request is in (or the connection is done)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return ReadTimeoutH11Protocol


def uvicorn_settings(limits: ServerLimits) -> dict[str, Any]:
    """The `uvicorn.Config` keywords that apply `limits` to connections (serve and
    background_server both use them)."""
    return {
        "limit_concurrency": limits.max_connections,
        "timeout_keep_alive": limits.keep_alive_s,
        "http": _h11_with_read_timeout(limits.read_timeout_s),
    }


@contextlib.contextmanager
def background_server(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` with uvicorn in a daemon thread (for tests and benchmarks); yields its base URL.

    Port 0 picks a free port; the socket is bound here, so there is no race for it. The
    connection limits are those of `app.state.limits` (as `serve` sets them).
    """
    _require_fastapi()
    import uvicorn

    limits = getattr(app.state, "limits", None) or ServerLimits()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="on", **uvicorn_settings(limits))
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def serve(
    model_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_sentences: int = MAX_BATCH_SENTENCES,
    max_wait_ms: float = MAX_WAIT_MS,
    batching: bool = True,
    device: str = "cpu",
    precision: str = "auto",
    compile: bool = False,
    limits: ServerLimits | None = None,
) -> None:
    """Load the model in `model_dir` and serve it until interrupted (`aiayn serve`).

    precision / compile: as `Translator.load` takes them; "auto" is resolved once, at start.
    limits: request, queue and connection bounds (default `ServerLimits()`)."""
    _require_fastapi()
    import uvicorn

    from aiayn.translator import Translator

    limits = limits or ServerLimits()
    translator = Translator.load(model_dir, device=device, precision=precision, compile=compile)
    if not translator.precision_choice.warning:  # a warning has been printed already
        print(translator.precision_choice.message, file=sys.stderr, flush=True)
    app = create_app(
        translator,
        max_batch_sentences=max_batch_sentences,
        max_wait_ms=max_wait_ms,
        batching=batching,
        limits=limits,
    )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host=host, port=port, log_level="info", **uvicorn_settings(limits))


__all__ = [
    "BYTES_PER_WEIGHT",
    "BatchingWorker",
    "DeadlinePassed",
    "MAX_BATCH_SENTENCES",
    "MAX_WAIT_MS",
    "RequestRefused",
    "ServerBusy",
    "ServerLimits",
    "attention_weights",
    "background_server",
    "create_app",
    "serve",
]
