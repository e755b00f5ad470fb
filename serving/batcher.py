"""Micro-batching for the deep path: featurize + TorchScript forward on one worker thread.

Requests submit posts one at a time; the worker takes up to `max_size` of them, or what has
arrived `max_wait_s` after the oldest one was submitted, whichever comes first, and runs them
as one batch off the event loop. One thread does all featurization and inference on purpose:
the tokenizer and the sentence model are shared per process and are not safe to call from
several threads at once, and on a few cores a second inference thread would only compete
for the same cores as torch's own intra-op threads.

Two kinds of job:
- `predict` jobs (a request waits on them) are featurized and scored by the model;
- background jobs (drift samples of gate-decided posts) are only featurized, one at a time
  and only when no request is waiting, and dropped (with a metric) when their queue is full.

Each job carries the bundle it was started on, so posts of a request that began before a hot
reload are scored by the old model; a batch never mixes bundles.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.errors import Overloaded

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class Job:
    bundle: Any
    text: str
    image: np.ndarray | None
    predict: bool
    done: Callable[[Any], None]   # called once on the worker thread with a DeepResult or exception
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class DeepResult:
    p_ad: float | None
    sensitivity: float | None
    score: float | None
    features: dict[str, np.ndarray]   # this post's row of every FeaturePipeline array
    queued_s: float                   # submit -> batch start
    batch_s: float                    # the batch's featurize + forward time
    batch_size: int


# (bundle, jobs) -> one DeepResult per job, in order
RunBatch = Callable[[Any, Sequence[Job]], list[DeepResult]]


class MicroBatcher:
    def __init__(
        self,
        run_batch: RunBatch,
        max_size: int,
        max_wait_s: float,
        max_queue: int,
        background_limit: int = 256,
        on_batch: Callable[[int, float, bool], None] | None = None,
    ) -> None:
        if max_size < 1:
            raise ValueError(f"serve.batch.max_size must be at least 1, got {max_size}")
        self.run_batch = run_batch
        self.max_size = max_size
        self.max_wait_s = max(0.0, max_wait_s)
        self.max_queue = max_queue
        self._queue: queue.Queue[Any] = queue.Queue()
        self._background: collections.deque[Job] = collections.deque()
        self._background_limit = background_limit
        self._lock = threading.Lock()
        self._pending = 0
        self._thread: threading.Thread | None = None
        self._on_batch = on_batch
        self.dropped_background = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="deep-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Finish every queued job (requests and drift samples), then stop the worker."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("the deep-model worker did not stop within %.0f s", timeout)
        self._thread = None

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def background_pending(self) -> int:
        return len(self._background)

    # ------------------------------------------------------------------ submitting

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._pending >= self.max_queue:
                raise Overloaded(f"the deep-model queue ({self.max_queue} posts, serve.batch.max_queue)")
            self._pending += 1
        self._queue.put(job)

    def submit_background(self, job: Job) -> bool:
        """Queue a featurize-only job; False (and nothing queued) when the queue is full."""
        with self._lock:
            if len(self._background) >= self._background_limit or self._thread is None:
                self.dropped_background += 1
                return False
            self._background.append(job)
        self._queue.put(None)  # wakes an idle worker
        return True

    async def predict(self, bundle: Any, text: str, image: np.ndarray | None) -> DeepResult:
        """Score one post in the next batch; the event loop is free while it waits."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[DeepResult] = loop.create_future()

        def done(result: Any) -> None:
            loop.call_soon_threadsafe(_resolve, future, result)

        self.submit(Job(bundle, text, image, True, done))
        return await future

    def run_sync(self, bundle: Any, texts: Sequence[str], images: Sequence[np.ndarray | None],
                 timeout: float = 300.0) -> list[DeepResult]:
        """Score posts on the worker thread from another thread (a bundle's warm-up)."""
        futures = []
        for text, image in zip(texts, images, strict=True):
            fut: concurrent.futures.Future[DeepResult] = concurrent.futures.Future()

            def done(result: Any, fut: concurrent.futures.Future = fut) -> None:
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

            self.submit(Job(bundle, text, image, True, done))
            futures.append(fut)
        return [f.result(timeout) for f in futures]

    # ------------------------------------------------------------------ the worker

    def _run(self) -> None:
        stopping = False
        while True:
            batch: list[Job] = []
            try:
                first = self._queue.get(timeout=None if not stopping else 0.0)
            except queue.Empty:
                first = None
                if stopping and not self._background:
                    return
            if first is _STOP:
                stopping = True
            elif first is not None:
                batch.append(first)
                deadline = first.submitted + self.max_wait_s
                while len(batch) < self.max_size:
                    remaining = deadline - time.perf_counter()
                    try:
                        item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stopping = True
                        break
                    if item is not None:
                        batch.append(item)
            if batch:
                with self._lock:
                    self._pending -= len(batch)
                self._execute(batch, background=False)
                continue
            if self._background and self._queue.empty():
                # One post at a time: a request that arrives meanwhile waits for one post's
                # featurization at most, not for a whole batch of drift samples.
                with self._lock:
                    take = [self._background.popleft()]
                self._execute(take, background=True)
            elif stopping and self._queue.empty() and not self._background:
                return

    def _execute(self, jobs: list[Job], background: bool) -> None:
        groups: dict[int, list[Job]] = {}
        for job in jobs:
            groups.setdefault(id(job.bundle), []).append(job)
        for group in groups.values():
            start = time.perf_counter()
            try:
                results = self.run_batch(group[0].bundle, group)
            except Exception as exc:  # delivered to every waiting request, which answers 500
                log.exception("deep-model batch of %d posts failed", len(group))
                for job in group:
                    _deliver(job, exc)
                continue
            elapsed = time.perf_counter() - start
            if self._on_batch is not None:
                self._on_batch(len(group), elapsed, background)
            for job, result in zip(group, results, strict=True):
                result.queued_s = start - job.submitted
                result.batch_s = elapsed
                result.batch_size = len(group)
                _deliver(job, result)


def _deliver(job: Job, result: Any) -> None:
    try:
        job.done(result)
    except Exception:
        log.exception("delivering a deep-model result failed")


def _resolve(future: asyncio.Future, result: Any) -> None:
    if future.done():  # the request was cancelled (client went away)
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
