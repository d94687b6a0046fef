"""Calls described without doing them: what the four clients share besides their I/O.

A client method becomes a :class:`Call`: the transport's request, whether it may be retried,
and how to read the reply. :class:`Calls` checks the arguments (propserve.clients.arguments),
has the transport's :class:`Codec` build the request, and decides the retry policy, once for
both flavours; :class:`TrainRun` keeps one ``train`` call's books. The blocking and asyncio
clients (propserve.clients.client) only send what these describe.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from numpy.typing import NDArray

from propserve.clients import arguments
from propserve.clients._progress import Progress
from propserve.clients.errors import ClientError, InvalidArgument
from propserve.clients.types import (
    Evaluation,
    History,
    Model,
    Prediction,
    StepResult,
    Version,
    WeightsFile,
)

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


@dataclass(frozen=True)
class Call(Generic[T]):
    """One unary call: ``request`` is the transport's (a gRPC method and message, or an HTTP
    method, path and body), ``read`` turns its reply into the client's result, and
    ``idempotent`` calls may be retried."""

    request: Any
    read: Callable[[Any], T]
    idempotent: bool = False


class Codec(Protocol):
    """A transport's requests and replies, one method per operation; arguments arrive
    checked (tensors as wire arrays)."""

    def create_model(
        self,
        name: str,
        spec: dict[str, Any],
        settings: dict[str, int],
        weights: bytes | None,
        layout: str,
    ) -> Call[Model]: ...
    def get_model(self, name: str) -> Call[Model]: ...
    def list_models(self) -> Call[list[Model]]: ...
    def delete_model(self, name: str) -> Call[None]: ...
    def update_model(self, name: str, settings: dict[str, int]) -> Call[Model]: ...
    def predict(
        self, name: str, inputs: NDArray[Any], version: int | None, label: str | None
    ) -> Call[Prediction]: ...
    def evaluate(
        self,
        name: str,
        inputs: NDArray[Any],
        targets: NDArray[Any],
        version: int | None,
        label: str | None,
    ) -> Call[Evaluation]: ...
    def train_step(
        self,
        name: str,
        inputs: NDArray[Any],
        targets: NDArray[Any],
        learning_rate: float | None,
    ) -> Call[StepResult]: ...
    def save_version(self, name: str) -> Call[Version]: ...
    def list_versions(self, name: str) -> Call[list[Version]]: ...
    def set_label(self, name: str, label: str, version: int) -> Call[Model]: ...
    def remove_label(self, name: str, label: str) -> Call[Model]: ...
    def rollback(self, name: str, version: int | None, label: str | None) -> Call[Model]: ...
    def export_weights(
        self, name: str, version: int, layout: str, format: str
    ) -> Call[WeightsFile]: ...
    def history(
        self, name: str, since: int | None, until: int | None, every: int, limit: int | None
    ) -> Call[History]: ...


def _retried(call: Call[T]) -> Call[T]:
    return Call(call.request, call.read, idempotent=True)


class Calls:
    """Every operation as a Call, its arguments checked first. The retry policy lives here:
    predict and the reads are idempotent; nothing that changes a model is ever retried."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec

    def create_model(
        self,
        name: str,
        spec: dict[str, Any],
        retain: Any,
        autosave_every: Any,
        weights: Any = None,
        layout: Any = "propserve",
    ) -> Call[Model]:
        if not isinstance(spec, dict):
            raise InvalidArgument(f"spec must be a dict, got {type(spec).__name__}")
        settings = arguments.settings(retain, autosave_every)
        layout = arguments.layout(layout)
        return self.codec.create_model(name, spec, settings, arguments.weights(weights), layout)

    def get_model(self, name: str) -> Call[Model]:
        return _retried(self.codec.get_model(name))

    def list_models(self) -> Call[list[Model]]:
        return _retried(self.codec.list_models())

    def delete_model(self, name: str) -> Call[None]:
        return self.codec.delete_model(name)

    def update_model(self, name: str, retain: Any, autosave_every: Any) -> Call[Model]:
        return self.codec.update_model(name, arguments.settings(retain, autosave_every))

    def predict(self, name: str, inputs: Any, version: Any, label: Any) -> Call[Prediction]:
        source = arguments.source(version, label)
        return _retried(self.codec.predict(name, arguments.tensor(inputs, "inputs"), *source))

    def evaluate(
        self, name: str, inputs: Any, targets: Any, version: Any, label: Any
    ) -> Call[Evaluation]:
        source = arguments.source(version, label)
        inputs, targets = arguments.tensor(inputs, "inputs"), arguments.tensor(targets, "targets")
        return _retried(self.codec.evaluate(name, inputs, targets, *source))

    def train_step(
        self, name: str, inputs: Any, targets: Any, learning_rate: Any
    ) -> Call[StepResult]:
        return self.codec.train_step(
            name,
            arguments.tensor(inputs, "inputs"),
            arguments.tensor(targets, "targets"),
            arguments.learning_rate(learning_rate),
        )

    def save_version(self, name: str) -> Call[Version]:
        return self.codec.save_version(name)

    def list_versions(self, name: str) -> Call[list[Version]]:
        return _retried(self.codec.list_versions(name))

    def set_label(self, name: str, label: Any, version: Any) -> Call[Model]:
        return self.codec.set_label(name, arguments.label(label), arguments.version(version))

    def remove_label(self, name: str, label: Any) -> Call[Model]:
        return self.codec.remove_label(name, arguments.label(label))

    def rollback(self, name: str, version: Any, label: Any) -> Call[Model]:
        if version is None and label is None:
            raise InvalidArgument("rollback needs a version or a label")
        return self.codec.rollback(name, *arguments.source(version, label))

    def export_weights(
        self, name: str, version: Any, layout: Any, format: Any
    ) -> Call[WeightsFile]:
        number = arguments.version(version)
        return _retried(self.codec.export_weights(name, number, *arguments.export(layout, format)))

    def history(self, name: str, since: Any, until: Any, every: Any, limit: Any) -> Call[History]:
        return _retried(
            self.codec.history(name, *arguments.history_range(since, until, every, limit))
        )


#: A server's own note of the failing batch in a Train stream ("batch 3: ..."); the clients
#: say it themselves, the same way on both transports.
_BATCH_PREFIX = re.compile(r"batch (\d+): ")


def stopped_message(applied: list[StepResult], reason: str) -> str:
    """What a training run that stopped says: which batches (numbered from 0) stayed
    applied, with the steps they took the model from and to, and why it stopped."""
    if not applied:
        return f"no batches applied; stopped at batch 0: {reason}"
    before, after = applied[0].step - 1, applied[-1].step
    return (
        f"batches 0–{len(applied) - 1} applied (step {before} → {after}); "
        f"stopped at batch {len(applied)}: {reason}"
    )


class TrainRun:
    """One ``train`` call's books, the same for every client: each batch checked and turned
    into a request as it is needed, results collected (and shown), and a failure reported
    with the batches that stayed applied.

    A batch that fails its checks ends the requests there; the batches before it are
    answered, then the run raises. So does an exception from the caller's iterable, which
    is raised as it is, with a note saying what was applied.
    """

    def __init__(
        self,
        calls: Calls,
        name: str,
        learning_rate: Any,
        progress: bool | Progress,
        total: int | None,
    ) -> None:
        self._calls = calls
        self._name = name
        # Checked once, before anything is sent.
        self._learning_rate = arguments.learning_rate(learning_rate)
        self._owns_display = progress is True
        self._display = progress if isinstance(progress, Progress) else None
        if progress is True:
            self._display = Progress(total)
        self._read: Callable[[Any], StepResult] | None = None
        self._failure: Exception | None = None
        self.results: list[StepResult] = []

    def _call(self, batch: Any) -> Call[StepResult] | None:
        try:
            inputs, targets = batch
        except (TypeError, ValueError):
            self._failure = InvalidArgument(
                f"a batch must be a pair (inputs, targets), got {type(batch).__name__}"
            )
            return None
        try:
            call = self._calls.train_step(self._name, inputs, targets, self._learning_rate)
        except ClientError as exc:
            self._failure = exc
            return None
        self._read = call.read
        return call

    def requests(self, batches: Iterable[Any]) -> Iterator[Any]:
        """The transport's requests, one per batch, until the batches end or one fails."""
        iterator = iter(batches)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except Exception as exc:  # the caller's own; raised again by finish()
                self._failure = exc
                return
            call = self._call(batch)
            if call is None:
                return
            yield call.request

    async def arequests(self, batches: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
        """:meth:`requests` for asyncio, from an iterable or an async iterable."""
        if not isinstance(batches, AsyncIterable):
            for request in self.requests(batches):
                yield request
            return
        iterator = aiter(batches)
        while True:
            try:
                batch = await anext(iterator)
            except StopAsyncIteration:
                return
            except Exception as exc:
                self._failure = exc
                return
            call = self._call(batch)
            if call is None:
                return
            yield call.request

    def record(self, reply: Any) -> None:
        """One step's reply, in order."""
        if self._read is None:
            raise ClientError("the server answered a training step before any was sent")
        result = self._read(reply)
        self.results.append(result)
        if self._display is not None:
            self._display.update(result)

    def stopped(self, error: ClientError) -> ClientError:
        """``error`` (the server's refusal, or a batch's failed check) saying which batches
        stayed applied; it keeps its type, status and request id, and ``applied`` holds
        their results."""
        reason = error.reason
        prefix = _BATCH_PREFIX.match(reason)
        if prefix and int(prefix.group(1)) == len(self.results):
            reason = reason[prefix.end() :]
        stopped = error.restated(stopped_message(self.results, reason))
        stopped.reason = reason
        stopped.applied = tuple(self.results)
        return stopped

    def finish(self) -> list[StepResult]:
        """The results, or the failure that ended the requests early."""
        failure, self._failure = self._failure, None
        if isinstance(failure, ClientError):
            raise self.stopped(failure) from None
        if failure is not None:
            failure.add_note(
                f"train: {stopped_message(self.results, 'the batches raised this exception')}"
            )
            raise failure
        return self.results

    def close(self) -> None:
        if self._display is not None and self._owns_display:
            self._display.close()
