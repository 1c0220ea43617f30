"""Continuous batching for the encoder replicas.

Why not `@serve.batch`: its loop forms a batch as soon as its wait timeout ends and only then
queues that batch behind the `max_concurrent_batches` semaphore, so a batch's size is fixed
before the model is free. With a zero wait (the right setting for latency) requests arriving
while a batch computes become a chain of batches of one or two instead of one full batch:
measured on the base text tower, 32 concurrent requests ran as batches of 1-6 (Ray 2.60).

Here a batch is taken when the model is free, from everything that waited meanwhile (up to
`max_batch_size` items): an idle replica answers a lone request at once, a busy one runs full
batches. `batch_wait_timeout_s` still lets a free model wait for a batch to fill, counted from
the oldest waiting request's arrival (a request that already waited through a batch does not
wait again).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class ContinuousBatcher(Generic[T]):
    """Queue of calls in front of one batch function that runs one batch at a time.

    Args:
        fn: async `(calls) -> results`, one result per call, in order.
        max_batch_size: most items per batch, as counted by `size`; a single call larger than
            that runs alone.
        batch_wait_timeout_s: how long a free model waits for a batch to fill (0: never).
        size: items in one call (default 1).
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Awaitable[Sequence[Any]]],
        max_batch_size: int,
        batch_wait_timeout_s: float = 0.0,
        size: Callable[[T], int] = lambda _: 1,
    ) -> None:
        self.fn = fn
        self.size = size
        self.set_limits(max_batch_size, batch_wait_timeout_s)
        self._queue: deque[tuple[T, asyncio.Future, float]] = deque()
        self._queued_items = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def set_limits(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        if max_batch_size < 1 or batch_wait_timeout_s < 0:
            raise ValueError(
                f"max_batch_size must be >= 1 and batch_wait_timeout_s >= 0, got "
                f"{max_batch_size} and {batch_wait_timeout_s}"
            )
        self.max_batch_size = int(max_batch_size)
        self.batch_wait_timeout_s = float(batch_wait_timeout_s)

    @property
    def queued(self) -> int:
        """Items waiting for a batch."""
        return self._queued_items

    async def submit(self, call: T) -> Any:
        """Enqueue `call` and wait for its result (its batch's exception if the batch fails)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())
        fut = loop.create_future()
        self._queue.append((call, fut, time.monotonic()))
        self._queued_items += self.size(call)
        assert self._wake is not None
        self._wake.set()
        return await fut

    def _take(self) -> tuple[list[T], list[asyncio.Future]]:
        calls: list[T] = []
        futs: list[asyncio.Future] = []
        total = 0
        while self._queue:
            call, fut, _ = self._queue[0]
            n = self.size(call)
            if fut.done():  # the caller gave up (cancelled): drop it unseen
                self._queue.popleft()
                self._queued_items -= n
                continue
            if calls and total + n > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued_items -= n
            calls.append(call)
            futs.append(fut)
            total += n
        return calls, futs

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            await wake.wait()
            if not self._queue:
                wake.clear()
                continue
            if self.batch_wait_timeout_s > 0 and self._queued_items < self.max_batch_size:
                deadline = self._queue[0][2] + self.batch_wait_timeout_s
                while self._queued_items < self.max_batch_size:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    wake.clear()
                    try:
                        await asyncio.wait_for(wake.wait(), left)
                    except TimeoutError:
                        break
            calls, futs = self._take()
            if self._queue:
                wake.set()  # more is waiting: the next batch starts right after this one
            else:
                wake.clear()
            if not calls:
                continue
            try:
                results = await self.fn(calls)
                if len(results) != len(calls):
                    raise RuntimeError(
                        f"batch function returned {len(results)} results for {len(calls)} calls"
                    )
            except BaseException as e:  # every caller of the batch gets the error
                err = e if isinstance(e, Exception) else RuntimeError("batch cancelled")
                for f in futs:
                    if not f.done():
                        f.set_exception(err)
                if not isinstance(e, Exception):
                    raise
                continue
            for f, r in zip(futs, results, strict=True):
                if not f.done():
                    f.set_result(r)
