"""Running core calls from the event loop, the same way for both transports.

Work that takes long enough to stall other requests (a forward pass over many rows, a
training step, anything touching the disk) runs in a worker thread; small forward passes run
inline, where a thread hop would cost more than the work itself. NumPy releases the GIL in its
matrix products, so worker threads compute in parallel with the loop.

Predictions are batched: queries for the same model and source that arrive while the loop is
busy, or while that model's previous batch is computing, share one forward pass. Nothing waits
for a batch to fill: a lone query is computed on the next turn of the loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from propserve.service.core import Core, Prediction, PredictQuery
from propserve.service.errors import TooBusy, Unavailable

T = TypeVar("T")
log = logging.getLogger("propserve.dispatch")

#: A batched forward pass of up to this many multiply-adds (rows x parameters) runs on the
#: event loop's thread, longer ones in a worker. NOTE: measured on 2 cores with model A
#: (~0.5M parameters): handing 8-row batches to a worker cost 1.3x the CPU per request of
#: computing them inline (the thread hop, and the worker waiting for the GIL while the loop
#: parses the next requests), and REST throughput at concurrency 8 fell from 0.8x to 0.6x the
#: bare echo. 2**25 is ~60 rows of A, ~0.6 ms.
INLINE_MACS = 1 << 25

#: Rows of predictions that may wait for a forward pass, per model and source.
DEFAULT_QUEUED_ROWS = 65536

#: Calls that may wait for a worker thread (training steps, saves, large predictions...).
DEFAULT_PENDING_CALLS = 256

#: A gRPC prediction on an idle model is computed at once up to this size (one row of A).
LONE_MACS = 1 << 20

#: Rows in one batched forward pass (a single larger query still runs, alone).
DEFAULT_BATCH_ROWS = 256

#: Seconds the event loop polls after a prediction request before it sleeps (see BusyPoll).
DEFAULT_BUSY_POLL = 0.001


def default_threads() -> int:
    """One worker per core (at least 2, so that a long step never blocks everything else);
    with one BLAS thread each (see service.server), they fill the cores without
    oversubscribing them."""
    return max(2, min(os.cpu_count() or 2, 8))


#: Called with a query's prediction, or the error that answers it, on the loop's thread.
Done = Callable[["Prediction | Exception"], None]


@dataclass
class _Lane:
    """Queued queries of one (model, source) and how many of its batches are computing."""

    queue: deque[tuple[PredictQuery, Done]] = field(default_factory=deque)
    queued_rows: int = 0
    running: int = 0
    scheduled: bool = False


class Batcher:
    """Groups prediction queries into forward passes.

    NOTE: measured on model A=[784,512,256,10], float32, one core: one row takes ~50 us, 64
    rows ~0.85 ms (13 us a row), so under concurrent load a shared pass answers several times
    more requests per core. A lane runs at most ``max_running`` batches at once; queries
    arriving meanwhile wait for the next batch, which makes batches grow with the load.
    Answers go to plain callbacks, not futures: a future would add a turn of the loop to
    every prediction.
    """

    def __init__(
        self,
        core: Core,
        executor: ThreadPoolExecutor,
        *,
        max_rows: int = DEFAULT_BATCH_ROWS,
        max_running: int = 1,
        max_queued_rows: int = DEFAULT_QUEUED_ROWS,
        track: Callable[[asyncio.Future[Any]], None] = lambda future: None,
    ) -> None:
        self.core = core
        self.executor = executor
        self._track = track
        self.max_rows = max(1, max_rows)
        self.max_running = max(1, max_running)
        self.max_queued_rows = max(1, max_queued_rows)
        self._lanes: dict[Any, _Lane] = {}

    def submit(self, query: PredictQuery, done: Done) -> None:
        """Answer ``query`` through ``done``, soon, from the event loop's thread; raises
        TooBusy, queueing nothing, when ``max_queued_rows`` rows already wait."""
        key = query.key
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        elif lane.queued_rows >= self.max_queued_rows:
            raise TooBusy(
                f"{lane.queued_rows:,} rows of predictions on model "
                f"{query.model.record.name!r} are waiting already (the limit is "
                f"{self.max_queued_rows:,}); try again later"
            )
        lane.queue.append((query, done))
        lane.queued_rows += query.rows
        if not lane.scheduled and lane.running < self.max_running:
            lane.scheduled = True
            # NOTE: call_soon runs after the loop has handled every request that arrived in
            # the same wake-up, so those share the batch; a lone request waits one turn.
            asyncio.get_running_loop().call_soon(self._flush, key, lane)

    def now(self, query: PredictQuery) -> Prediction | Exception | None:
        """The query's answer computed right away, when it is ready (its weights in memory),
        small and its lane idle; None otherwise (then submit it)."""
        if (
            not query.ready
            or query.rows * query.model.spec.n_params > LONE_MACS
            or query.key in self._lanes
        ):
            return None
        return self._compute([query])[0]

    def _take(self, lane: _Lane) -> tuple[list[tuple[PredictQuery, Done]], int]:
        """The next batch from the lane's queue, and its rows."""
        batch = [lane.queue.popleft()]
        rows = batch[0][0].rows
        while lane.queue and rows + lane.queue[0][0].rows <= self.max_rows:
            batch.append(lane.queue.popleft())
            rows += batch[-1][0].rows
        lane.queued_rows -= rows
        return batch, rows

    def _flush(self, key: Any, lane: _Lane) -> None:
        lane.scheduled = False
        while lane.queue and lane.running < self.max_running:
            batch, rows = self._take(lane)
            queries = [query for query, _ in batch]
            if lane.running == 0 and rows * queries[0].model.spec.n_params <= INLINE_MACS:
                self.resolve(batch, self._compute(queries))
                continue
            try:
                work = asyncio.get_running_loop().run_in_executor(
                    self.executor, self._compute, queries
                )
            except RuntimeError:  # the executor is shut down: the server is stopping
                self.resolve(batch, [Unavailable("the server is shutting down")] * len(batch))
                continue
            lane.running += 1
            self._track(work)
            work.add_done_callback(functools.partial(self._finished, key, lane, batch))
        self._forget_if_idle(key, lane)

    def _compute(self, queries: list[PredictQuery]) -> list[Prediction | Exception]:
        try:
            return self.core.predict_batch(queries)
        except Exception as exc:
            return [exc] * len(queries)

    def _finished(
        self,
        key: Any,
        lane: _Lane,
        batch: list[tuple[PredictQuery, Done]],
        work: asyncio.Future[list[Prediction | Exception]],
    ) -> None:
        lane.running -= 1
        try:
            results = work.result()
        except BaseException as exc:
            results = [Unavailable(f"the prediction did not run: {exc!r}")] * len(batch)
        self.resolve(batch, results)
        if lane.queue and not lane.scheduled:
            lane.scheduled = True
            asyncio.get_running_loop().call_soon(self._flush, key, lane)
        self._forget_if_idle(key, lane)

    @staticmethod
    def resolve(
        batch: list[tuple[PredictQuery, Done]], results: list[Prediction | Exception]
    ) -> None:
        """Hand each query of ``batch`` its result; a failing callback is logged."""
        for (_, done), result in zip(batch, results, strict=True):
            try:
                done(result)
            except Exception:  # one caller's failure must not keep the others waiting
                log.exception("predict.callback_failed")

    def _forget_if_idle(self, key: Any, lane: _Lane) -> None:
        if not lane.queue and not lane.running and not lane.scheduled:
            self._lanes.pop(key, None)


def _as_exception(error: BaseException) -> Exception:
    return error if isinstance(error, Exception) else Unavailable(f"cancelled: {error!r}")


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    """Complete ``future`` with ``outcome``, an exception being raised to its awaiter; a
    future already done (its caller went away) is left as it is."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _settle_all(outcomes: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, outcome in outcomes:
        _settle(future, outcome)


class Serial:
    """Calls run one after another, in submission order, in a worker thread, with no turn of
    the event loop between one call's end and the next one's start; after a call fails, the
    ones queued behind it do not run (their futures are cancelled).

    A call's result reaches the loop at once when nothing is queued behind it, so a caller
    that waits for each result before submitting the next gets every one at once. Otherwise
    the worker goes on to the next call and hands the result over when that call begins its
    main work: with ``started`` set, each call gets a keyword argument of that name, a
    function to call at that moment (``Core.train_step``'s ``on_start``: right before the
    step's forward pass); a call that never calls it hands the results before it over when
    it returns. Without ``started``, results are handed over before the next call starts.

    NOTE: for a Train stream. Starting each step from the loop after the previous one ended
    left the worker idle ~1 ms of every ~9 ms step (batch 256, model A, 2 cores): the
    wake-up of the loop, a few turns of it, and the hand-over back to a worker. Each
    hand-over wakes the loop, which then takes the GIL to answer and to read the next batch.
    Handed over as a step ended, that work fell on the next step's start and between its
    matrix products, where the step needs the GIL too (traced with ``perf trace``: of the
    step's time waiting in futexes, 93% came within 3.5 ms of a hand-over and 39% within
    0.5 ms). Handed over from the next step's start, it overlaps that step's first matrix
    product, which runs without the GIL. Streamed training against the in-process engine
    (bench/service.py's comparison, rounds of 120), against results handed over in pairs as
    every second step ended (which had beaten one at a time: 0.84-0.91x against
    0.82-0.90x): toggled round by round on one server 0.899x -> 0.960x and 0.895x -> 0.956x,
    two servers of each 0.898x and 0.916x -> 0.936x and 0.957x; pairs handed over from the
    next step's start read 0.931x.
    """

    def __init__(
        self,
        executor: ThreadPoolExecutor,
        track: Callable[[asyncio.Future[Any]], None] = lambda future: None,
        *,
        started: str | None = None,
    ) -> None:
        self._executor = executor
        self._track = track
        self._started = started
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._queue: deque[tuple[Callable[..., Any], asyncio.Future[Any]]] = deque()
        self._active = False
        self._failed = False
        #: Hand-overs of results to the loop so far (for tests and curiosity).
        self.handovers = 0

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        future: asyncio.Future[T] = self._loop.create_future()
        self._track(future)
        with self._lock:
            self._queue.append((functools.partial(fn, *args, **kwargs), future))
            start = not self._active
            self._active = True
        if start:
            try:
                self._executor.submit(self._drain)
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
        held: list[tuple[asyncio.Future[Any], Any]] = []
        while True:
            with self._lock:
                if not self._queue or self._failed:
                    # Results are handed over before the worker leaves, and before the
                    # cancellations behind a failure.
                    self._hand_over(held)
                if not self._queue:
                    self._active = False
                    return
                call, future = self._queue.popleft()
                if self._failed:
                    self._loop.call_soon_threadsafe(future.cancel)
                    continue
            try:
                if self._started is None:
                    self._hand_over(held)
                    outcome = call()
                else:
                    outcome = call(**{self._started: functools.partial(self._starting, held)})
            except BaseException as exc:
                outcome = exc
                with self._lock:
                    self._failed = True
            self._hand_over(held)  # the call did not say it started
            held.append((future, outcome))

    def _starting(self, held: list[tuple[asyncio.Future[Any], Any]]) -> None:
        """A call's ``started`` function: hands over the results before it."""
        try:
            self._hand_over(held)
        except RuntimeError:  # the loop is closed: nobody is waiting for them
            held.clear()

    def _hand_over(self, held: list[tuple[asyncio.Future[Any], Any]]) -> None:
        if held:
            self.handovers += 1
            self._loop.call_soon_threadsafe(_settle_all, list(held))
            held.clear()


class BusyPoll:
    """Keeps the event loop polling for I/O, instead of sleeping in it, for ``window``
    seconds after each :meth:`touch`, while ``quiet()`` is true.

    NOTE: on this 2-core VM a core that sleeps loses its caches: model A's single-row forward
    pass took 47-71 us back to back, 63-116 us after sleeping 0.1 ms and 49-83 us after
    spinning 0.1 ms instead, and the rest of a request's path (the interpreter, gRPC, the
    network stack) cools alike. Polling for 1 ms after each prediction, at concurrency 1:
    REST (wrk) 3,800-3,900 -> 4,250-4,400 req/s; gRPC p50 830-920 -> 670-680 us. A 0.3 ms
    window was too short for gRPC, whose next call reaches the loop ~0.5 ms after the answer
    leaves. The cost is a core for at most ``window`` after the last request. The loop yields
    to worker threads: polling, it would take the GIL between a training step's matrix
    products, so ``quiet`` (no call in a worker) must hold.
    """

    def __init__(self, window: float, quiet: Callable[[], bool]) -> None:
        self.window = window
        self._quiet = quiet
        self._until = 0.0
        self._polling = False
        #: Turns of the loop polled so far (for tests and curiosity).
        self.turns = 0

    def touch(self) -> None:
        """Poll for ``window`` seconds from now."""
        if self.window <= 0:
            return
        self._until = time.perf_counter() + self.window
        if not self._polling:
            self._polling = True
            asyncio.get_running_loop().call_soon(self._poll)

    def _poll(self) -> None:
        # A callback that schedules itself: while one is pending the loop polls its sockets
        # with a zero timeout on every turn, and runs what arrives, instead of sleeping.
        if time.perf_counter() < self._until and self._quiet():
            self.turns += 1
            asyncio.get_running_loop().call_soon(self._poll)
        else:
            self._polling = False


class Dispatcher:
    """Calls into the core from async code: inline when cheap, else in a worker thread."""

    def __init__(
        self,
        core: Core,
        threads: int | None = None,
        *,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        max_queued_rows: int = DEFAULT_QUEUED_ROWS,
        max_pending_calls: int = DEFAULT_PENDING_CALLS,
        busy_poll: float = DEFAULT_BUSY_POLL,
    ) -> None:
        self.core = core
        self.threads = threads or default_threads()
        self.executor = ThreadPoolExecutor(self.threads, thread_name_prefix="propserve-worker")
        #: Calls handed to worker threads and not finished yet (see BusyPoll).
        self.working = 0
        self.batcher = Batcher(
            core,
            self.executor,
            max_rows=batch_rows,
            max_running=max(1, self.threads // 2),
            max_queued_rows=max_queued_rows,
            track=self._track,
        )
        self.max_pending_calls = max(1, max_pending_calls)
        self._pending = 0
        #: After each prediction request, the loop polls instead of sleeping (see BusyPoll).
        self.busy_poll = BusyPoll(busy_poll, lambda: not self.working)

    def _track(self, future: asyncio.Future[Any]) -> None:
        """Count ``future``'s call in ``working`` until it is done."""
        self.working += 1
        future.add_done_callback(self._untrack)

    def _untrack(self, future: asyncio.Future[Any]) -> None:
        self.working -= 1

    async def offload(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in a worker thread; TooBusy when ``max_pending_calls``
        calls are already running or waiting for one."""
        if self._pending >= self.max_pending_calls:
            raise TooBusy(
                f"{self._pending:,} calls are waiting for a worker already (the limit is "
                f"{self.max_pending_calls:,}); try again later"
            )
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            work = loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))
            self._track(work)
            return await work
        finally:
            self._pending -= 1

    def serial(self, started: str | None = None) -> Serial:
        """A queue of calls run in order in the worker threads (see Serial)."""
        return Serial(self.executor, self._track, started=started)

    def submit_predict(
        self,
        name: str,
        inputs: Any,
        done: Done,
        *,
        version: int | None = None,
        label: str | None = None,
        alone: bool = False,
    ) -> None:
        """Predict, answering through ``done`` (batched with predictions that arrive in the
        same turn of the loop); raises at once for a request that is wrong by itself (unknown
        model, bad inputs...), before anything is queued.

        ``alone``: the caller knows that no other prediction can arrive in this turn (its
        connection is the server's only one). Then a small query on an idle model is answered
        at once, before this returns, as :meth:`predict` answers one.

        NOTE: waiting for the next turn costs a single-row request ~15 us on 2 cores (model
        A: 92 us from the request's body to its answer, 75 us answered at once), as much as
        reading its tensor. REST at concurrency 1 (wrk, interleaved runs): 0.95-0.98x ->
        1.00-1.03x the bare echo with a tiny model, 0.83-0.87x -> 0.86-0.88x with model A
        and base64 bodies.
        """
        self.busy_poll.touch()
        query = self.core.prepare_predict(name, inputs, version=version, label=label)
        if alone and (result := self.batcher.now(query)) is not None:
            self.batcher.resolve([(query, done)], [result])
            return
        self._submit(query, done)

    async def predict(self, name: str, inputs: Any, **source: Any) -> Prediction:
        """Predict; a small query on a model with nothing queued is answered at once.

        NOTE: a gRPC call reaches its handler alone, one per turn of the loop, so deferring
        it to batch it with others gathers nothing and costs two more turns (measured: p50
        +20%); REST's hot path sees every request of one wake-up first and submits instead.
        """
        self.busy_poll.touch()
        query = self.core.prepare_predict(name, inputs, **source)
        result = self.batcher.now(query)
        if result is None:
            future: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
            self._submit(query, functools.partial(_settle, future))
            return await future
        if isinstance(result, Exception):
            raise result
        return result

    def _submit(self, query: PredictQuery, done: Done) -> None:
        if query.ready:
            self.batcher.submit(query, done)
            return
        # A saved version not in memory yet: read it from disk in a worker thread.
        work = asyncio.get_running_loop().run_in_executor(
            self.executor,
            functools.partial(
                self.core.predict, query.model.record.name, query.x, version=query.version
            ),
        )
        self._track(work)

        def finished(work: asyncio.Future[Prediction]) -> None:
            error = work.exception()
            done(work.result() if error is None else _as_exception(error))

        work.add_done_callback(finished)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
