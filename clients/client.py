"""The methods every client has: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

One implementation for the four clients, in httpx's manner (BaseClient, Client and
AsyncClient): everything that is not I/O (argument checks, request building, reply
decoding, the retry policy, a training run's books) lives once in
propserve.clients.calls; the transports' codecs build and read their own messages; the
two classes here only send, and differ only in ``await``. Each transport then supplies
three pieces of I/O: a unary call, a stream of training steps, and closing
(propserve.clients.grpc_client, propserve.clients.rest_client).

Why a shared base rather than generating the blocking code from the asyncio code (as
httpcore does with unasync): what differs between the flavours is a few lines per
transport, and each public method here is one line that calls the shared code, so a
generator and its freshness check would guard very little; a base keeps one source that
tools and readers see as it runs. Matching signatures are checked by a test.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Generator,
    Iterable,
    Iterator,
)
from contextlib import aclosing, closing
from os import PathLike
from typing import Any, Self, TypeVar

from propserve.clients._progress import Progress
from propserve.clients._retry import NO_RETRY, RetryPolicy
from propserve.clients.calls import Call, Calls, Codec, TrainRun
from propserve.clients.errors import ClientError
from propserve.clients.types import (
    Evaluation,
    History,
    Model,
    Prediction,
    StepResult,
    Version,
    WeightsFile,
)

#: Weights: the bytes of a safetensors file, or a path to one.
Weights = bytes | bytearray | memoryview | str | PathLike[str]

T = TypeVar("T")


class BaseClient:
    """What both flavours hold: the calls (checks, codec, retry decisions), the retry
    policy, and the timeout of each unary call in seconds (None: no limit)."""

    def __init__(self, codec: Codec, *, timeout: float | None, retry: RetryPolicy | None) -> None:
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._calls = Calls(codec)

    def _policy(self, call: Call[Any]) -> RetryPolicy:
        return self.retry if call.idempotent else NO_RETRY


class Client(BaseClient, ABC):
    """A blocking client: GrpcClient and RestClient. Errors are ClientError subclasses."""

    # -- the transport's I/O -------------------------------------------------------------

    @abstractmethod
    def _send(self, request: Any) -> Any:
        """One unary call's reply; a failure raises the ClientError for it."""

    @abstractmethod
    def _stream(self, requests: Iterator[Any]) -> Generator[Any, None, None]:
        """The replies to a stream of training steps, in order, as they arrive (closing the
        generator ends the stream)."""

    @abstractmethod
    def close(self) -> None:
        """Close what the client opened (an injected channel or HTTP client stays open)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, call: Call[T]) -> T:
        return call.read(self._policy(call).call(lambda: self._send(call.request)))

    # -- models --------------------------------------------------------------------------

    def create_model(
        self,
        name: str,
        spec: dict[str, Any],
        *,
        retain: int | None = None,
        autosave_every: int | None = None,
        weights: Weights | None = None,
        layout: str = "propserve",
    ) -> Model:
        """Create model ``name`` from ``spec``; ``retain`` and ``autosave_every`` default to
        the server's. With ``weights`` (a safetensors file's bytes or path, named and shaped
        per ``layout``: "propserve" or "torch", see docs/weights.md) the head starts from
        them and is saved as version 1."""
        call = self._calls.create_model(name, spec, retain, autosave_every, weights, layout)
        return self._call(call)

    def get_model(self, name: str) -> Model:
        return self._call(self._calls.get_model(name))

    def list_models(self) -> list[Model]:
        return self._call(self._calls.list_models())

    def delete_model(self, name: str) -> None:
        return self._call(self._calls.delete_model(name))

    def update_model(
        self, name: str, *, retain: int | None = None, autosave_every: int | None = None
    ) -> Model:
        """Change the settings given; the others stay."""
        return self._call(self._calls.update_model(name, retain, autosave_every))

    # -- predicting and training ---------------------------------------------------------

    def predict(
        self, name: str, inputs: Any, *, version: int | None = None, label: str | None = None
    ) -> Prediction:
        """Outputs for ``inputs`` (batch, features) from the head, a saved ``version``, or
        the version ``label`` names. Retried per ``retry``."""
        return self._call(self._calls.predict(name, inputs, version, label))

    def evaluate(
        self,
        name: str,
        inputs: Any,
        targets: Any,
        *,
        version: int | None = None,
        label: str | None = None,
    ) -> Evaluation:
        """The loss (and accuracy) on (``inputs``, ``targets``) of the head, a saved
        ``version`` or the version ``label`` names, as a training step computes it; changes
        nothing. Retried per ``retry``."""
        return self._call(self._calls.evaluate(name, inputs, targets, version, label))

    def train_step(
        self, name: str, inputs: Any, targets: Any, *, learning_rate: float | None = None
    ) -> StepResult:
        """One training step on the head; never retried."""
        return self._call(self._calls.train_step(name, inputs, targets, learning_rate))

    def train(
        self,
        name: str,
        batches: Iterable[tuple[Any, Any]],
        *,
        learning_rate: float | None = None,
        progress: bool | Progress = False,
        total: int | None = None,
    ) -> list[StepResult]:
        """Train on (inputs, targets) batches, in order; one result per batch.

        Batches are read and checked as they are sent. A failure stops the run and raises
        (never retried): the batches before it stay applied, and the error says which
        (``error.applied``). ``progress=True`` shows a progress line on stderr (``total``:
        the number of batches, if known); a Progress of your own is updated, not closed.
        """
        run = TrainRun(self._calls, name, learning_rate, progress, total)
        try:
            with closing(self._stream(run.requests(batches))) as replies:
                for reply in replies:
                    run.record(reply)
        except ClientError as exc:
            raise run.stopped(exc) from None
        finally:
            run.close()
        return run.finish()

    # -- versions and labels -------------------------------------------------------------

    def save_version(self, name: str) -> Version:
        """Save the head as the next version."""
        return self._call(self._calls.save_version(name))

    def list_versions(self, name: str) -> list[Version]:
        return self._call(self._calls.list_versions(name))

    def set_label(self, name: str, label: str, version: int) -> Model:
        """Point ``label`` at ``version`` (moving it if it exists)."""
        return self._call(self._calls.set_label(name, label, version))

    def remove_label(self, name: str, label: str) -> Model:
        return self._call(self._calls.remove_label(name, label))

    def rollback(self, name: str, *, version: int | None = None, label: str | None = None) -> Model:
        """Reset the head to a saved version (one of ``version`` or ``label``)."""
        return self._call(self._calls.rollback(name, version, label))

    def export_weights(
        self, name: str, version: int, *, layout: str = "propserve", format: str = "safetensors"
    ) -> WeightsFile:
        """Saved ``version`` as a file: safetensors in ``layout`` ("propserve" or "torch"), or
        ``format="onnx"``; ``.sha256`` is the stored version's (docs/weights.md)."""
        return self._call(self._calls.export_weights(name, version, layout, format))

    # -- training history ----------------------------------------------------------------

    def history(
        self,
        name: str,
        *,
        since: int | None = None,
        until: int | None = None,
        every: int = 1,
        limit: int | None = None,
    ) -> History:
        """The head's training history from step ``since`` to ``until`` (both included),
        one point per step or per bucket of ``every`` steps, at most ``limit`` points
        (``.next_since`` continues)."""
        return self._call(self._calls.history(name, since, until, every, limit))


class AsyncClient(BaseClient, ABC):
    """An asyncio client: AsyncGrpcClient and AsyncRestClient. The same methods as
    :class:`Client`, awaited; ``train`` also takes an async iterable of batches."""

    @abstractmethod
    async def _send(self, request: Any) -> Any: ...

    @abstractmethod
    def _stream(self, requests: AsyncIterator[Any]) -> AsyncGenerator[Any, None]: ...

    @abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, call: Call[T]) -> T:
        return call.read(await self._policy(call).acall(lambda: self._send(call.request)))

    async def create_model(
        self,
        name: str,
        spec: dict[str, Any],
        *,
        retain: int | None = None,
        autosave_every: int | None = None,
        weights: Weights | None = None,
        layout: str = "propserve",
    ) -> Model:
        call = self._calls.create_model(name, spec, retain, autosave_every, weights, layout)
        return await self._call(call)

    async def get_model(self, name: str) -> Model:
        return await self._call(self._calls.get_model(name))

    async def list_models(self) -> list[Model]:
        return await self._call(self._calls.list_models())

    async def delete_model(self, name: str) -> None:
        return await self._call(self._calls.delete_model(name))

    async def update_model(
        self, name: str, *, retain: int | None = None, autosave_every: int | None = None
    ) -> Model:
        return await self._call(self._calls.update_model(name, retain, autosave_every))

    async def predict(
        self, name: str, inputs: Any, *, version: int | None = None, label: str | None = None
    ) -> Prediction:
        return await self._call(self._calls.predict(name, inputs, version, label))

    async def evaluate(
        self,
        name: str,
        inputs: Any,
        targets: Any,
        *,
        version: int | None = None,
        label: str | None = None,
    ) -> Evaluation:
        return await self._call(self._calls.evaluate(name, inputs, targets, version, label))

    async def train_step(
        self, name: str, inputs: Any, targets: Any, *, learning_rate: float | None = None
    ) -> StepResult:
        return await self._call(self._calls.train_step(name, inputs, targets, learning_rate))

    async def train(
        self,
        name: str,
        batches: Iterable[tuple[Any, Any]] | AsyncIterable[tuple[Any, Any]],
        *,
        learning_rate: float | None = None,
        progress: bool | Progress = False,
        total: int | None = None,
    ) -> list[StepResult]:
        run = TrainRun(self._calls, name, learning_rate, progress, total)
        try:
            async with aclosing(self._stream(run.arequests(batches))) as replies:
                async for reply in replies:
                    run.record(reply)
        except ClientError as exc:
            raise run.stopped(exc) from None
        finally:
            run.close()
        return run.finish()

    async def save_version(self, name: str) -> Version:
        return await self._call(self._calls.save_version(name))

    async def list_versions(self, name: str) -> list[Version]:
        return await self._call(self._calls.list_versions(name))

    async def set_label(self, name: str, label: str, version: int) -> Model:
        return await self._call(self._calls.set_label(name, label, version))

    async def remove_label(self, name: str, label: str) -> Model:
        return await self._call(self._calls.remove_label(name, label))

    async def rollback(
        self, name: str, *, version: int | None = None, label: str | None = None
    ) -> Model:
        return await self._call(self._calls.rollback(name, version, label))

    async def export_weights(
        self, name: str, version: int, *, layout: str = "propserve", format: str = "safetensors"
    ) -> WeightsFile:
        return await self._call(self._calls.export_weights(name, version, layout, format))

    async def history(
        self,
        name: str,
        *,
        since: int | None = None,
        until: int | None = None,
        every: int = 1,
        limit: int | None = None,
    ) -> History:
        return await self._call(self._calls.history(name, since, until, every, limit))
