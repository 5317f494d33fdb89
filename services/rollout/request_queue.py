"""The bounded queue between HTTP requests and the backend.

Requests wait here; worker threads hand them to the backend in batches (up to `max_batch` prompts
per call, `backend.concurrent_batches` calls at once). A full queue refuses new work at once
(`QueueFull`, HTTP 429) instead of letting memory and latency grow without bound; a request that
waited longer than `timeout_s` is failed with `QueueTimeout` (HTTP 503) rather than started late.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from . import metrics
from .backend import GroupResult, PromptInput, SamplingParams

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    pass


class QueueTimeout(RuntimeError):
    pass


@dataclass
class Job:
    prompt: PromptInput
    params: SamplingParams
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


class GenerationQueue:
    def __init__(self, backend, max_queue: int, max_batch: int, timeout_s: float):
        self.backend = backend
        self.max_queue, self.max_batch, self.timeout_s = max_queue, max_batch, timeout_s
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._running = 0

    def start(self) -> "GenerationQueue":
        for i in range(max(1, getattr(self.backend, "concurrent_batches", 1))):
            thread = threading.Thread(target=self._work, name=f"generate-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        with self._cond:  # nobody will run what is left: fail it rather than leave callers waiting
            while self._jobs:
                self._jobs.popleft().future.set_exception(QueueTimeout("the server is shutting down"))

    def depth(self) -> int:
        """Prompts waiting."""
        with self._cond:
            return len(self._jobs)

    def running(self) -> int:
        """Prompts handed to the backend and not finished."""
        with self._cond:
            return self._running

    def submit(self, prompt: PromptInput, params: SamplingParams) -> Future:
        """Queue one prompt; the future resolves to its GroupResult. Raises QueueFull at once."""
        job = Job(prompt, params)
        with self._cond:
            if len(self._jobs) >= self.max_queue:
                metrics.REJECTED.labels("queue_full").inc()
                raise QueueFull(f"the generation queue is full ({self.max_queue} requests waiting)")
            self._jobs.append(job)
            metrics.QUEUE_DEPTH.set(len(self._jobs))
            self._cond.notify()
        return job.future

    def _take(self) -> list[Job]:
        """Up to max_batch jobs that have not waited too long; the expired ones are failed."""
        with self._cond:
            while not self._jobs and not self._stop.is_set():
                self._cond.wait(0.5)
            batch: list[Job] = []
            now = time.monotonic()
            while self._jobs and len(batch) < self.max_batch:
                job = self._jobs.popleft()
                if now - job.enqueued > self.timeout_s:
                    metrics.REJECTED.labels("queue_timeout").inc()
                    job.future.set_exception(QueueTimeout(f"waited over {self.timeout_s:g}s in the queue"))
                elif job.future.set_running_or_notify_cancel():
                    batch.append(job)
            metrics.QUEUE_DEPTH.set(len(self._jobs))
            return batch

    def _work(self) -> None:
        while not self._stop.is_set():
            batch = self._take()
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        self._count_running(len(batch))
        started = time.perf_counter()
        try:
            results = self.backend.generate([j.prompt for j in batch], [j.params for j in batch])
        except Exception as exc:  # the backend failed the whole call: every caller hears why
            log.exception("generation failed for a batch of %d", len(batch))
            for job in batch:
                job.future.set_exception(exc)
            return
        finally:
            self._count_running(-len(batch))
        record_generation(results, time.perf_counter() - started)
        for job, result in zip(batch, results):
            job.future.set_result(result)

    def _count_running(self, delta: int) -> None:
        with self._cond:
            self._running += delta
        metrics.IN_FLIGHT.inc(delta)


def record_generation(results: list[GroupResult], seconds: float) -> None:
    """Token counters and the tokens/s gauge, for API batches and training groups alike."""
    tokens = sum(len(c.token_ids) for r in results for c in r.completions)
    metrics.TOKENS.inc(tokens)
    metrics.PROMPT_TOKENS.inc(sum(len(r.prompt_ids) for r in results))
    if seconds > 0:
        metrics.TOKENS_PER_SECOND.set(tokens / seconds)
