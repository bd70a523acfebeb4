"""Dynamic batching: concurrent requests are grouped, each gets its own rows, failures isolated."""
from __future__ import annotations

import threading

import pytest
import torch

from fam.serve.batching import BatchEncoder, QueueFull


class _Model:
    """Stands for the model: row i of a batch is [value, batch size]; blocks until released."""

    def __init__(self):
        self.batches: list[list[float]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __call__(self, items, images):
        self.entered.set()
        self.gate.wait(10)
        if any(v < 0 for v in items):
            raise ValueError("negative input")
        self.batches.append(list(items))
        return torch.tensor([[float(v), float(len(items))] for v in items])


def test_concurrent_requests_are_grouped_up_to_max_batch():
    m = _Model()
    enc = BatchEncoder(m, max_batch=8, max_wait_ms=50)
    try:
        first = enc.submit([0.0], [None])
        assert m.entered.wait(10)  # the worker runs it alone and blocks in the model
        futs = [enc.submit([float(i), float(i) + 0.5], [None, None]) for i in range(1, 7)]
        m.gate.set()
        out = [f.result(10) for f in futs]
        assert first.result(10)[0, 0].item() == 0.0
        for i, o in enumerate(out, start=1):
            assert o[:, 0].tolist() == [i, i + 0.5]  # each request gets exactly its rows
        # 12 queued inputs in requests of 2, max 8: batches of 8 then 4 (never split a request).
        assert [len(b) for b in m.batches] == [1, 8, 4]
        assert enc.stats.requests == 7 and enc.stats.max_batch_seen == 8
    finally:
        enc.close()


def test_one_failing_request_does_not_fail_the_others_in_its_batch():
    m = _Model()
    enc = BatchEncoder(m, max_batch=16, max_wait_ms=50)
    try:
        blocker = enc.submit([0.0], [None])
        assert m.entered.wait(10)
        good = enc.submit([1.0], [None])
        bad = enc.submit([-1.0], [None])
        good2 = enc.submit([2.0], [None])
        m.gate.set()
        blocker.result(10)
        assert good.result(10)[0, 0].item() == 1.0 and good2.result(10)[0, 0].item() == 2.0
        with pytest.raises(ValueError, match="negative"):
            bad.result(10)
    finally:
        enc.close()


def test_large_request_runs_in_chunks_and_close_drains_the_queue():
    m = _Model()
    m.gate.set()
    enc = BatchEncoder(m, max_batch=4, max_wait_ms=0)
    big = enc.submit([float(i) for i in range(10)], [None] * 10)
    assert big.result(10)[:, 0].tolist() == list(range(10))
    assert [len(b) for b in m.batches] == [4, 4, 2]
    m.gate.clear()
    pending = [enc.submit([float(i)], [None]) for i in range(3)]
    threading.Timer(0.2, m.gate.set).start()
    enc.close()  # returns after the queued requests are answered
    assert all(f.done() and not f.exception() for f in pending)
    with pytest.raises(QueueFull):
        enc.submit([1.0], [None])


def test_queue_full_is_reported():
    m = _Model()
    enc = BatchEncoder(m, max_batch=1, max_wait_ms=0, max_queue=2)
    try:
        enc.submit([0.0], [None])
        futs = []
        with pytest.raises(QueueFull):
            for i in range(10):
                futs.append(enc.submit([1.0], [None]))
    finally:
        m.gate.set()
        enc.close()


def test_a_call_runs_alone_on_the_worker_between_batches():
    """BatchEncoder.call (late-interaction search): on the worker thread, never batched with
    encodes, in queue order; its exception reaches its caller only."""
    m = _Model()
    enc = BatchEncoder(m, max_batch=8, max_wait_ms=50)
    try:
        blocker = enc.submit([0.0], [None])
        assert m.entered.wait(10)
        a = enc.submit([1.0], [None])
        seen = []
        call = enc.call(lambda: seen.append((threading.current_thread().name,
                                             len(m.batches))) or "done")
        boom = enc.call(lambda: 1 / 0)
        b = enc.submit([2.0], [None])
        m.gate.set()
        assert call.result(10) == "done"
        with pytest.raises(ZeroDivisionError):
            boom.result(10)
        assert a.result(10)[0, 0].item() == 1.0 and b.result(10)[0, 0].item() == 2.0
        blocker.result(10)
        # the call ran on the worker after the batch before it, and split the encodes around it
        assert seen == [("fam-model-worker", 2)]
        assert m.batches == [[0.0], [1.0], [2.0]]
    finally:
        enc.close()
