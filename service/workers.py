"""Worker threads for the core's slow calls, with admission, and ordered queues of calls.

Work that takes long enough to stall other requests (a forward pass over many rows, a
training step, anything touching the disk) runs in a worker thread. NumPy releases the GIL
in its matrix products, so workers compute in parallel with the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from propserve.service.errors import TooBusy, Unavailable

T = TypeVar("T")
P = TypeVar("P")


def default_threads() -> int:
    """One worker per core (at least 2, so that a long step never blocks everything else);
    with one BLAS thread each (see docs/operations.md), they fill the cores without
    oversubscribing them."""
    return max(2, min(os.cpu_count() or 2, 8))


class Workers:
    """A pool of worker threads. ``run`` admits at most ``max_pending`` calls running or
    waiting; ``busy`` counts every call in a worker, admitted or not (see BusyPoll)."""

    def __init__(self, threads: int, max_pending: int) -> None:
        self.threads = threads
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="propserve-worker")
        self.max_pending = max(1, max_pending)
        self.pending = 0
        self.busy = 0

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in a worker; TooBusy, running nothing, when
        ``max_pending`` calls are already running or waiting for a worker."""
        if self.pending >= self.max_pending:
            raise TooBusy(
                f"{self.pending:,} calls are waiting for a worker already (the limit is "
                f"{self.max_pending:,}); try again later"
            )
        self.pending += 1
        try:
            return await self.start(fn, *args, **kwargs)
        finally:
            self.pending -= 1

    def start(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        """``fn(*args, **kwargs)`` in a worker, without admission (for work the caller bounds
        itself, such as a batch of a lane); Unavailable once the pool is shut down."""
        loop = asyncio.get_running_loop()
        try:
            work = loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))
        except RuntimeError:  # the executor is shut down: the server is stopping
            raise Unavailable("the server is shutting down") from None
        self.track(work)
        return work

    def track(self, future: asyncio.Future[Any]) -> None:
        """Count ``future``'s call in ``busy`` until it is done."""
        self.busy += 1
        future.add_done_callback(self._untrack)

    def _untrack(self, future: asyncio.Future[Any]) -> None:
        self.busy -= 1

    def ordered(self) -> OrderedQueue:
        """A queue of calls that run one after another (see OrderedQueue)."""
        return OrderedQueue(self)

    def close(self) -> None:
        self.executor.shutdown(wait=True)


@dataclass(frozen=True)
class TwoPhase(Generic[P, T]):
    """A call in two parts for an OrderedQueue: ``prepare`` (quick checks, in Python) and
    ``run`` (the work, mostly matrix products that release the GIL)."""

    prepare: Callable[[], P]
    run: Callable[[P], T]


class OrderedQueue:
    """Calls that run one after another, in submission order, in a worker thread, with no
    turn of the event loop between one call's end and the next one's start (a training
    stream's steps). After a call fails, the calls queued behind it do not run: their futures
    are cancelled.

    A call's outcome reaches the event loop at once when nothing is queued behind it.
    Otherwise it is handed over when the next call, a :class:`TwoPhase`, has prepared and
    begins its work: the loop's handling of the result (answering, reading the next
    request) then overlaps that work's first matrix product instead of contending with the
    worker for the GIL between steps (see docs/performance.md#train-streams)."""

    def __init__(self, workers: Workers) -> None:
        self._workers = workers
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._queue: deque[tuple[Callable[[], Any] | TwoPhase[Any, Any], asyncio.Future[Any]]]
        self._queue = deque()
        self._active = False
        self._failed = False

    def submit(self, call: Callable[[], T] | TwoPhase[Any, T]) -> asyncio.Future[T]:
        future: asyncio.Future[T] = self._loop.create_future()
        self._workers.track(future)
        with self._lock:
            self._queue.append((call, future))
            start = not self._active
            self._active = True
        if start:
            try:
                self._workers.executor.submit(self._drain)
            except RuntimeError:  # the executor is shut down: the server is stopping
                with self._lock:
                    self._active = False
                    self._failed = True
                    dropped = list(self._queue)
                    self._queue.clear()
                for _, queued in dropped:
                    queued.set_exception(Unavailable("the server is shutting down"))
        return future

    def _drain(self) -> None:
        held: list[tuple[asyncio.Future[Any], Any]] = []  # the last outcome, not handed over
        while True:
            with self._lock:
                if not self._queue:
                    self._active = False
                    self._hand_over(held)
                    return
                call, future = self._queue.popleft()
                failed = self._failed
            if failed:
                self._hand_over(held)
                self._cancel(future)
                continue
            try:
                if isinstance(call, TwoPhase):
                    prepared = call.prepare()
                    self._hand_over(held)
                    outcome = call.run(prepared)
                else:
                    self._hand_over(held)
                    outcome = call()
            except BaseException as exc:
                outcome = exc
                with self._lock:
                    self._failed = True
                self._hand_over(held)
            held.append((future, outcome))

    def _hand_over(self, held: list[tuple[asyncio.Future[Any], Any]]) -> None:
        """Settle the held outcomes' futures on the loop's thread."""
        if not held:
            return
        outcomes = list(held)
        held.clear()
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            self._loop.call_soon_threadsafe(_settle_all, outcomes)

    def _cancel(self, future: asyncio.Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(future.cancel)


def _settle_all(outcomes: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, outcome in outcomes:
        _settle(future, outcome)


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    """Complete ``future`` with ``outcome`` (an exception is raised to its awaiter); a future
    already done (its caller went away) is left as it is."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
