"""The HTTP API's routes, in groups that `create_app` adds one by one; `Gate` turns the limits and
the worker's outcomes into HTTP statuses.

Imported only once FastAPI is known to be installed (`create_app` checks first).
"""

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse

from aiayn.allocator import allocation_failure
from aiayn.config import SERVER_MAX_BEAM_SIZE, DecodeConfig
from aiayn.decoding.sentences import hypothesis_alignments, join_translations, split_lines
from aiayn.serve.http import client_gone, one_line
from aiayn.serve.limits import RETRY_AFTER_S, ServerLimits, attention_weights, decoding_bytes
from aiayn.serve.schemas import (
    AttentionRequest,
    AttentionResponse,
    ExplainRequest,
    TranslateRequest,
    TranslateResponse,
)
from aiayn.serve.worker import BatchingWorker, DeadlinePassed, RequestRefused, ServerBusy

STATIC_DIR = Path(__file__).parent.parent / "static"


class Gate:
    """Admission control shared by the routes: length checks (422), queueing with a deadline (503
    when the queue is full) and waiting for the answer (503 if it never started in time, 504 if it
    was being computed, 422 for `RequestRefused`, 500 for a failed model call)."""

    def __init__(self, worker: BatchingWorker, limits: ServerLimits) -> None:
        self.worker = worker
        self.limits = limits

    @staticmethod
    def check_lengths(texts: list[str], max_chars: int) -> None:
        for index, text in enumerate(texts):
            if len(text) > max_chars:
                where = f"text {index}" if len(texts) > 1 else "text"
                raise HTTPException(
                    422,
                    f"{where} has {len(text)} characters; the limit is {max_chars} per sentence",
                )

    @staticmethod
    def busy(reason: str) -> HTTPException:
        return HTTPException(
            503, f"the server is busy: {reason}; retry later", headers={"Retry-After": str(RETRY_AFTER_S)}
        )

    def enqueue(self, submit_job: Callable[..., Future], *args: Any) -> Future:
        try:
            return submit_job(*args, deadline=time.monotonic() + self.limits.request_timeout_s)
        except ServerBusy as error:
            raise self.busy(str(error)) from None

    async def answer(self, job: Future, what: str, request: Request) -> Any:
        """The job's result, or the HTTP error that says why not; drops the job if the client
        hangs up or the deadline passes before it starts."""
        timeout_s = self.limits.request_timeout_s
        result = asyncio.wrap_future(job)
        hangup = asyncio.ensure_future(client_gone(request.receive))
        try:
            done, _ = await asyncio.wait({result, hangup}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
        if result in done:
            error = result.exception()
            if error is None:
                return result.result()
            if isinstance(error, DeadlinePassed):
                raise self.busy(f"the request waited over {timeout_s:g} s for the model")
            if isinstance(error, RequestRefused):
                raise HTTPException(422, str(error))
            if allocation_failure(error) is not None:  # the server lives on; this work does not fit
                raise HTTPException(503, f"not enough memory for this request ({what}): send fewer or shorter "
                                         "sentences or a smaller beam", headers={"Retry-After": str(RETRY_AFTER_S)})
            raise HTTPException(500, f"{what} failed: {one_line(error)}")
        never_started = self.worker.cancel(job)  # before result.cancel(), which would cancel it uncounted
        result.cancel()
        if hangup in done:
            raise HTTPException(499, "the client closed the connection")  # nobody reads this
        if never_started:
            raise self.busy(f"the request waited over {timeout_s:g} s for the model")
        raise HTTPException(504, f"{what} took longer than the {timeout_s:g} s limit")


def check_memory(translator: Any, texts: list[str], settings: DecodeConfig, max_mb: int) -> None:
    """413 for a request whose decoding would hold more than `max_mb` (`decoding_bytes`)."""
    lengths = [len(ids) for ids in translator.tokenizer.encode_batch(texts)]
    rows = settings.nbest if settings.sampling else max(settings.beam_size, settings.nbest)
    needed = decoding_bytes(translator.model.config, lengths, rows, settings.max_len_a, settings.max_len_b,
                            sampling=settings.sampling)
    if needed > max_mb * 2**20:
        raise HTTPException(413, f"this request's decoding would hold about {needed / 2**20:,.0f} MB ({len(texts)} "
                                 f"sentences, the longest {max(lengths)} pieces, {rows} beams or samples each); "
                                 f"the limit is {max_mb} MB: send fewer or shorter sentences or a smaller beam")


def add_translate_route(app: FastAPI, gate: Gate, translator: Any) -> None:
    """POST /translate: one or more sentences, merged with concurrent requests into one model call."""
    limits, worker = gate.limits, gate.worker

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
        gate.check_lengths(texts, limits.max_chars)
        settings = DecodeConfig(beam_size=body.beam_size, nbest=body.nbest, length_penalty=body.length_penalty,
                                sampling_topk=body.sampling_topk, sampling_topp=body.sampling_topp,
                                temperature=body.temperature, seed=body.seed)
        split = split_lines(texts, translator.info.get("src_lang")) if body.split_sentences else None
        sentences = texts if split is None else split.sentences
        if len(sentences) > limits.max_texts:  # the limit counts what is decoded: sentences
            raise HTTPException(422, f"the texts hold {len(sentences)} sentences; the limit is {limits.max_texts}")
        if sentences:
            check_memory(translator, sentences, settings, limits.max_request_mb)
            job = gate.enqueue(worker.submit_translate, sentences, settings)
            per_sentence = await gate.answer(job, "translation", request)
        else:  # blank texts only, split into no sentences
            per_sentence = []
        results = per_sentence if split is None else join_translations(split, per_sentence)
        response: dict[str, Any] = {"translations": [hypotheses[0][0] for hypotheses in results]}
        alignments = None
        if body.alignment:  # from the cross-attention of each hypothesis, on the worker like any model call
            if split is None:
                flat = [(texts[i], text) for i, hypotheses in enumerate(results) for text, _ in hypotheses]
                job = gate.enqueue(worker.submit_call,
                                   lambda: translator.align([s for s, _ in flat], [t for _, t in flat]))
            else:
                job = gate.enqueue(worker.submit_call, lambda: [
                    alignment for line in hypothesis_alignments(split, per_sentence, translator.align)
                    for alignment in line])
            alignments = iter(await gate.answer(job, "alignment", request))
        nbest = [[{"text": text, "score": float(score)} for text, score in hypotheses] for hypotheses in results]
        if alignments is not None:
            for hypotheses in nbest:
                for hypothesis in hypotheses:
                    hypothesis["alignment"] = next(alignments)
            response["alignments"] = [hypotheses[0]["alignment"] for hypotheses in nbest]
        if body.nbest > 1:
            response["nbest"] = nbest
        return response


def _rounded(weights: Any, decimals: int = 4) -> list:
    """A tensor as nested lists of floats rounded to `decimals` (keeps /attention responses small)."""
    return weights.double().round(decimals=decimals).tolist()  # float64: prints as 0.1234


def _check_pair(gate: Gate, body: AttentionRequest, what: str) -> None:
    """422 for an empty or too long /attention or /explain sentence pair, before it is queued."""
    if not body.text.strip():
        raise HTTPException(422, f"'text' is empty; {what} needs a source sentence")
    gate.check_lengths([body.text], gate.limits.max_attention_chars)
    if body.target is not None:
        gate.check_lengths([body.target], gate.limits.max_attention_chars)


def add_attention_routes(app: FastAPI, gate: Gate, translator: Any) -> None:
    """POST /attention (every layer's and head's weights) and POST /explain (one layer of the
    step-by-step walk); both bounded by `max_attention_weights`."""
    limits, worker = gate.limits, gate.worker

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
        _check_pair(gate, body, "attention")
        job = gate.enqueue(worker.submit_call, lambda: attention_call(body.text, body.target))
        result = await gate.answer(job, "attention", request)
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
        from aiayn.files.checkpoint import load_model
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
        _check_pair(gate, body, "the walk")
        job = gate.enqueue(worker.submit_call, lambda: explain_call(body))
        return await gate.answer(job, "explain", request)


def add_status_routes(app: FastAPI, worker: BatchingWorker, translator: Any, limits: ServerLimits) -> None:
    """GET /health (liveness and counters) and GET /info (the model, the limits, the counters)."""

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


def add_page_routes(app: FastAPI) -> None:
    """GET / and /explain.js: the single static page (src/aiayn/static/), outside the OpenAPI schema."""

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/explain.js", include_in_schema=False)
    async def explain_script() -> FileResponse:
        return FileResponse(STATIC_DIR / "explain.js", media_type="text/javascript")


__all__ = ["Gate", "STATIC_DIR", "add_attention_routes", "add_page_routes", "add_status_routes",
           "add_translate_route"]
