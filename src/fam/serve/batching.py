"""Dynamic batching: one worker thread owns the model and embeds queued requests together.

Requests (each a few inputs) are queued; the worker takes the first one, then keeps taking
more until the batch holds ``max_batch`` inputs or ``max_wait_ms`` has passed, embeds them in
one call and hands each request its rows. Under load the queue fills while a forward runs, so
batches grow with the load and one forward's fixed cost is shared by many requests. A request
larger than ``max_batch`` runs alone in chunks of ``max_batch``. Only the worker touches the
model, so no locks are needed around it.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)

#: ``encode(items, images) -> (n, d) tensor``: the model call the worker makes.
EncodeFn = Callable[[Sequence, Sequence], torch.Tensor]


class QueueFull(Exception):
    """The request queue is full (the server answers 503)."""


@dataclass
class _Job:
    items: list
    images: list
    future: Future = field(default_factory=Future)
    #: A call run alone on the worker thread instead of an encode (:meth:`BatchEncoder.call`).
    fn: Callable[[], object] | None = None


@dataclass
class BatchStats:
    """Counters of what the worker did (exposed on ``/health``)."""

    requests: int = 0
    inputs: int = 0
    batches: int = 0
    max_batch_seen: int = 0


_STOP = object()


class BatchEncoder:
    """The model worker.

    Args:
        encode: embeds a list of items with their images (runs on the worker thread only).
        max_batch: most inputs per call of ``encode``.
        max_wait_ms: longest wait for a batch to fill once its first request is taken.
        max_queue: most queued requests; :meth:`submit` raises :class:`QueueFull` beyond.
    """

    def __init__(self, encode: EncodeFn, max_batch: int = 32, max_wait_ms: float = 2.0,
                 max_queue: int = 1024):
        self.encode = encode
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self._pending: _Job | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="fam-model-worker", daemon=True)
        self._thread.start()

    def submit(self, items: list, images: list) -> Future:
        """Queue one request; the future resolves to its (n, d) embeddings."""
        return self._put(_Job(list(items), list(images)))

    def call(self, fn: Callable[[], object]) -> Future:
        """Queue ``fn()`` to run alone on the worker thread (work that uses the model or its
        tokenizer but is not a plain encode); the future resolves to its result."""
        return self._put(_Job([], [], fn=fn))

    def _put(self, job: _Job) -> Future:
        if self._closed:
            raise QueueFull("the server is shutting down")
        try:
            self._q.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._q.maxsize} requests are already waiting") from None
        return job.future

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop taking requests, finish the queued ones, stop the worker."""
        if self._closed:
            return
        self._closed = True
        self._q.put(_STOP)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker
    def _next(self, timeout: float | None) -> object | None:
        if self._pending is not None:
            job, self._pending = self._pending, None
            return job
        try:
            return self._q.get(timeout=timeout) if timeout is None or timeout > 0 \
                else self._q.get_nowait()
        except queue.Empty:
            return None

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._next(None)
            if first is _STOP:
                break
            if first.fn is not None:
                self._call(first)
                continue
            group, n = [first], len(first.items)
            deadline = time.monotonic() + self.max_wait
            while n < self.max_batch:
                job = self._next(deadline - time.monotonic())
                if job is None:
                    break
                if job is _STOP:
                    stop = True
                    break
                if job.fn is not None or n + len(job.items) > self.max_batch:
                    self._pending = job  # starts the next batch
                    break
                group.append(job)
                n += len(job.items)
            self._process(group)
        # Drain: requests queued before close() still get their answer.
        while (job := self._next(0)) is not None:
            if job is not _STOP:
                self._call(job) if job.fn is not None else self._process([job])

    def _call(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.fn())
        except Exception as e:  # noqa: BLE001 - the caller gets it
            job.future.set_exception(e)
        self.stats.requests += 1

    def _process(self, group: list[_Job]) -> None:
        live = [j for j in group if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        items = [it for j in live for it in j.items]
        images = [im for j in live for im in j.images]
        try:
            emb = self._encode_chunks(items, images)
        except Exception as e:  # noqa: BLE001 - isolate the request that fails
            if len(live) == 1:
                live[0].future.set_exception(e)
                return
            for j in live:  # one bad request must not fail the others batched with it
                try:
                    j.future.set_result(self._encode_chunks(j.items, j.images))
                except Exception as e1:  # noqa: BLE001
                    j.future.set_exception(e1)
            return
        s = self.stats
        s.requests += len(live)
        s.inputs += len(items)
        s.max_batch_seen = max(s.max_batch_seen, len(items))
        start = 0
        for j in live:
            j.future.set_result(emb[start:start + len(j.items)])
            start += len(j.items)

    def _encode_chunks(self, items: list, images: list) -> torch.Tensor:
        outs = []
        for i in range(0, len(items), self.max_batch):
            outs.append(self.encode(items[i:i + self.max_batch], images[i:i + self.max_batch]))
            self.stats.batches += 1
        return torch.cat(outs)

