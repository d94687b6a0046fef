"""The data plane: the one async entry point every transport adapter calls.

The adapters (gRPC, REST) only convert between their wire and the core's types; everything
around a request happens here, the same way for every transport:

- the request context (:class:`Call`): draining, authorisation, the request id, timing,
  metrics, and the log line of a failure;
- offloading: cheap calls run inline, slow ones in worker threads (with admission);
- batching: concurrent predictions on one model share forward passes;
- the Train stream's pipeline: steps run in order while the next batches are read.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from numpy.typing import NDArray

from propserve import wire
from propserve.service.auth import Authenticator
from propserve.service.batching import Batcher
from propserve.service.busypoll import BusyPoll
from propserve.service.config import Settings
from propserve.service.errors import InvalidArgument, PropserveError, Unavailable, code_of
from propserve.service.logs import request_id as valid_request_id
from propserve.service.metrics import Metrics
from propserve.service.models import Models, Prediction
from propserve.service.workers import TwoPhase, Workers, default_threads

log = logging.getLogger("propserve.requests")

#: Steps of a Train stream that may be pending before the client's next batch is read: the
#: running one, one queued behind it (so the worker goes from one to the next), and a
#: finished one whose result is handed over when the next begins (see OrderedQueue).
TRAIN_AHEAD = 3


class Call:
    """One request's context, entered for its whole life (a stream's included)::

        with plane.call("Predict", "grpc", request_id=..., authorization=...) as call:
            ...

    Entering refuses the call while the server drains (Unavailable) and authorises it; the
    exit counts it by operation, transport and wire code, with its latency, and logs a
    failure (a bug with its traceback). An adapter that answered an error without raising it
    through the ``with`` block records it with :meth:`fail`."""

    __slots__ = (
        "authorization",
        "error",
        "operation",
        "plane",
        "request_id",
        "start",
        "transport",
    )

    def __init__(
        self,
        plane: DataPlane,
        operation: str,
        transport: str,
        request_id: str | None,
        authorization: str | None,
    ) -> None:
        self.plane = plane
        self.operation = operation
        self.transport = transport
        self.request_id = valid_request_id(request_id)
        self.authorization = authorization
        self.error: BaseException | None = None
        self.start = time.perf_counter()

    def __enter__(self) -> Call:
        plane = self.plane
        if plane.draining:
            self._finish(Unavailable("the server is shutting down"))
            raise Unavailable("the server is shutting down")
        try:
            plane.auth.authorize(self.authorization, self.operation)
        except PropserveError as exc:
            self._finish(exc)
            raise
        plane.in_flight += 1
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        plane = self.plane
        plane.in_flight -= 1
        if not plane.in_flight and plane.idle is not None:
            plane.idle.set()
        self._finish(exc or self.error)

    def fail(self, exc: BaseException) -> None:
        """Record ``exc`` as the call's outcome, answered by the adapter."""
        self.error = exc

    def _finish(self, exc: BaseException | None) -> None:
        plane = self.plane
        plane.metrics.observe(
            self.operation,
            self.transport,
            "ok" if exc is None else code_of(exc).name,
            time.perf_counter() - self.start,
        )
        if exc is None or isinstance(exc, asyncio.CancelledError):
            return
        fields = {
            "transport": self.transport,
            "operation": self.operation,
            "request_id": self.request_id,
        }
        if isinstance(exc, PropserveError):
            log.info(
                "request.failed", extra=fields | {"code": exc.code.name, "reason": exc.message}
            )
        else:
            log.error("request.internal_error", extra=fields, exc_info=exc)


def internal_message(call: Call) -> str:
    """What a client hears of a bug: where to find it in the logs, and nothing else."""
    return f"internal error (request id {call.request_id})"


@dataclass(frozen=True)
class Batch:
    """One batch of a Train stream, decoded: ``model`` may be empty after the first."""

    model: str
    inputs: NDArray[Any]
    targets: NDArray[Any]
    learning_rate: float | None


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
        )
        self.busy_poll = BusyPoll(settings.busy_poll_us / 1e6, lambda: not self.workers.busy)
        #: Elements of one tensor the adapters accept (a whole message of 4-byte numbers).
        self.max_elements = max(settings.max_message_bytes // 4, 1)
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
    ) -> Call:
        """The context of one request (see :class:`Call`)."""
        return Call(self, operation, transport, request_id, authorization)

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
        self, name: str, spec: Any, settings: Mapping[str, Any] | None = None
    ) -> wire.Model:
        return await self.workers.run(self.models.create_model, name, spec, settings)

    async def get_model(self, name: str) -> wire.Model:
        return self.models.get_model(name)

    async def list_models(self) -> list[wire.Model]:
        return self.models.list_models()

    async def update_model(self, name: str, settings: Mapping[str, Any]) -> wire.Model:
        return await self.workers.run(self.models.update_settings, name, settings)

    async def delete_model(self, name: str) -> None:
        await self.workers.run(self.models.delete_model, name)

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
