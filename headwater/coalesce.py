"""Coalescing concurrent calls: what queues while one call runs goes into the next together."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Coalescer(Generic[Item, Result]):
    """Runs `handle` on one thread over every item waiting, and hands each caller its result.

    A lone caller waits for nothing; a crowd shares one call's fixed cost (a model call, a
    transaction) instead of queuing for it one by one.
    """

    def __init__(self, handle: Callable[[list[Item]], Sequence[Result]], name: str,
                 max_batch: int = 64) -> None:
        self._handle = handle
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[Item, Future[Result]] | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._serve, name=name, daemon=True)
        self._worker.start()

    def submit(self, item: Item, timeout_s: float = 60.0) -> Result:
        future: Future[Result] = Future()
        self._queue.put((item, future))
        return future.result(timeout=timeout_s)

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=30)

    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            waiting = [first]
            while len(waiting) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop once this batch is done
                    break
                waiting.append(item)
            try:
                results = self._handle([item for item, _ in waiting])
            except Exception as error:  # handed to every waiting caller, who raises it
                for _, future in waiting:
                    future.set_exception(error)
                continue
            for (_, future), result in zip(waiting, results, strict=True):
                future.set_result(result)
