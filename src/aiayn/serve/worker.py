"""The micro-batching worker: one thread owns the model (which is not thread-safe).

Requests put jobs on a queue; the worker takes up to `max_batch_sentences` sentences, waiting at
most `max_wait_ms` for more, groups them by decode settings and runs one `Translator.translate`
call per group. One request that fails a batched call fails alone (the others of its batch are
run again without it). The parallel work happens inside torch's intra-op threads.
"""

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from aiayn.config import DecodeConfig
from aiayn.serve.limits import MAX_BATCH_SENTENCES, MAX_WAIT_MS, ServerLimits

logger = logging.getLogger(__name__)


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


__all__ = ["BatchingWorker", "DeadlinePassed", "RequestRefused", "ServerBusy"]
