"""The application: `create_app` assembles the worker, the routes and the plumbing; `serve` runs
it with uvicorn (`aiayn serve --model DIR`)."""

import asyncio
import contextlib
import logging
import sys
from pathlib import Path
from typing import Any

from aiayn.serve.http import BodySizeLimit, add_error_handlers, require_fastapi, uvicorn_settings
from aiayn.serve.limits import MAX_BATCH_SENTENCES, MAX_WAIT_MS, ServerLimits
from aiayn.serve.worker import BatchingWorker


def _fastapi_app(worker: BatchingWorker) -> Any:
    """An empty FastAPI application whose lifespan starts and stops `worker`'s thread."""
    from fastapi import FastAPI

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> Any:
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    return FastAPI(
        title="aiayn translation server",
        description="Transformer (Vaswani et al., 2017) translation with micro-batching.",
        lifespan=lifespan,
    )


def create_app(
    translator: Any,
    *,
    max_batch_sentences: int = MAX_BATCH_SENTENCES,
    max_wait_ms: float = MAX_WAIT_MS,
    batching: bool = True,
    limits: ServerLimits | None = None,
) -> Any:
    """The FastAPI application serving `translator` (an `aiayn.decoding.translator.Translator`).

    The batching worker thread starts and stops with the application's lifespan.

    Raises:
        RuntimeError: if FastAPI is not installed.
        ValueError: on a bad batching setting.
    """
    require_fastapi()
    from aiayn.serve import routes

    limits = limits or ServerLimits()
    worker = BatchingWorker(
        translator,
        max_batch_sentences=max_batch_sentences,
        max_wait_ms=max_wait_ms,
        batching=batching,
        max_queue=limits.max_queue,
    )
    app = _fastapi_app(worker)
    app.state.worker = worker
    app.state.translator = translator
    app.state.limits = limits

    gate = routes.Gate(worker, limits)
    routes.add_translate_route(app, gate, translator)
    routes.add_attention_routes(app, gate, translator)
    routes.add_status_routes(app, worker, translator, limits)
    routes.add_page_routes(app)
    add_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    return app


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
    require_fastapi()
    import uvicorn

    from aiayn.allocator import bound_kernel_caches
    from aiayn.decoding.translator import Translator

    bound_kernel_caches()  # a server meets new shapes for hours: keep its memory flat
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


__all__ = ["create_app", "serve"]
