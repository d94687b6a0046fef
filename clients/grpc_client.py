"""gRPC clients: :class:`GrpcClient` (blocking) and :class:`AsyncGrpcClient` (asyncio).

Tensors travel as shape + dtype + little-endian bytes. ``train`` streams batches over the
bidirectional ``Train`` call; the stream has no deadline (an epoch may outlast one call's
timeout). The methods are propserve.clients.client's; this module holds the codec (the
messages) and each flavour's I/O.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import numpy as np
from numpy.typing import NDArray

from propserve import wire
from propserve.clients import arguments, errors
from propserve.clients._retry import RetryPolicy
from propserve.clients.arguments import DTYPE_NAMES, to_json
from propserve.clients.calls import Call
from propserve.clients.client import AsyncClient, Client
from propserve.clients.types import (
    Evaluation,
    History,
    HistoryPoint,
    Model,
    Prediction,
    StepResult,
    Version,
    WeightsFile,
)
from propserve.v1 import model_service_pb2 as pb
from propserve.v1 import model_service_pb2_grpc as pb_grpc

T = TypeVar("T")

#: Statuses the server never answers with, mapped to what they mean to a caller.
_STATUS_CODES = {
    "OUT_OF_RANGE": wire.INVALID_ARGUMENT,
    # NOTE: these clients never cancel a call themselves, so CANCELLED comes from the server
    # aborting it: a server that stops while the call is queued. Retrying it is safe for
    # idempotent calls, like UNAVAILABLE.
    "CANCELLED": wire.UNAVAILABLE,
}
#: The proto's enum value of each wire dtype (DTYPE_FLOAT32, ...), and back.
_ENUMS: dict[str, int] = {name: pb.DType.Value(f"DTYPE_{name.upper()}") for name in wire.DTYPES}
_NAMES: dict[int, str] = {enum: name for name, enum in _ENUMS.items()}
DEFAULT_MAX_MESSAGE = 64 << 20
#: NOTE: what grpc.aio reports, in place of the server's status, when a stream's write
#: fails because the server has just ended the call: a later batch was on its way when the
#: server refused one. The server's code and reason are lost (grpc/grpc#36066; the blocking
#: client is not affected).
_CORE_LOST_STATUS = "Internal error from Core"


def translate(exc: grpc.RpcError) -> errors.ClientError:
    """The client's own exception for a failed call: by the code the server named in its
    trailers, else by the status; the request id from the trailers."""
    if not isinstance(exc, grpc.Call | grpc.aio.AioRpcError):
        return errors.Unavailable(str(exc))
    status = exc.code()
    details = exc.details() or status.name
    name = _trailer(exc, wire.ERROR_CODE_KEY)
    if name is None or name not in wire.BY_NAME:
        code = _STATUS_CODES.get(status.name) or wire.code_for_status(grpc=status.name)
        name = code.name
        if status.name == "RESOURCE_EXHAUSTED" and _trailer(exc, wire.RETRY_AFTER_MS_KEY):
            name = wire.TOO_BUSY.name
    return errors.from_code(
        name,
        details,
        status=status.name,
        request_id=_trailer(exc, wire.REQUEST_ID_KEY),
        retry_after=_milliseconds(_trailer(exc, wire.RETRY_AFTER_MS_KEY)),
    )


def _trailer(exc: grpc.Call | grpc.aio.AioRpcError, key: str) -> str | None:
    for name, value in exc.trailing_metadata() or ():
        if name == key:
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def _milliseconds(value: str | None) -> float | None:
    try:
        return max(0.0, int(value) / 1000) if value is not None else None
    except ValueError:
        return None


# -- the codec ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GrpcRequest:
    """A call of ModelService: its method's name and the request message; a method that
    takes a stream gets a list of messages, and one that answers with a stream is read
    whole (``streamed``): a list of its replies."""

    method: str
    message: Any
    streamed: bool = False


#: Weights up to this size go in CreateModel's one message; larger ones in UploadModel's
#: chunks of this size, below any server's message limit.
UPLOAD_CHUNK = 1 << 20


def encode_tensor(array: NDArray[Any]) -> pb.Tensor:
    """A wire array (propserve.clients.arguments.tensor) as a Tensor message."""
    enum = _ENUMS[DTYPE_NAMES[array.dtype]]
    return pb.Tensor(shape=array.shape, dtype=enum, data=array.tobytes())  # type: ignore[arg-type]


def decode_tensor(tensor: pb.Tensor) -> NDArray[Any]:
    name = _NAMES.get(tensor.dtype)
    if name is None:
        raise ValueError(f"unknown dtype {tensor.dtype}")
    array: NDArray[Any] = np.frombuffer(tensor.data, dtype=wire.DTYPES[name])
    return array.reshape(tuple(tensor.shape))


def _optional(message: Any, field: str) -> Any:
    """An optional field's value, None when unset."""
    return getattr(message, field) if message.HasField(field) else None


def model_from(message: pb.Model) -> Model:
    return Model(
        name=message.name,
        spec=json.loads(message.spec_json),
        settings={
            "retain": message.settings.retain,
            "autosave_every": message.settings.autosave_every,
        },
        labels=dict(message.labels),
        head_step=message.head_step,
        latest_version=_optional(message, "latest_version"),
        unsaved_steps=message.unsaved_steps,
        parameter_count=message.parameter_count,
        created_at=message.created_at,
        last_loss=_optional(message, "last_loss"),
    )


def version_from(message: pb.Version) -> Version:
    return Version(
        model=message.model,
        version=message.version,
        step=message.step,
        created_at=message.created_at,
        parent=_optional(message, "parent"),
        metrics=dict(message.metrics),
        sha256=message.sha256,
        size_bytes=message.size_bytes,
        labels=tuple(message.labels),
    )


def step_from(message: pb.TrainStepResponse) -> StepResult:
    return StepResult(
        step=message.step,
        loss=message.loss,
        accuracy=_optional(message, "accuracy"),
        batch_size=message.batch_size,
        saved_version=_optional(message, "saved_version"),
    )


def evaluation_from(message: pb.EvaluateResponse) -> Evaluation:
    return Evaluation(
        loss=message.loss,
        accuracy=_optional(message, "accuracy"),
        rows=message.rows,
        step=message.step,
        version=_optional(message, "version"),
    )


def prediction_from(message: pb.PredictResponse) -> Prediction:
    return Prediction(decode_tensor(message.outputs), _optional(message, "version"), message.step)


def _reading(read: Callable[[Any], T]) -> Callable[[Any], T]:
    """``read``, with a reply it cannot read raising a ClientError (not a raw exception)."""

    def checked(message: Any) -> T:
        try:
            return read(message)
        except (ValueError, TypeError, KeyError) as exc:
            raise errors.ClientError(f"the server's answer could not be read: {exc}") from None

    return checked


_read_model = _reading(model_from)
_read_step = _reading(step_from)


def weights_from(chunks: list[pb.WeightsChunk]) -> WeightsFile:
    if not chunks or not chunks[0].HasField("info"):
        raise ValueError("the export's first message lacks its info")
    info = chunks[0].info
    data = b"".join(chunk.data for chunk in chunks)
    if len(data) != info.size_bytes:
        raise ValueError(f"the export sent {len(data)} of {info.size_bytes} bytes")
    return WeightsFile(
        info.model, info.version, info.step, info.format, info.layout, info.sha256, data
    )


def point_from(message: pb.HistoryPoint) -> HistoryPoint:
    return HistoryPoint(
        message.step,
        message.loss,
        _optional(message, "accuracy"),
        message.learning_rate,
        message.rows,
        message.time,
    )


def history_from(message: pb.History) -> History:
    points = tuple(point_from(p) for p in message.points)
    return History(message.model, points, _optional(message, "next_since"))


def _settings(settings: dict[str, int]) -> pb.ModelSettings:
    return pb.ModelSettings(**settings)


class GrpcCodec:
    """ModelService's messages for each operation, and how to read its replies."""

    def create_model(
        self,
        name: str,
        spec: dict[str, Any],
        settings: dict[str, int],
        weights: bytes | None,
        layout: str,
    ) -> Call[Model]:
        message = pb.CreateModelRequest(
            name=name, spec_json=to_json(spec, "the spec"), settings=_settings(settings)
        )
        if weights is not None:
            message.layout = layout
            if len(weights) > UPLOAD_CHUNK:
                chunks = [
                    pb.UploadModelRequest(chunk=weights[start : start + UPLOAD_CHUNK])
                    for start in range(0, len(weights), UPLOAD_CHUNK)
                ]
                messages = [pb.UploadModelRequest(model=message), *chunks]
                return Call(GrpcRequest("UploadModel", messages), _read_model)
            message.weights = weights
        return Call(GrpcRequest("CreateModel", message), _read_model)

    def get_model(self, name: str) -> Call[Model]:
        return Call(GrpcRequest("GetModel", pb.GetModelRequest(name=name)), _read_model)

    def list_models(self) -> Call[list[Model]]:
        return Call(
            GrpcRequest("ListModels", pb.ListModelsRequest()),
            _reading(lambda reply: [model_from(m) for m in reply.models]),
        )

    def delete_model(self, name: str) -> Call[None]:
        return Call(GrpcRequest("DeleteModel", pb.DeleteModelRequest(name=name)), lambda _: None)

    def update_model(self, name: str, settings: dict[str, int]) -> Call[Model]:
        message = pb.UpdateModelRequest(name=name, settings=_settings(settings))
        return Call(GrpcRequest("UpdateModel", message), _read_model)

    def predict(
        self, name: str, inputs: NDArray[Any], version: int | None, label: str | None
    ) -> Call[Prediction]:
        message = pb.PredictRequest(model=name, inputs=encode_tensor(inputs))
        if version is not None:
            message.version = version
        elif label is not None:
            message.label = label
        return Call(GrpcRequest("Predict", message), _reading(prediction_from))

    def evaluate(
        self,
        name: str,
        inputs: NDArray[Any],
        targets: NDArray[Any],
        version: int | None,
        label: str | None,
    ) -> Call[Evaluation]:
        message = pb.EvaluateRequest(
            model=name, inputs=encode_tensor(inputs), targets=encode_tensor(targets)
        )
        if version is not None:
            message.version = version
        elif label is not None:
            message.label = label
        return Call(GrpcRequest("Evaluate", message), _reading(evaluation_from))

    def train_step(
        self,
        name: str,
        inputs: NDArray[Any],
        targets: NDArray[Any],
        learning_rate: float | None,
    ) -> Call[StepResult]:
        message = pb.TrainStepRequest(
            model=name, inputs=encode_tensor(inputs), targets=encode_tensor(targets)
        )
        if learning_rate is not None:
            message.learning_rate = learning_rate
        return Call(GrpcRequest("TrainStep", message), _read_step)

    def save_version(self, name: str) -> Call[Version]:
        return Call(
            GrpcRequest("SaveVersion", pb.SaveVersionRequest(model=name)), _reading(version_from)
        )

    def list_versions(self, name: str) -> Call[list[Version]]:
        return Call(
            GrpcRequest("ListVersions", pb.ListVersionsRequest(model=name)),
            _reading(lambda reply: [version_from(v) for v in reply.versions]),
        )

    def set_label(self, name: str, label: str, version: int) -> Call[Model]:
        message = pb.SetLabelRequest(model=name, label=label, version=version)
        return Call(GrpcRequest("SetLabel", message), _read_model)

    def remove_label(self, name: str, label: str) -> Call[Model]:
        message = pb.RemoveLabelRequest(model=name, label=label)
        return Call(GrpcRequest("RemoveLabel", message), _read_model)

    def rollback(self, name: str, version: int | None, label: str | None) -> Call[Model]:
        message = (
            pb.RollbackRequest(model=name, version=version)
            if version is not None
            else pb.RollbackRequest(model=name, label=label)
        )
        return Call(GrpcRequest("Rollback", message), _read_model)

    def export_weights(
        self, name: str, version: int, layout: str, format: str
    ) -> Call[WeightsFile]:
        message = pb.ExportWeightsRequest(model=name, version=version, layout=layout, format=format)
        return Call(GrpcRequest("ExportWeights", message, streamed=True), _reading(weights_from))

    def history(
        self, name: str, since: int | None, until: int | None, every: int, limit: int | None
    ) -> Call[History]:
        message = pb.GetHistoryRequest(
            model=name, since=since, until=until, every=every, limit=limit or 0
        )
        return Call(GrpcRequest("GetHistory", message), _reading(history_from))


# -- the two flavours' I/O -----------------------------------------------------------------


def _channel_options(max_message_bytes: int | None) -> list[tuple[str, Any]]:
    size = DEFAULT_MAX_MESSAGE if max_message_bytes is None else max_message_bytes
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
    ]


def _credentials(tls: bool, root_certificates: Path | None) -> grpc.ChannelCredentials | None:
    if not tls and root_certificates is None:
        return None
    roots = root_certificates.read_bytes() if root_certificates else None
    return grpc.ssl_channel_credentials(root_certificates=roots)


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _check_injected(
    channel: object, tls: bool, root_certificates: Path | None, max_message_bytes: int | None
) -> None:
    if channel is not None and (tls or root_certificates is not None or max_message_bytes):
        raise ValueError(
            "tls, root_certificates and max_message_bytes set up the channel the client "
            "makes; with channel= given, set up that channel instead"
        )


class GrpcClient(Client):
    """A blocking client for propserve's gRPC API.

    ``target`` is ``host:port``; ``token`` a bearer token; ``tls=True`` (or
    ``root_certificates``, a PEM file) uses TLS; ``timeout`` is each unary call's deadline in
    seconds; ``max_message_bytes`` limits messages both ways (default 64 MiB). Idempotent
    calls (predict, get, list) retry on Unavailable and TooBusy per ``retry``.

    ``channel``: a ``grpc.Channel`` of your own (your options, credentials, interceptors),
    used instead of one made from ``target``, ``tls``, ``root_certificates`` and
    ``max_message_bytes`` (giving those too is refused). You keep it: :meth:`close` closes
    only a channel the client made.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: Path | None = None,
        timeout: float | None = 30.0,
        retry: RetryPolicy | None = None,
        max_message_bytes: int | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        super().__init__(GrpcCodec(), timeout=timeout, retry=retry)
        _check_injected(channel, tls, root_certificates, max_message_bytes)
        self._metadata = _metadata(token)
        self._owns_channel = channel is None
        if channel is None:
            credentials = _credentials(tls, root_certificates)
            options = _channel_options(max_message_bytes)
            channel = (
                grpc.secure_channel(target, credentials, options)
                if credentials
                else grpc.insecure_channel(target, options)
            )
        self._channel = channel
        self._stub = pb_grpc.ModelServiceStub(channel)

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()

    def _send(self, request: GrpcRequest) -> Any:
        rpc = getattr(self._stub, request.method)
        message = iter(request.message) if isinstance(request.message, list) else request.message
        try:
            reply = rpc(message, timeout=self.timeout, metadata=self._metadata)
            return list(reply) if request.streamed else reply
        except grpc.RpcError as exc:
            raise translate(exc) from None

    def watch_history(self, name: str, *, since: int | None = None) -> Iterator[HistoryPoint]:
        """Each new training step of model ``name`` as it is trained (from step ``since``,
        if given, including those already recorded), until the caller stops reading."""
        request = pb.WatchHistoryRequest(
            model=name, since=arguments.history_range(since, None, None, None)[0]
        )
        call = self._stub.WatchHistory(request, metadata=self._metadata)
        try:
            for reply in call:
                yield from history_from(reply).points
        except grpc.RpcError as exc:
            raise translate(exc) from None
        finally:
            call.cancel()

    def _stream(self, requests: Iterator[GrpcRequest]) -> Generator[Any, None, None]:
        call = self._stub.Train((request.message for request in requests), metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as exc:
            raise translate(exc) from None
        finally:
            call.cancel()  # a no-op once the call is over; ends it if the reader stopped


class AsyncGrpcClient(AsyncClient):
    """The asyncio twin of :class:`GrpcClient`: the same arguments (``channel``: a
    ``grpc.aio.Channel``) and methods, awaited. Make it inside the running event loop."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: Path | None = None,
        timeout: float | None = 30.0,
        retry: RetryPolicy | None = None,
        max_message_bytes: int | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        super().__init__(GrpcCodec(), timeout=timeout, retry=retry)
        _check_injected(channel, tls, root_certificates, max_message_bytes)
        self._metadata = _metadata(token)
        self._owns_channel = channel is None
        if channel is None:
            credentials = _credentials(tls, root_certificates)
            options = _channel_options(max_message_bytes)
            channel = (
                grpc.aio.secure_channel(target, credentials, options)
                if credentials
                else grpc.aio.insecure_channel(target, options)
            )
        self._channel = channel
        self._stub = pb_grpc.ModelServiceStub(channel)

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()

    async def _send(self, request: GrpcRequest) -> Any:
        rpc = getattr(self._stub, request.method)
        message = iter(request.message) if isinstance(request.message, list) else request.message
        try:
            if request.streamed:
                return [
                    reply
                    async for reply in rpc(message, timeout=self.timeout, metadata=self._metadata)
                ]
            return await rpc(message, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise translate(exc) from None

    async def watch_history(
        self, name: str, *, since: int | None = None
    ) -> AsyncIterator[HistoryPoint]:
        """:meth:`GrpcClient.watch_history`, for asyncio."""
        request = pb.WatchHistoryRequest(
            model=name, since=arguments.history_range(since, None, None, None)[0]
        )
        call = self._stub.WatchHistory(request, metadata=self._metadata)
        try:
            async for reply in call:
                for point in history_from(reply).points:
                    yield point
        except grpc.RpcError as exc:
            raise translate(exc) from None
        finally:
            call.cancel()

    async def _stream(self, requests: AsyncIterator[GrpcRequest]) -> AsyncGenerator[Any, None]:
        async def messages() -> AsyncIterator[Any]:
            async for request in requests:
                yield request.message

        call = self._stub.Train(messages(), metadata=self._metadata)
        try:
            async for response in call:
                yield response
        except grpc.RpcError as exc:
            error = translate(exc)
            if error.code is wire.INTERNAL and error.message == _CORE_LOST_STATUS:
                error = errors.Internal(
                    "the server ended the stream, and grpc.aio lost its reason: a batch was "
                    "still being written as the stream ended (grpc/grpc#36066)",
                    status=error.status,
                )
            raise error from None
        finally:
            call.cancel()
