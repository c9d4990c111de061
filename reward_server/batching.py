"""Dynamic batching for concurrent score requests (asyncio; no Ray).

Requests arrive one coroutine each; a single loop collects whole requests until the batch holds
`max_batch_size` samples or `max_wait_s` has passed since its first request, scores the batch on a
worker thread (the event loop stays free to accept requests) and hands each request its slice.
Requests are never split, so every result of one request comes from one registry snapshot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Request:
    items: Sequence[Any]
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


@dataclass
class BatcherStats:
    requests: int = 0
    samples: int = 0
    batches: int = 0
    busy_s: float = 0.0  # time spent scoring
    latencies_s: list[float] = field(default_factory=list)  # per request, arrival to answer (last 10k)

    def as_dict(self) -> dict[str, float]:
        return {"requests": self.requests, "samples": self.samples, "batches": self.batches,
                "mean_batch_size": self.samples / self.batches if self.batches else 0.0, "busy_s": self.busy_s}


class DynamicBatcher:
    def __init__(self, score_batch: Callable[[list[Any]], list[Any]], max_batch_size: int, max_wait_s: float):
        self.score_batch = score_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.stats = BatcherStats()
        self._queue: asyncio.Queue[_Request] | None = None
        self._loop_task: asyncio.Task | None = None
        self._carry: _Request | None = None

    def _start(self) -> asyncio.Queue[_Request]:
        """The request queue, with the loop that drains it."""
        # Created lazily inside the running loop (a Ray async actor's loop exists only once it serves).
        if self._loop_task is None:
            self._queue = asyncio.Queue()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        assert self._queue is not None  # created together with the loop task
        return self._queue

    async def submit(self, items: Sequence[Any]) -> list[Any]:
        """Results for `items`, in order, once the batch they joined has been scored."""
        queue = self._start()
        request = _Request(list(items), asyncio.get_running_loop().create_future())
        await queue.put(request)
        return await request.future

    async def _collect(self) -> list[_Request]:
        queue = self._queue
        assert queue is not None  # _run, the only caller, is started by _start after it made the queue
        first, self._carry = self._carry or await queue.get(), None
        batch, size = [first], len(first.items)
        deadline = time.perf_counter() + self.max_wait_s
        while size < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                request = queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(queue.get(), remaining)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            if size + len(request.items) > self.max_batch_size:
                self._carry = request  # too big to join: it opens the next batch
                break
            batch.append(request)
            size += len(request.items)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            items = [item for request in batch for item in request.items]
            began = time.perf_counter()
            try:
                results = await loop.run_in_executor(None, self.score_batch, items)
            except Exception as exc:  # noqa: BLE001 - the callers get the error, the loop keeps serving
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
                continue
            now = time.perf_counter()
            self.stats.batches += 1
            self.stats.busy_s += now - began
            start = 0
            for request in batch:
                part = results[start : start + len(request.items)]
                start += len(request.items)
                self.stats.requests += 1
                self.stats.samples += len(request.items)
                self.stats.latencies_s.append(now - request.arrived)
                if not request.future.done():
                    request.future.set_result(part)
            del self.stats.latencies_s[:-10_000]
