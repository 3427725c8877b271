"""HTTP API and web page: `aiayn serve --model DIR`.

Endpoints (OpenAPI docs at `/docs`):
    POST /translate   {"text": str} or {"texts": [str]}, optional beam_size, nbest, length_penalty
    POST /attention   {"text": str, "target": str | null} -> tokens and attention weights
    GET  /health      liveness plus request / model-call counters
    GET  /info        model config, languages, vocabulary and parameter counts, limits, counters
    GET  /            the single static page (src/aiayn/static/index.html)

The model is not thread-safe, so one worker thread owns it. Requests put jobs on a queue; the
worker takes up to `max_batch_sentences` sentences, waiting at most `max_wait_ms` for more,
groups them by decode settings and runs one `Translator.translate` call per group (micro-batching).
The parallel work happens inside torch's intra-op threads; the event loop only waits on futures.

FastAPI and uvicorn are the optional extra `aiayn[serve]` and are imported lazily.
"""

import asyncio
import contextlib
import logging
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

from aiayn.config import DecodeConfig

STATIC_DIR = Path(__file__).parent / "static"
MAX_BEAM_SIZE = 16

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
    """Bounds on one request; larger requests are refused (413 or 422) before reaching the model."""

    max_body_bytes: int = 64 * 1024
    max_chars: int = 1000  # per sentence
    max_texts: int = 64  # sentences per /translate request
    max_attention_chars: int = 300  # /attention returns O(layers * heads * length^2) numbers

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_chars", "max_texts", "max_attention_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


# --- micro-batching worker -------------------------------------------------------------------


# Micro-batching defaults, shared by `BatchingWorker`, `create_app`, `serve` and `aiayn serve`.
MAX_BATCH_SENTENCES = 32
MAX_WAIT_MS = 5.0


@dataclass
class _TranslateJob:
    sentences: list[str]
    settings: DecodeConfig
    future: Future = field(default_factory=Future)


@dataclass
class _CallJob:
    """Any other use of the model (attention); runs alone, in order with the translations."""

    function: Callable[[], Any]
    future: Future = field(default_factory=Future)


_STOP = object()


class BatchingWorker:
    """One thread that owns the translator and merges concurrent translation requests.

    With `batching=False` every request gets its own `translate` call (still on the one thread),
    which is the baseline `benchmarks/serve_load.py` compares against.
    """

    def __init__(
        self,
        translator: Any,
        *,
        max_batch_sentences: int = MAX_BATCH_SENTENCES,
        max_wait_ms: float = MAX_WAIT_MS,
        batching: bool = True,
    ) -> None:
        if max_batch_sentences < 1:
            raise ValueError(f"max_batch_sentences must be >= 1, got {max_batch_sentences}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.translator = translator
        self.max_batch_sentences = max_batch_sentences
        self.max_wait_s = max_wait_ms / 1000.0
        self.batching = batching
        self._queue: queue.Queue = queue.Queue()
        self._held: Any = None  # a job taken while collecting that belongs to the next batch
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "sentences": 0, "model_calls": 0, "errors": 0}

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

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.stats)

    def submit_translate(self, sentences: list[str], settings: DecodeConfig) -> Future:
        job = _TranslateJob(list(sentences), settings)
        with self._lock:
            self.stats["requests"] += 1
            self.stats["sentences"] += len(sentences)
        self._queue.put(job)
        return job.future

    def submit_call(self, function: Callable[[], Any]) -> Future:
        job = _CallJob(function)
        self._queue.put(job)
        return job.future

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

    def _collect(self, first: _TranslateJob) -> list[_TranslateJob]:
        """`first` plus whatever arrives within max_wait, up to max_batch_sentences sentences.
        A job is never split; one that would overflow the batch waits for the next."""
        jobs, count = [first], len(first.sentences)
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
            jobs.append(job)
            count += len(job.sentences)
        return jobs

    def _loop(self) -> None:
        while True:
            job = self._next_job(None)
            if job is _STOP:
                return
            if isinstance(job, _CallJob):
                try:
                    job.future.set_result(self._run(job.function))
                except Exception as error:  # noqa: BLE001 - reported to the request as a 500
                    job.future.set_exception(error)
                continue
            groups: dict[DecodeConfig, list[_TranslateJob]] = {}
            for member in self._collect(job):
                groups.setdefault(member.settings, []).append(member)
            for settings, members in groups.items():
                self._translate_group(settings, members)

    def _translate_group(self, settings: DecodeConfig, jobs: list[_TranslateJob]) -> None:
        sentences = [sentence for job in jobs for sentence in job.sentences]

        def call() -> list[list[tuple[str, float]]]:
            return self.translator.translate(sentences, settings, return_scores=True)

        try:
            results = self._run(call)
        except Exception as error:  # noqa: BLE001 - reported to each waiting request as a 500
            for job in jobs:
                job.future.set_exception(error)
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
        except Exception:
            logger.exception("model call failed")
            with self._lock:
                self.stats["errors"] += 1
            raise


# --- the application -------------------------------------------------------------------------


class _BodySizeLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with 413, before any parsing.

    Checks Content-Length up front and also counts the bytes of chunked bodies (which have none).
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
            messages.append(message)
            if message["type"] != "http.request":
                break
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
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import FileResponse, JSONResponse

    from aiayn.server_schemas import AttentionRequest, AttentionResponse, TranslateRequest, TranslateResponse

    limits = limits or ServerLimits()
    worker = BatchingWorker(
        translator,
        max_batch_sentences=max_batch_sentences,
        max_wait_ms=max_wait_ms,
        batching=batching,
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

    async def wait(future: Future, what: str) -> Any:
        try:
            return await asyncio.wrap_future(future)
        except Exception as error:
            raise HTTPException(500, f"{what} failed: {type(error).__name__}: {error}") from error

    @app.post("/translate", response_model=TranslateResponse, response_model_exclude_none=True)
    async def translate(request: TranslateRequest) -> dict:
        """Translate one or more sentences (merged with concurrent requests into one model call)."""
        texts = [request.text] if request.texts is None else request.texts
        if not texts:
            raise HTTPException(422, "'texts' is empty; give at least one sentence")
        if len(texts) > limits.max_texts:
            raise HTTPException(
                422, f"{len(texts)} texts in one request; the limit is {limits.max_texts}"
            )
        check_lengths(texts, limits.max_chars)
        settings = DecodeConfig(beam_size=request.beam_size, nbest=request.nbest,
                                length_penalty=request.length_penalty)
        results = await wait(worker.submit_translate(texts, settings), "translation")
        response: dict[str, Any] = {"translations": [hypotheses[0][0] for hypotheses in results]}
        if request.nbest > 1:
            response["nbest"] = [
                [{"text": text, "score": float(score)} for text, score in hypotheses]
                for hypotheses in results
            ]
        return response

    @app.post("/attention", response_model=AttentionResponse)
    async def attention(request: AttentionRequest) -> dict:
        """Attention weights of every layer and head for one sentence (translated with beam 4
        unless `target` is given), rounded to 4 decimals."""
        if not request.text.strip():
            raise HTTPException(422, "'text' is empty; attention needs a source sentence")
        check_lengths([request.text], limits.max_attention_chars)
        if request.target is not None:
            check_lengths([request.target], limits.max_attention_chars)
        result = await wait(
            worker.submit_call(lambda: translator.attention(request.text, request.target)),
            "attention",
        )
        return {
            "translation": result.translation,
            "source_tokens": list(result.source_tokens),
            "target_input_tokens": list(result.target_input_tokens),
            "target_tokens": list(result.target_tokens),
            "cross": _rounded(result.cross),
            "encoder_self": _rounded(result.encoder_self),
            "decoder_self": _rounded(result.decoder_self),
        }

    @app.get("/health")
    async def health() -> dict:
        """Liveness and counters (`model_calls` < `requests` shows micro-batching at work)."""
        return {"status": "ok", "stats": worker.snapshot()}

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
                "max_beam_size": MAX_BEAM_SIZE,
            },
            "stats": worker.snapshot(),
        }

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.exception_handler(Exception)
    async def unexpected(_: Any, error: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return JSONResponse(
            {"detail": f"internal error: {type(error).__name__}: {error}"}, status_code=500
        )

    app.add_middleware(_BodySizeLimit, max_bytes=limits.max_body_bytes)
    return app


# --- running it ------------------------------------------------------------------------------


@contextlib.contextmanager
def background_server(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` with uvicorn in a daemon thread (for tests and benchmarks); yields its base URL.

    Port 0 picks a free port; the socket is bound here, so there is no race for it.
    """
    _require_fastapi()
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
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
) -> None:
    """Load the model in `model_dir` and serve it until interrupted (`aiayn serve`).

    precision / compile: as `Translator.load` takes them; "auto" is resolved once, at start."""
    _require_fastapi()
    import uvicorn

    from aiayn.translator import Translator

    translator = Translator.load(model_dir, device=device, precision=precision, compile=compile)
    if not translator.precision_choice.warning:  # a warning has been printed already
        print(translator.precision_choice.message, file=sys.stderr, flush=True)
    app = create_app(
        translator,
        max_batch_sentences=max_batch_sentences,
        max_wait_ms=max_wait_ms,
        batching=batching,
    )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host=host, port=port, log_level="info")


__all__ = [
    "BatchingWorker",
    "MAX_BATCH_SENTENCES",
    "MAX_WAIT_MS",
    "ServerLimits",
    "background_server",
    "create_app",
    "serve",
]
