"""The data plane: the one async entry point every transport adapter calls.

The adapters (gRPC, REST) only convert between their wire and the core's types; everything
around a request happens here, the same way for every transport:

- the request context (:meth:`DataPlane.call`, see propserve.service.calls): draining,
  authorisation, the request id, timing, metrics, and the log line of a failure;
- offloading: cheap calls run inline, slow ones in worker threads (with admission);
- batching (:class:`Batcher`): concurrent predictions on the same weights share forward
  passes. A query joins its lane (model, source) and the lane's next pass starts at the end
  of the current turn of the event loop, so every query that arrived in the same wake-up
  shares it; nothing waits for a batch to fill. Small passes run on the loop's thread, where
  a hop to a worker would cost more than the pass; larger ones in a worker, while the next
  queries gather for the pass after it (see docs/operations.md#batching);
- the Train stream's pipeline: steps run in order while the next batches are read.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from numpy.typing import NDArray

from propserve import wire
from propserve.service.auth import Authenticator
from propserve.service.busypoll import BusyPoll
from propserve.service.calls import Call
from propserve.service.config import Settings
from propserve.service.errors import InvalidArgument, PropserveError, TooBusy, Unavailable
from propserve.service.metrics import Metrics
from propserve.service.models import Models, Prediction, PredictQuery
from propserve.service.workers import TwoPhase, Workers, default_threads

log = logging.getLogger("propserve.dataplane")

#: Steps of a Train stream that may be pending before the client's next batch is read: the
#: running one, one queued behind it (so the worker goes from one to the next), and a
#: finished one whose result is handed over when the next begins (see OrderedQueue).
TRAIN_AHEAD = 3


# -- batching ----------------------------------------------------------------------------

#: A pass of up to this many multiply-adds (rows x parameters) runs on the loop's thread:
#: about 60 rows of a 0.5M-parameter model, well under a millisecond.
INLINE_MULTIPLY_ADDS = 1 << 25

#: Lanes kept when idle, for the next queries on the same weights.
MAX_IDLE_LANES = 64

Waiter = asyncio.Future[Prediction]


@dataclass
class _Lane:
    """Queued queries of one (model, source) and how many of its passes are computing."""

    queue: deque[tuple[PredictQuery, Waiter]] = field(default_factory=deque)
    queued_rows: int = 0
    running: int = 0
    scheduled: bool = False


class Batcher:
    """Groups prediction queries into forward passes. A lane runs at most ``max_running``
    passes at once; queries arriving meanwhile wait for the next, so passes grow with the
    load. A pass that is full already (``max_rows``) gains nothing by waiting: such passes
    also start while fewer than ``max_full`` run, so large requests use every worker. At
    most ``max_queued_rows`` rows wait per lane (TooBusy beyond)."""

    def __init__(
        self,
        models: Models,
        workers: Workers,
        *,
        max_rows: int,
        max_queued_rows: int,
        max_running: int,
        max_full: int | None = None,
    ) -> None:
        self.models = models
        self.workers = workers
        self.max_rows = max(1, max_rows)
        self.max_queued_rows = max(1, max_queued_rows)
        self.max_running = max(1, max_running)
        self.max_full = max(self.max_running, max_full or 0)
        self._lanes: dict[Any, _Lane] = {}

    def submit(self, query: PredictQuery) -> Waiter:
        """A future of ``query``'s prediction (its weights must be loaded); raises TooBusy,
        queueing nothing, when the lane's queue is full."""
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
        loop = asyncio.get_running_loop()
        waiter: Waiter = loop.create_future()
        lane.queue.append((query, waiter))
        lane.queued_rows += query.rows
        if not lane.scheduled and self._may_start(lane):
            lane.scheduled = True
            # NOTE: call_soon runs after the loop has handled everything that arrived in the
            # same wake-up, so those queries share the pass.
            loop.call_soon(self._flush, key, lane)
        return waiter

    def _take(self, lane: _Lane) -> tuple[list[tuple[PredictQuery, Waiter]], int]:
        """The next pass's queries from the lane's queue, and their rows."""
        batch = [lane.queue.popleft()]
        rows = batch[0][0].rows
        while lane.queue and rows + lane.queue[0][0].rows <= self.max_rows:
            batch.append(lane.queue.popleft())
            rows += batch[-1][0].rows
        lane.queued_rows -= rows
        return batch, rows

    def _may_start(self, lane: _Lane) -> bool:
        """Whether the lane may start a pass now: below ``max_running``, or below
        ``max_full`` with a full pass queued."""
        if lane.running < self.max_running:
            return True
        return lane.running < self.max_full and lane.queued_rows >= self.max_rows

    def _flush(self, key: Any, lane: _Lane) -> None:
        lane.scheduled = False
        while lane.queue and self._may_start(lane):
            batch, rows = self._take(lane)
            queries = [query for query, _ in batch]
            if lane.running == 0 and rows * queries[0].model.spec.n_params <= INLINE_MULTIPLY_ADDS:
                _resolve(batch, self._compute(queries))
                continue
            try:
                work = self.workers.start(self._compute, queries)
            except Unavailable as exc:
                _resolve(batch, [exc] * len(batch))
                continue
            lane.running += 1
            work.add_done_callback(functools.partial(self._finished, key, lane, batch))
        self._forget_idle()

    def _compute(self, queries: list[PredictQuery]) -> list[Prediction | Exception]:
        try:
            return self.models.predict_batch(queries)
        except Exception as exc:
            return [exc] * len(queries)

    def _finished(
        self,
        key: Any,
        lane: _Lane,
        batch: list[tuple[PredictQuery, Waiter]],
        work: asyncio.Future[list[Prediction | Exception]],
    ) -> None:
        lane.running -= 1
        try:
            results = work.result()
        except BaseException as exc:
            results = [Unavailable(f"the prediction did not run: {exc!r}")] * len(batch)
        _resolve(batch, results)
        if lane.queue and not lane.scheduled:
            lane.scheduled = True
            asyncio.get_running_loop().call_soon(self._flush, key, lane)
        self._forget_idle()

    def _forget_idle(self) -> None:
        """Idle lanes are kept for the next queries on the same weights while there are few;
        beyond MAX_IDLE_LANES every idle one goes (their keys hold deleted models and
        versions no longer cached alive)."""
        if len(self._lanes) > MAX_IDLE_LANES:
            for idle in [k for k, v in self._lanes.items() if not _busy(v)]:
                del self._lanes[idle]


def _busy(lane: _Lane) -> bool:
    return bool(lane.queue or lane.running or lane.scheduled)


def _resolve(
    batch: list[tuple[PredictQuery, Waiter]], results: list[Prediction | Exception]
) -> None:
    """Hand each query of ``batch`` its result; a waiter whose caller went away is skipped."""
    for (_, waiter), result in zip(batch, results, strict=True):
        if waiter.done():
            continue
        if isinstance(result, Exception):
            waiter.set_exception(result)
        else:
            waiter.set_result(result)


# -- the data plane ------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """One batch of a Train stream, decoded: ``model`` may be empty after the first."""

    model: str
    inputs: NDArray[Any]
    targets: NDArray[Any]
    learning_rate: float | None


#: How often a history watch looks for new steps, in seconds.
WATCH_INTERVAL = 0.2


class DataPlane:
    """The server's operations, for every transport (see the module's docstring)."""

    def __init__(
        self,
        models: Models,
        auth: Authenticator,
        metrics: Metrics,
        settings: Settings,
        *,
        threads: int | None = None,
    ) -> None:
        self.models = models
        self.auth = auth
        self.metrics = metrics
        self.settings = settings
        self.workers = Workers(threads or default_threads(), settings.max_pending_calls)
        self.batcher = Batcher(
            models,
            self.workers,
            max_rows=settings.batch_rows,
            max_queued_rows=settings.max_queued_rows,
            max_running=max(1, self.workers.threads // 2),
            max_full=self.workers.threads,
        )
        self.busy_poll = BusyPoll(settings.busy_poll_us / 1e6, lambda: not self.workers.busy)
        #: Elements of one tensor the adapters accept (a whole message of 4-byte numbers).
        self.max_elements = max(settings.max_message_bytes // 4, 1)
        #: The largest weights file an import takes: float64 parameters and two optimizer
        #: slots at the parameter limit, and room for the header.
        self.max_weights_bytes = 3 * 8 * settings.max_params + (16 << 20)
        self.draining = False
        self.in_flight = 0
        self.idle: asyncio.Event | None = None

    def call(
        self,
        operation: str,
        transport: str,
        *,
        request_id: str | None = None,
        authorization: str | None = None,
        protocol: str = "propserve",
    ) -> Call:
        """The context of one request (see :class:`Call`); ``protocol``: propserve's own API
        or ``oip``, the Open Inference Protocol."""
        return Call(self, operation, transport, request_id, authorization, protocol)

    async def drain(self, timeout: float) -> bool:
        """Refuse new calls and wait up to ``timeout`` for those in flight; True if none is
        left."""
        self.draining = True
        if self.in_flight:
            self.idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle.wait(), timeout)
        return not self.in_flight

    def close(self) -> None:
        """Stop the workers (after the running calls finish)."""
        self.workers.close()

    # -- models --------------------------------------------------------------------------

    async def create_model(
        self,
        name: str,
        spec: Any,
        settings: Mapping[str, Any] | None = None,
        *,
        weights: bytes | memoryview | None = None,
        layout: str = "propserve",
    ) -> wire.Model:
        return await self.workers.run(
            self.models.create_model, name, spec, settings, weights=weights, layout=layout
        )

    async def get_model(self, name: str) -> wire.Model:
        return self.models.get_model(name)

    async def list_models(self) -> list[wire.Model]:
        return self.models.list_models()

    async def update_model(self, name: str, settings: Mapping[str, Any]) -> wire.Model:
        return await self.workers.run(self.models.update_settings, name, settings)

    async def delete_model(self, name: str) -> None:
        await self.workers.run(self.models.delete_model, name)

    # -- in memory or not (the Open Inference Protocol's repository extension) -------------

    async def is_loaded(self, name: str) -> bool:
        return self.models.is_loaded(name)

    async def load_model(self, name: str) -> None:
        await self.workers.run(self.models.load_model, name)

    async def unload_model(self, name: str) -> None:
        await self.workers.run(self.models.unload, name)

    async def has_source(self, name: str, *, version: int | None, label: str | None) -> bool:
        return await self.workers.run(self.models.has_source, name, version=version, label=label)

    def serving_label(self, name: str) -> str | None:
        """The label a prediction naming no version is served from (None: the head)."""
        return self.models.serving_label(name)

    # -- predicting and training ---------------------------------------------------------

    async def predict(
        self,
        name: str,
        inputs: NDArray[Any],
        *,
        version: int | None = None,
        label: str | None = None,
    ) -> Prediction:
        """A forward pass, batched with concurrent predictions on the same weights."""
        self.busy_poll.extend()
        query = self.models.prepare_predict(name, inputs, version=version, label=label)
        if not query.weights_loaded:  # a saved version read from disk, off the loop
            query = await self.workers.run(self.models.load, query)
        return await self.batcher.submit(query)

    async def evaluate(
        self,
        name: str,
        inputs: NDArray[Any],
        targets: NDArray[Any],
        *,
        version: int | None = None,
        label: str | None = None,
    ) -> wire.Evaluation:
        """A loss without training (in a worker: it computes the whole forward pass)."""
        return await self.workers.run(
            self.models.evaluate, name, inputs, targets, version=version, label=label
        )

    async def export_weights(
        self, name: str, version: int, *, layout: str, format: str
    ) -> wire.WeightsFile:
        """A saved version as a file (in a worker: it reads, and may convert, the version)."""
        return await self.workers.run(
            self.models.export_weights, name, version, layout=layout, format=format
        )

    # -- training history ------------------------------------------------------------------

    async def history(
        self,
        name: str,
        *,
        since: int | None = None,
        until: int | None = None,
        every: int = 1,
        limit: int | None = None,
    ) -> wire.History:
        return await self.workers.run(
            self.models.history, name, since=since, until=until, every=every, limit=limit
        )

    async def watch_history(
        self, name: str, *, since: int | None = None, every: int = 1
    ) -> AsyncIterator[wire.History]:
        """The history from step ``since`` (None: from the next step on), then each new part
        as it is trained, looked for every WATCH_INTERVAL seconds; the first answer comes at
        once, even if empty. Ends when the server drains; after a rollback it goes on from
        the steps trained after it."""
        if since is None:
            end = self.models.history_end(name)
            since = 1 if end is None else end + 1
        first = True
        while not self.draining:
            part = await self.history(name, since=since, every=every)
            if part.points or first:
                yield part
                first = False
            if part.next_since is not None:
                since = part.next_since
                continue
            if part.points:
                since = part.points[-1].step + 1
            end = self.models.history_end(name)
            if end is not None and end < since - 1:  # rolled back: follow the new steps
                since = end + 1
            await asyncio.sleep(WATCH_INTERVAL)

    async def train_step(
        self,
        name: str,
        inputs: NDArray[Any],
        targets: NDArray[Any],
        *,
        learning_rate: float | None = None,
    ) -> wire.StepResult:
        return await self.workers.run(
            self.models.train_step, name, inputs, targets, learning_rate=learning_rate
        )

    async def train(self, batches: AsyncIterator[Batch]) -> AsyncIterator[wire.StepResult]:
        """One result per batch, in order. Steps run one after another in a worker while the
        next batches are read (a result never waits for the client's next batch); the first
        batch names the model. A failing batch (bad input, a refused step) ends the stream
        with its index named, and the batches behind it are not applied."""
        steps = self.workers.ordered()
        pending: deque[tuple[int, asyncio.Future[wire.StepResult]]] = deque()
        arriving: asyncio.Future[Batch] | None = None
        failure: PropserveError | None = None
        index = 0
        name = ""
        try:
            while True:
                if arriving is None and len(pending) < TRAIN_AHEAD:
                    arriving = asyncio.ensure_future(anext(batches))
                waiting = [f for f in (arriving, pending[0][1] if pending else None) if f]
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if pending and pending[0][1].done():
                    yield await _step_result(*pending.popleft())
                    continue
                assert arriving is not None
                try:
                    batch = arriving.result()
                    arriving = None
                    name = _stream_model(index, batch, name)
                except StopAsyncIteration:
                    arriving = None
                    break
                except PropserveError as exc:
                    arriving = None
                    failure = _in_batch(index, exc)
                    break
                step = steps.submit(
                    TwoPhase(
                        functools.partial(
                            self.models.prepare_step,
                            name,
                            batch.inputs,
                            batch.targets,
                            learning_rate=batch.learning_rate,
                        ),
                        self.models.apply_step,
                    )
                )
                pending.append((index, step))
                index += 1
            # The steps before a bad batch stay applied, and their results are answered.
            while pending:
                yield await _step_result(*pending.popleft())
            if failure is not None:
                raise failure
        finally:
            if arriving is not None:
                arriving.cancel()
                with contextlib.suppress(BaseException):
                    await arriving
            for _, step in pending:
                # The stream ended with steps queued (the client went away, or a step
                # failed): they complete or are dropped in the worker, unheard.
                step.add_done_callback(lambda done: done.cancelled() or done.exception())

    # -- versions and labels -------------------------------------------------------------

    async def save_version(self, name: str) -> wire.Version:
        return await self.workers.run(self.models.save_version, name)

    async def list_versions(self, name: str) -> list[wire.Version]:
        return await self.workers.run(self.models.list_versions, name)

    async def set_label(self, name: str, label: str, version: int) -> wire.Model:
        return await self.workers.run(self.models.set_label, name, label, version)

    async def remove_label(self, name: str, label: str) -> wire.Model:
        return await self.workers.run(self.models.remove_label, name, label)

    async def rollback(
        self, name: str, *, version: int | None = None, label: str | None = None
    ) -> wire.Model:
        return await self.workers.run(self.models.rollback, name, version=version, label=label)


async def _step_result(index: int, step: asyncio.Future[wire.StepResult]) -> wire.StepResult:
    """The result of a queued step (batch ``index``), once it has run."""
    try:
        return await step
    except PropserveError as exc:
        raise _in_batch(index, exc) from None


def _stream_model(index: int, batch: Batch, name: str) -> str:
    """The stream's model after batch ``index``: the first batch names it, later ones may
    repeat it or leave it empty."""
    if batch.model and name and batch.model != name:
        raise InvalidArgument(f"model {batch.model!r} differs from the stream's model {name!r}")
    if not (batch.model or name):
        raise InvalidArgument("the first batch must name the model")
    return batch.model or name


def _in_batch(index: int, exc: PropserveError) -> PropserveError:
    """``exc`` with the batch's index in its message."""
    return type(exc)(f"batch {index}: {exc.message}")
